"""A fair ranking of policies: hit rate and share of the LRU-to-OPT gap on held-out sequences.

The sequences of each trace are split by a seeded permutation: ``train_fraction`` of them
(at least one, and at least one left for testing) form the training part. The replayed
trace is the training sequences followed by the test sequences, each part in trace order,
steps renumbered so that no step mixes the two. Every policy replays the whole of it
(caches warm from training) and is scored only on the test requests. A policy with a
``train`` parameter (``pinned``) gets the training share of the requests, so it is fitted
on training sequences only. ``gap_share = (hits_P - hits_LRU) / (hits_OPT - hits_LRU)``
on the test requests, at each capacity; undefined (NaN) where OPT gains nothing on LRU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moecache.policies import POLICIES, REGISTRY, Choice, choose, resolve

from .errors import MoecacheError
from .files import atomic_write, output_lock
from .plots import DPI, policy_style
from .replay import replay
from .requests import Requests
from .splits import Split, check_fraction, split_by_sequence
from .tables import write_table
from .trace import Trace
from .trace_io import has_weights
from .validate import check_scope, chosen_capacities, top_capacity

RANKING_COLUMNS = ["trace", "router", "policy", "capacity", "test_requests", "hit_rate", "gap_share"]
BASELINES = ("lru", "opt")  # the ends of the gap; always replayed


def fitted(policy: str | Choice, train_steps: int, steps: int, layers: int) -> Choice:
    """``policy`` resolved, with a ``train`` parameter set to the training share of the
    requests: ceil(train x R) is exactly the training requests in either scope."""
    choice = resolve(policy)
    names = [p.name for p in choice.policy.params]
    if "train" not in names:
        return choice
    share = train_steps / steps
    while any(math.ceil(share * steps * m) > train_steps * m for m in (1, layers)):
        share = math.nextafter(share, 0.0)  # float rounding must not count a test request
    args = dict(zip(names, choice.params, strict=True))
    return choose(choice.policy, {**args, "train": share})


def held_out_hits(split: Split, policy: str | Choice, capacity: int, scope: str = "layer",
                  per_token: bool = False, seed: int = 0) -> tuple[int, int]:
    """(hits, requests) of ``policy`` on the test steps of ``split``, caches warm from training."""
    req = Requests.from_trace(split.trace, per_token=per_token)
    start = split.train_steps(per_token)
    choice = fitted(policy, start, req.num_steps, split.trace.num_layers)
    events = replay(split.trace, choice, capacity, scope, per_token=per_token, seed=seed, requests=req,
                    record_events=True).events
    hits = int(events.loc[events["step"] >= start, "hits"].sum())
    return hits, int(req.set_sizes[start:].sum())


def rank(traces: Iterable[str | os.PathLike | Trace], policies: Sequence[str] | None,
         capacities: str | Iterable[int], scope: str = "layer", train_fraction: float = 0.5,
         seed: int = 0, per_token: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy rows, ranking table) of ``policies`` (plus lru and opt) on each trace's test split.
    ``policies=None`` ranks every registered policy the traces allow (those that read router
    weights only if every trace has them); a named one a trace cannot run is an error.

    The rows hold one (trace, policy, capacity) each; the table one policy each, best first,
    pooled over every trace and capacity: gap share of the summed hits (sum of hits_P -
    hits_LRU over sum of hits_OPT - hits_LRU, so a cell where OPT barely beats LRU cannot
    dominate, as it would a mean of ratios) and hit rate of the summed test requests.
    """
    check_scope(scope)
    check_fraction(train_fraction)
    traces = list(traces)
    paths = [Path(item).resolve() for item in traces if not isinstance(item, Trace)]
    if len(set(paths)) != len(paths):
        twice = next(path for path in paths if paths.count(path) > 1)
        raise MoecacheError(f"{twice}: the same trace is given twice")
    weighted = all(item.weights is not None if isinstance(item, Trace) else has_weights(item)
                   for item in traces)
    if policies is None:
        policies = [name for name in POLICIES if weighted or not REGISTRY[name].needs_scores]
    names = list(dict.fromkeys([*policies, *BASELINES]))
    scores = any(resolve(name).policy.needs_scores for name in names)  # a bad policy fails here
    rows = []
    for item in traces:
        trace = item if isinstance(item, Trace) else Trace.load(item, weights=scores)
        label = trace.source if isinstance(item, Trace) else str(item)
        split = split_by_sequence(trace, train_fraction, seed)
        for capacity in chosen_capacities(capacities, top_capacity(trace, scope)):
            for name in names:
                hits, requests = held_out_hits(split, name, capacity, scope, per_token, seed)
                rows.append({"trace": label, "router": trace.meta.get("router"), "policy": name,
                             "capacity": capacity, "test_requests": requests, "hits": hits})
    frame = pd.DataFrame(rows)
    cells = pd.MultiIndex.from_frame(frame[["trace", "capacity"]])
    lru, opt = (frame[frame["policy"] == name].set_index(["trace", "capacity"])["hits"].reindex(cells)
                .to_numpy(float) for name in BASELINES)
    frame["hit_rate"] = frame["hits"] / frame["test_requests"]
    frame["gap_share"] = gap_share(frame["hits"].to_numpy(float), lru, opt)
    frame["lru_hits"], frame["opt_hits"] = lru, opt
    sums = frame.groupby("policy", sort=False)[["hits", "lru_hits", "opt_hits", "test_requests"]].sum()
    table = pd.DataFrame({
        "policy": sums.index,
        "gap_share": gap_share(sums["hits"].to_numpy(float), sums["lru_hits"].to_numpy(),
                               sums["opt_hits"].to_numpy()),
        "hit_rate": (sums["hits"] / sums["test_requests"]).to_numpy(),
    }).sort_values(["gap_share", "hit_rate"], ascending=False, na_position="last", ignore_index=True)
    return frame[RANKING_COLUMNS], table


def gap_share(hits: np.ndarray, lru: np.ndarray, opt: np.ndarray) -> np.ndarray:
    """(hits - LRU's) / (OPT's - LRU's): 0 for LRU, 1 for Belady, NaN where OPT gains nothing."""
    return (hits - lru) / np.where(opt != lru, opt - lru, np.nan)


def ranking_figure(frame: pd.DataFrame) -> Figure:
    """Hit rate and gap share vs capacity of every policy, one row of two panels per trace."""
    traces = list(dict.fromkeys(frame["trace"]))
    fig = Figure(figsize=(11.0, 3.6 * len(traces) + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(traces), 2, squeeze=False))
    policies = list(dict.fromkeys(frame["policy"]))
    colors = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    for (hit_ax, gap_ax), trace in zip(axes, traces, strict=True):
        rows = frame[frame["trace"] == trace]
        router = rows["router"].iloc[0]
        for policy in policies:
            own = rows[rows["policy"] == policy]
            x = own["capacity"].to_numpy(float)
            style = policy_style(policy.partition(":")[0], len(x))
            hit_ax.plot(x, 100.0 * own["hit_rate"].to_numpy(float), color=colors[policy], label=policy,
                        **style)
            gap_ax.plot(x, own["gap_share"].to_numpy(float), color=colors[policy], **style)
        hit_ax.set_ylabel("hit rate on test sequences (%)")
        gap_ax.set_ylabel("share of the LRU-to-OPT gap")
        gap_ax.axhline(0.0, color="#888888", linewidth=0.8)
        gap_ax.axhline(1.0, color="#888888", linewidth=0.8)
        for ax, what in ((hit_ax, "hit rate"), (gap_ax, "gap share")):
            ax.set_title(f"{what}: {Path(trace).name}" + (f" (router {router})" if router else ""),
                         fontsize=10)
            ax.set_xlabel("capacity (experts)")
            ax.grid(True, alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8,
               title="policy", frameon=False)
    return fig


def ranking_paths(out: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """The files :func:`write_ranking` writes in ``out``; an existing one needs ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoecacheError(f"{out}: is a file, expected a folder for the ranking")
    paths = [out / "ranking.csv", out / "table.csv", out / "ranking.png"]
    for path in paths:
        if path.exists() and not overwrite:
            raise MoecacheError(f"{path}: already exists (pass --force to overwrite)")
    return paths


def write_ranking(frame: pd.DataFrame, table: pd.DataFrame, out: str | os.PathLike, *,
                  overwrite: bool = False) -> list[Path]:
    """ranking.csv, table.csv and ranking.png in folder ``out``, each written atomically."""
    paths = ranking_paths(out, overwrite=overwrite)
    write_table(frame, paths[0])
    write_table(table, paths[1])
    fig = ranking_figure(frame)
    with output_lock(paths[2]), atomic_write(paths[2]) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return paths
