"""Metrics at every capacity: one stack pass for lru/lfu/opt, parallel replays otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from moecache.policies import REGISTRY, Choice, resolve
from moecache.policies.stack import LFU, LRU, OPT, depth_histogram

from .parallel import map_parallel
from .replay import replay
from .requests import Requests
from .results import ReplayResult, summarize
from .trace import Trace
from .validate import plan_range

if TYPE_CHECKING:
    import pandas as pd

# the registered stack algorithms, by name: their one-pass method (Policy.stack)
STACK_POLICIES = {name: p.stack for name, p in REGISTRY.items() if p.stack is not None}
_METHODS = {"lru": LRU, "lfu": LFU, "opt": OPT}
PRIORITY_LIMIT = 2**63  # the stack packs each priority into one int64


def one_pass(req: Requests, choice: Choice) -> bool:
    """Whether the stack pass applies: a stack policy whose priorities fit (LFU's need
    (requests + 1) x (entries + 1) below the limit, about 3e9 entries)."""
    if choice.policy.stack != "lfu":
        return choice.policy.stack is not None
    return len(req.offsets) * (len(req.ids) + 1) < PRIORITY_LIMIT


def stack_hits(req: Requests, policy: str, scope: str,
               expert_bytes: list[int] | None = None, workers: int | None = None) -> np.ndarray:
    """Hits at every capacity: array (max capacity + 1, layers or 1), row C = capacity C;
    in layer scope the layers run ``workers`` at a time (default: every core).

    In global scope the layers share one column unless their experts differ in size
    (``expert_bytes``, per layer): a depth histogram per layer of L x E rows no longer
    fits in cache, which costs large models up to 2x. Rows below the largest step set
    are not meaningful (such capacities are invalid).
    """
    num_layers, num_experts = req.num_layers, req.num_experts
    code = _METHODS[STACK_POLICIES[policy]]
    if scope == "layer":
        columns = map_parallel(lambda layer: depth_histogram(*req.layer(layer), num_experts, code, 1)[:, 0],
                             num_layers, workers)
        hist = np.stack(columns, axis=1) if columns else np.zeros((num_experts + 1, 0), np.int64)
    else:
        keys, offsets = req.pooled()
        by_layer = expert_bytes is not None and len(set(expert_bytes)) > 1
        hist = depth_histogram(keys, offsets, num_layers * num_experts, code,
                               num_layers if by_layer else 1)
    hist[0] = 0  # depth 0: first reference, a miss at every capacity
    return np.cumsum(hist, axis=0)


def fetched_bytes(hits: np.ndarray, layer_requests: np.ndarray, expert_bytes: list[int]
                  ) -> np.ndarray:
    """Miss bytes for rows of ``stack_hits`` (per layer, or one column of all layers)."""
    if hits.shape[1] == 1:
        return (layer_requests.sum() - hits[:, 0]) * expert_bytes[0]
    return ((layer_requests - hits) * expert_bytes).sum(axis=1)


def curve(
    trace: Trace,
    policy: Any = "lru",
    scope: str = "layer",
    *,
    capacities: str | Iterable[int] | None = None,
    per_token: bool = False,
    bandwidth: str | float | None = None,
    latency: str | float = 0.0,
    seed: int = 0,
    requests: Requests | None = None,
    workers: int | None = None,
    policy_args: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Replay metrics at many capacities, one row per capacity.

    By default every valid capacity: from the largest step set to E (layer scope) or
    L x E (global scope); ``capacities`` may be a text such as ``"8:64:4"`` (ranges stop
    at E or L x E) or integers, checked by :func:`moecache.validate.plan_range`. ``policy`` and
    ``policy_args`` as in :func:`moecache.replay`. Stack policies (``lru``, ``lfu``,
    ``opt``) take one pass whatever the number of capacities; other policies (and LFU
    past about 3e9 requested experts) replay each capacity, ``workers`` at a time.
    """
    import pandas as pd

    checked = plan_range(trace, resolve(policy, policy_args), scope, capacities=capacities,
                         per_token=per_token, bandwidth=bandwidth, latency=latency, seed=seed,
                         requests=requests)
    choice, req, capacities = checked.policy, checked.requests, list(checked.capacities)
    bytes_per_second, fetch_latency = checked.bandwidth, checked.latency
    if one_pass(req, choice):
        cumulative = stack_hits(req, choice.policy.name, scope, trace.expert_bytes, workers)
        # the routing-only figures; once every expert fits, every reuse hits
        all_reuses = req.layer_totals["requests"] - req.layer_totals["cold_misses"]
        base = summarize(trace, req, all_reuses, choice.label, scope, None, None, bytes_per_second,
                         fetch_latency)
        table = _columns(trace, base, cumulative[checked.rows], capacities)
    else:
        # build what every replay shares once, before the threads
        req.layer_totals  # noqa: B018
        if scope == "global":
            req.pooled()

        def one(capacity: int) -> ReplayResult:
            return replay(trace, choice, capacity, scope, bandwidth=bytes_per_second,
                          latency=fetch_latency, seed=seed, requests=req, workers=1)

        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            rows = list(pool.map(one, capacities))
        table = pd.DataFrame([r.to_dict() for r in rows])
    return table.drop(columns=["memory_bytes"])


def _columns(trace: Trace, base: ReplayResult, hits: np.ndarray, capacities: list[int]
             ) -> pd.DataFrame:
    """The table for ``base`` (the routing-only figures) with the hits of each capacity,
    rows of ``stack_hits``: one ReplayResult whose per-capacity fields are arrays, so its
    properties compute every column at once."""
    import pandas as pd

    total = hits.sum(axis=1)
    sizes = trace.expert_bytes
    miss_bytes = None if sizes is None else \
        fetched_bytes(hits, base.per_layer["requests"].to_numpy(), sizes)
    columns = replace(base, capacity=np.asarray(capacities, np.int64), hits=total,
                      misses=base.requests - total, miss_bytes=miss_bytes)
    return pd.DataFrame(columns.to_dict())
