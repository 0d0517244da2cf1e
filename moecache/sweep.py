"""Sweeps: traces x policies x scopes x capacities into one tidy, resumable results table.

A cell is (trace, policy, scope); it yields one row per capacity from :func:`curve`
(one stack pass for lru/lfu/opt). Cells run on local threads (the numba kernels release
the GIL) or on a dask.distributed cluster. After every finished cell the table is
rewritten atomically, as Parquet and CSV side by side, so an interrupted sweep keeps
its finished cells and ``resume=True`` skips them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from moecache.policies import POLICIES

from .curve import curve
from .errors import MoecacheError
from .replay import SCOPES
from .requests import Requests
from .tables import read_table, write_table
from .trace import Trace

KEY_COLUMNS = ["trace", "policy", "scope", "capacity"]


@dataclass(frozen=True)
class SweepSettings:
    """What every cell of one sweep shares."""

    capacities: tuple[int, ...] | None = None
    per_token: bool = False
    bandwidth: str | None = None
    latency: str = "0"
    seed: int = 0


@lru_cache(maxsize=8)
def _load(path: str, per_token: bool) -> tuple[Trace, Requests]:
    trace = Trace.load(path, weights=False)
    return trace, Requests.from_trace(trace, per_token=per_token)


def run_cell(path: str, policy: str, scope: str, settings: SweepSettings) -> pd.DataFrame:
    """All capacities of one (trace, policy, scope), with the trace's metadata columns."""
    trace, req = _load(path, settings.per_token)
    top = trace.num_experts * (trace.num_layers if scope == "global" else 1)
    smallest = int(req.layer_totals["largest"].max())
    wanted = settings.capacities or range(smallest, top + 1)
    capacities = [c for c in wanted if smallest <= c <= top]
    if not capacities:
        return pd.DataFrame(columns=KEY_COLUMNS)
    frame = curve(trace, policy, scope, capacities=capacities, bandwidth=settings.bandwidth,
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
    capacities: Iterable[int] | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    per_token: bool = False,
    bandwidth: str | None = None,
    latency: str = "0",
    seed: int = 0,
    executor: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every (trace, policy, scope) cell at the given capacities; returns the tidy table."""
    traces = [str(t) for t in traces]
    policies, scopes = list(policies), list(scopes)
    for policy in policies:
        if policy not in POLICIES:
            raise MoecacheError(f"unknown policy {policy!r}: choose from {', '.join(POLICIES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise MoecacheError(f"unknown scope {scope!r}: choose layer or global")
    if executor not in ("local", "dask"):
        raise MoecacheError(f"unknown executor {executor!r}: choose local or dask")
    for path in traces:
        Trace.load(path, weights=False)  # fail fast, before any work, on a bad trace
    settings = SweepSettings(None if capacities is None else tuple(sorted(set(capacities))),
                             per_token, bandwidth, latency, seed)
    parquet, csv = results_paths(out) if out is not None else (None, None)
    done = pd.DataFrame()
    if parquet is not None and parquet.exists():
        if resume:
            done = read_table(parquet)
        elif not overwrite:
            raise MoecacheError(f"{parquet}: already exists (pass --resume to continue it or --force)")
    finished = set(zip(done["trace"], done["policy"], done["scope"], strict=True)) if len(done) else set()
    cells = [(t, p, s) for t in traces for p in policies for s in scopes if (t, p, s) not in finished]
    frames = [done] if len(done) else []
    run = _run_dask if executor == "dask" else _run_local
    with tqdm(total=len(cells), desc="sweep", unit="cell", disable=not progress) as bar:
        for frame in run(cells, settings, workers, scheduler):
            frames.append(frame)
            if parquet is not None:
                table = _tidy(frames)
                write_table(table, parquet)
                write_table(table, csv)
            bar.update()
    return _tidy(frames)


def _tidy(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=KEY_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(KEY_COLUMNS, ignore_index=True)


def _run_local(cells: list, settings: SweepSettings, workers: int | None,
               scheduler: str | None) -> Iterator[pd.DataFrame]:
    if scheduler is not None:
        raise MoecacheError("--scheduler needs --executor dask")
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(run_cell, *cell, settings) for cell in cells]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _run_dask(cells: list, settings: SweepSettings, workers: int | None,
              scheduler: str | None) -> Iterator[pd.DataFrame]:
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise MoecacheError("--executor dask needs dask.distributed: pip install 'moecache[dask]'") from None
    cluster = None if scheduler else LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                                  threads_per_worker=1, dashboard_address=None)
    try:
        with Client(scheduler or cluster) as client:
            futures = [client.submit(run_cell, *cell, settings, pure=False) for cell in cells]
            for future in dask_completed(futures):
                yield future.result()
            del futures
    finally:
        if cluster is not None:
            cluster.close()
