"""Sweeps: traces x policies x scopes x capacities into one tidy, resumable results table.

A cell is (trace, policy, scope); it yields one row per capacity from :func:`curve`
(one stack pass for lru/lfu/opt). Cells run on local threads (the numba kernels release
the GIL) or on a dask.distributed cluster. A trace is named by a local path or a URI
(``s3://bucket/key.parquet``: see :mod:`moecache.storage`) and is read where its cells
run: on a cluster the workers read it from storage themselves, also for the check that
every trace is valid before any cell runs, so the client reads no trace data. After
every finished cell the table is rewritten atomically, as Parquet and CSV side by side,
so an interrupted sweep keeps its finished cells and ``resume=True`` skips them. The
Parquet file records the settings its rows were made with; a resume with other settings
is refused, and the table's write lock keeps a second sweep to the same output out.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .curve import curve
from .errors import MoecacheError
from .files import first_line, output_lock
from .requests import Requests
from .storage import os_path
from .streaming import curve_stream, open_stream, should_stream, trace_header
from .tables import read_table, read_table_meta, write_table
from .trace import Trace
from .units import check_seed, parse_bandwidth, parse_duration
from .validate import check_policy, check_scope, chosen_capacities, plan_range, top_capacity

KEY_COLUMNS = ["trace", "policy", "scope", "capacity"]
SETTINGS_KEY = "moecache.sweep"  # Parquet metadata: the settings every row was made with
CONNECT_TIMEOUT = 5  # seconds to reach a dask scheduler


@dataclass(frozen=True)
class SweepSettings:
    """What every cell of one sweep shares."""

    capacities: tuple[int, ...] | None = None
    per_token: bool = False
    bandwidth: str | float | None = None
    latency: str | float = "0"
    seed: int = 0


@lru_cache(maxsize=8)
def _load(path: str, per_token: bool, weights: bool) -> tuple[Trace, Requests]:
    trace = Trace.load(path, weights=weights, lookahead=False)
    return trace, Requests.from_trace(trace, per_token=per_token)


def _largest_capacity(path: str, scopes: tuple[str, ...], per_token: bool) -> int:
    """Load and check one trace (as its lru, lfu and opt cells will, so they find it
    cached); the capacity from which every expert fits in the largest of ``scopes``."""
    trace = trace_header(path) if should_stream(path) else _load(path, per_token, False)[0]  # a streamed
    return max(top_capacity(trace, scope) for scope in scopes)  # trace is checked by its cells


def run_cell(path: str, policy: str, scope: str, settings: SweepSettings) -> pd.DataFrame:
    """All capacities of one (trace, policy, scope), with the trace's metadata columns."""
    weights = check_policy(policy).policy.needs_scores
    if should_stream(path):  # a trace too large for memory: one pass over it for all capacities
        with open_stream(path, per_token=settings.per_token, weights=weights) as streamed:
            trace = streamed.header
            checked = plan_range(trace, policy, scope, capacities=settings.capacities, skip_invalid=True,
                                 per_token=settings.per_token, requests=streamed)  # type: ignore[arg-type]
            if not checked.capacities:
                return pd.DataFrame(columns=KEY_COLUMNS)
            frame = curve_stream(streamed, policy, scope, capacities=checked.capacities,
                                 bandwidth=settings.bandwidth, latency=settings.latency, seed=settings.seed,
                                 workers=1)
    else:
        trace, req = _load(path, settings.per_token, weights)
        checked = plan_range(trace, policy, scope, capacities=settings.capacities, skip_invalid=True,
                             requests=req)
        if not checked.capacities:
            return pd.DataFrame(columns=KEY_COLUMNS)
        frame = curve(trace, policy, scope, capacities=checked.capacities, bandwidth=settings.bandwidth,
                      latency=settings.latency, seed=settings.seed, requests=req, workers=1)
    model = trace.meta.get("model") or {}
    info = {"trace": path, "model": model.get("name"), "architecture": model.get("architecture"),
            "router": trace.meta.get("router"), "num_layers": trace.num_layers,
            "num_experts": trace.num_experts, "top_k": trace.top_k, "per_token": settings.per_token}
    for position, (name, value) in enumerate(info.items()):
        frame.insert(position, name, value)
    return frame


def results_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """The Parquet and CSV files a sweep writes for ``out`` (either suffix, or none)."""
    base = Path(out)
    if base.suffix in (".parquet", ".csv"):
        base = base.with_suffix("")
    return base.with_suffix(".parquet"), base.with_suffix(".csv")


def sweep(
    traces: Iterable[str | os.PathLike],
    policies: Iterable[str] = ("lru", "lfu", "opt"),
    scopes: Iterable[str] = ("layer",),
    capacities: Iterable[int] | str | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    per_token: bool = False,
    bandwidth: str | float | None = None,
    latency: str | float = "0",
    seed: int = 0,
    executor: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every (trace, policy, scope) cell at the given capacities; returns the tidy table.

    ``capacities`` is a list, a text such as ``"8:64:4"`` (ranges stop at the largest
    capacity any trace allows, so a huge bound costs nothing) or None (every valid one).
    A trace named twice (even by another path to the same file) is an error; repeated
    policies and scopes count once. ``out`` holds the sweep's settings in its Parquet
    metadata, and ``resume`` refuses a table made with other settings.
    """
    traces = [str(t) for t in traces]
    policies, scopes = list(dict.fromkeys(policies)), list(dict.fromkeys(scopes))
    _check_names(traces, policies, scopes)
    if executor not in _EXECUTORS:
        raise MoecacheError(f"unknown executor {executor!r}: choose local or dask")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise MoecacheError(f"--workers must be an integer of at least 1, got {workers!r}")
    if resume and overwrite:
        raise MoecacheError("--resume keeps an existing table and --force replaces it: pass one of them")
    settings = SweepSettings(None, per_token, bandwidth, latency, check_seed(seed))
    _settings_meta(settings)  # bandwidth and latency read before any work
    with _EXECUTORS[executor](workers, scheduler) as pool:
        # fail fast, before any cell, on a bad trace; the largest trace bounds the capacities
        largest = max(_results(pool, _largest_capacity, [(path, tuple(scopes), per_token) for path in traces],
                               ordered=True))
        if capacities is not None:
            settings = replace(settings, capacities=tuple(chosen_capacities(capacities, largest)))
        if out is None:
            return _sweep(pool, traces, policies, scopes, settings, None, pd.DataFrame(), progress)
        parquet, csv = results_paths(out)
        with output_lock(parquet):
            done = _previous(parquet, csv, settings, resume=resume, overwrite=overwrite)
            return _sweep(pool, traces, policies, scopes, settings, (parquet, csv), done, progress)


def _check_names(traces: list[str], policies: list[str], scopes: list[str]) -> None:
    for what, names in (("traces", traces), ("policies", policies), ("scopes", scopes)):
        if not names:
            raise MoecacheError(f"--{what} names none: give at least one")
    for policy in policies:
        check_policy(policy)
    for scope in scopes:
        check_scope(scope)
    seen: dict[tuple[int, int] | str, str] = {}
    for path in traces:
        try:  # a local path or file:// URI by its file; a URI of other storage by its text
            local = os_path(path)
            info = None if local is None else os.stat(local)
        except (OSError, MoecacheError):
            info = None  # Trace.load names the problem
        key: tuple[int, int] | str = path if info is None else (info.st_dev, info.st_ino)
        if key in seen:
            raise MoecacheError(f"{path}: trace given twice (also as {seen[key]}); a sweep runs each once")
        seen[key] = path


def _settings_meta(settings: SweepSettings) -> dict[str, Any]:
    """What must match for resumed rows to belong to one table (rates and times parsed)."""
    return {"capacities": None if settings.capacities is None else list(settings.capacities),
            "per_token": settings.per_token,
            "bandwidth": None if settings.bandwidth is None else parse_bandwidth(settings.bandwidth),
            "latency": parse_duration(settings.latency), "seed": settings.seed}


_OPTIONS = {"capacities": "--capacities", "per_token": "--per-token", "bandwidth": "--bandwidth (bytes/s)",
            "latency": "--latency (s)", "seed": "--seed"}


def _previous(parquet: Path, csv: Path, settings: SweepSettings, *, resume: bool,
              overwrite: bool) -> pd.DataFrame:
    """The finished rows to keep: those of a resumed table made with the same settings."""
    if overwrite:
        return pd.DataFrame()
    if csv.exists() and not parquet.exists():
        raise MoecacheError(f"{csv}: already exists (pass --force to overwrite)")
    if not parquet.exists():
        return pd.DataFrame()
    if not resume:
        raise MoecacheError(f"{parquet}: already exists (pass --resume to continue it or --force)")
    raw = read_table_meta(parquet).get(SETTINGS_KEY)
    try:
        stored = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise MoecacheError(f"{parquet}: not a table written by `moecache sweep` (no sweep settings): "
                            "nothing to resume; pass --force to replace it")
    current = _settings_meta(settings)
    for key, option in _OPTIONS.items():
        if stored.get(key) != current[key]:
            raise MoecacheError(f"{parquet}: made with {option} {_shown(stored.get(key))}, this sweep "
                                f"has {_shown(current[key])}: resume with the same settings, or choose "
                                "another --out")
    done = read_table(parquet)
    missing = [c for c in KEY_COLUMNS if c not in done.columns]
    if missing:
        raise MoecacheError(f"{parquet}: not a sweep table: missing column {missing[0]!r}")
    return done


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, list) and len(value) > 6:
        return f"[{value[0]}, {value[1]}, ..., {value[-1]}] ({len(value)} values)"
    return json.dumps(value)


def _sweep(pool: Pool, traces: list[str], policies: list[str], scopes: list[str], settings: SweepSettings,
           outputs: tuple[Path, Path] | None, done: pd.DataFrame, progress: bool) -> pd.DataFrame:
    """Run the cells not in ``done`` (keyed by the trace as given), rewriting ``outputs``
    after each."""
    finished = set(zip(done["trace"], done["policy"], done["scope"], strict=True)) if len(done) else set()
    cells = [(t, p, s, settings) for t in traces for p in policies for s in scopes
             if (t, p, s) not in finished]
    frames = [done] if len(done) else []
    meta = {SETTINGS_KEY: json.dumps(_settings_meta(settings))}
    with tqdm(total=len(cells), desc="sweep", unit="cell", disable=not progress) as bar:
        for frame in _results(pool, run_cell, cells, ordered=False):
            frames.append(frame)
            if outputs is not None:
                table = _tidy(frames)
                write_table(table, outputs[0], meta=meta)
                write_table(table, outputs[1])
            bar.update()
    return _tidy(frames)


def _tidy(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=KEY_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(KEY_COLUMNS, ignore_index=True)


@dataclass(frozen=True)
class Pool:
    """Where calls run: ``submit(fn, *args)`` returns a future (``result()``, ``cancel()``),
    ``completed(futures)`` yields them as they finish."""

    submit: Callable[..., Any]
    completed: Callable[[list], Iterable[Any]]


def _results(pool: Pool, fn: Callable[..., Any], calls: list[tuple], *, ordered: bool) -> Iterator[Any]:
    """``fn(*args)`` for every ``args`` of ``calls`` on ``pool``, in the order of ``calls``
    or as they finish; the first failure is raised and the calls not yet run are cancelled."""
    futures = [pool.submit(fn, *args) for args in calls]
    try:
        for future in futures if ordered else pool.completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


@contextlib.contextmanager
def _local(workers: int | None, scheduler: str | None) -> Iterator[Pool]:
    """Calls on local threads (the numba kernels release the GIL)."""
    if scheduler is not None:
        raise MoecacheError("--scheduler needs --executor dask")
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as threads:
        yield Pool(threads.submit, as_completed)


@contextlib.contextmanager
def _dask(workers: int | None, scheduler: str | None) -> Iterator[Pool]:
    """Calls on a dask.distributed cluster: the one at ``scheduler``, else a local one.
    Connecting happens here, before any work, and gives up after CONNECT_TIMEOUT seconds.
    Calls carry trace paths, never trace data: each worker reads its traces from storage."""
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise MoecacheError("--executor dask needs dask.distributed: pip install 'moecache[dask]'") from None
    with contextlib.ExitStack() as stack:
        cluster = None if scheduler else stack.enter_context(LocalCluster(
            n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, dashboard_address=None))
        try:
            client = Client(scheduler or cluster, timeout=f"{CONNECT_TIMEOUT}s")
        except (OSError, ValueError, TypeError) as err:
            raise MoecacheError(f"--scheduler {scheduler}: cannot connect: {first_line(err)}") from None
        stack.enter_context(client)
        yield Pool(lambda fn, *args: client.submit(fn, *args, pure=False), dask_completed)


_EXECUTORS = {"local": _local, "dask": _dask}
