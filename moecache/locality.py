"""Routing-only locality: expert reuse within a window of steps, per layer, with bootstrap bands.

Reuse within a window. For w >= 1, a step's expert is *reused within w steps* if the
same layer used it in one of the previous w steps (trace order, the window cut at the
start of the trace)::

    reuse(w) = Σ_{t>=1} Σ_l |E[t,l] ∩ (E[t-1,l] ∪ ... ∪ E[max(0,t-w),l])|  /  Σ_{t>=1} Σ_l |E[t,l]|

Step 0 is left out of both sums and every step counts in the denominator of every w, so
``reuse(1)`` is exactly the ``reuse_rate`` of docs/semantics.md (``mc.replay(...).reuse_rate``) and
``reuse(w)`` never decreases with w. Like ``reuse_rate`` the window runs across sequence
boundaries (steps in trace order). Per layer, the sums run over one layer only.

It takes one pass: an expert at step t is reused within w steps iff its previous use in
that layer was at step t - g with g <= w, so a histogram of those gaps g gives every w.

Bootstrap. :func:`bootstrap_over_sequences` resamples whole sequences with replacement
(blocks of sequences when a batched trace serves several in the same steps), builds the
resampled trace by concatenating their tokens, and evaluates a statistic on each; the
percentiles of the replicates (:func:`bootstrap_band`) give confidence bands. One
replicate costs one gather of the trace's ids plus the statistic on a trace of the same
size: with reuse by window, about 0.1-0.2 s per 10 M expert ids on one core; with
``curve`` add one stack pass per (policy, scope).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

from .errors import MoecacheError
from .requests import Requests
from .trace import Trace


@njit(cache=True, nogil=True)
def _gap_histogram(ids, offsets, num_layers, num_experts, max_window):
    """Per layer, entries of steps t >= 1 by the gap to the same expert's previous use.

    Column g (1 <= g <= max_window) counts entries whose previous use was at step t - g;
    column max_window + 1 the others (older or never used); column 0 stays empty.
    """
    hist = np.zeros((num_layers, max_window + 2), np.int64)
    last = np.full(num_layers * num_experts, -1, np.int64)
    far = max_window + 1
    for r in range(offsets.shape[0] - 1):
        layer = r % num_layers
        t = r // num_layers
        base = layer * num_experts
        for j in range(offsets[r], offsets[r + 1]):
            key = base + ids[j]
            if t > 0:
                seen = last[key]
                gap = far if seen < 0 else t - seen
                hist[layer, min(gap, far)] += 1
            last[key] = t
    return hist


def window_counts(trace: Trace, max_window: int = 16, *, per_token: bool = False,
                  requests: Requests | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(reused, requests): ``reused[w - 1, l]`` = Σ_{t>=1} |E[t,l] ∩ window_w|, ``requests[l]``
    = Σ_{t>=1} |E[t,l]|, for w = 1..max_window and every MoE layer l."""
    if int(max_window) < 1:
        raise MoecacheError(f"the reuse window must be at least 1 step, got {max_window}")
    req = requests if requests is not None else Requests.from_trace(trace, per_token=per_token)
    hist = _gap_histogram(req.ids, req.offsets, req.num_layers, req.num_experts, int(max_window))
    reused = np.cumsum(hist[:, 1:-1], axis=1).T
    return reused, hist.sum(axis=1)


def reuse_by_window(trace: Trace, max_window: int = 16, *, per_layer: bool = False,
                    per_token: bool = False, requests: Requests | None = None) -> pd.DataFrame:
    """Reuse within the previous w steps, w = 1..max_window (module docstring).

    Pooled over layers: columns ``window``, ``reused``, ``requests``, ``reuse``. With
    ``per_layer=True`` one row per (window, layer), ``layer`` being the model's layer index.
    ``reuse`` is NaN when there is no step after the first.
    """
    reused, total = window_counts(trace, max_window, per_token=per_token, requests=requests)
    windows = np.arange(1, reused.shape[0] + 1)
    if per_layer:
        frame = pd.DataFrame({
            "window": np.repeat(windows, trace.num_layers),
            "layer": np.tile(trace.layers, len(windows)),
            "reused": reused.ravel(),
            "requests": np.tile(total, len(windows)),
        })
    else:
        frame = pd.DataFrame({"window": windows, "reused": reused.sum(axis=1),
                              "requests": np.full(len(windows), total.sum())})
    frame["reuse"] = _ratio(frame["reused"].to_numpy(), frame["requests"].to_numpy())
    return frame


def per_layer_reuse(trace: Trace, *, per_token: bool = False,
                    requests: Requests | None = None) -> pd.DataFrame:
    """The reuse rate of each MoE layer: columns ``layer``, ``reused``, ``requests``, ``reuse``."""
    return reuse_by_window(trace, 1, per_layer=True, per_token=per_token,
                           requests=requests).drop(columns="window")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


# -- bootstrap over sequences ---------------------------------------------------------------

def sequence_blocks(trace: Trace) -> np.ndarray:
    """Token offsets of the resampling units, plus the total: shape (units + 1,).

    A unit is a sequence, or the smallest run of whole steps holding whole sequences when
    steps mix sequences (a batched capture serves a batch in the same steps).
    """
    n = trace.num_tokens
    if n == 0:
        return np.zeros(1, np.int64)
    seq, step = trace.seq, trace.step
    _, first = np.unique(seq, return_index=True)
    _, first_reversed = np.unique(seq[::-1], return_index=True)
    last = n - 1 - first_reversed
    spans = np.zeros(n + 1, np.int64)  # spans[i] > 0: some sequence holds tokens i - 1 and i
    np.add.at(spans, first + 1, 1)
    np.add.at(spans, last + 1, -1)
    inside = np.cumsum(spans)[:n]
    cut = inside == 0
    cut[1:] &= step[1:] != step[:-1]
    cut[0] = True
    return np.append(np.flatnonzero(cut), n).astype(np.int64)


def resample_sequences(trace: Trace, rng: np.random.Generator,
                       blocks: np.ndarray | None = None) -> Trace:
    """A trace of as many units as ``trace``, drawn with replacement and concatenated.

    Steps are renumbered (a unit never shares a step with its neighbour), each drawn copy
    gets its own sequence ids, metadata is kept; weights and logits are dropped.
    """
    blocks = sequence_blocks(trace) if blocks is None else blocks
    units = len(blocks) - 1
    pick = rng.integers(0, units, size=units)
    starts, lengths = blocks[pick], blocks[pick + 1] - blocks[pick]
    out_starts = np.cumsum(lengths) - lengths
    idx = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - out_starts, lengths)
    new_unit = np.zeros(len(idx), bool)
    new_unit[out_starts] = True
    step = trace.step[idx]
    changed = new_unit.copy()
    changed[1:] |= step[1:] != step[:-1]
    copy = np.repeat(np.arange(units, dtype=np.int64), lengths)
    seq_key = copy * (int(trace.seq.max()) - int(trace.seq.min()) + 1) + (trace.seq[idx] - trace.seq.min())
    _, seq = np.unique(seq_key, return_inverse=True)
    return _gathered_trace(
        experts=trace.experts[idx], step=np.cumsum(changed) - 1, seq=seq.astype(np.int32),
        pos=trace.pos[idx], token_id=trace.token_id[idx], phase=trace.phase[idx],
        meta=dict(trace.meta), weights=None, logits=None, source=f"{trace.source} (resampled)",
    )


def _gathered_trace(**values: Any) -> Trace:
    """A Trace from rows of a validated trace, skipping the revalidation (most of the cost).

    Whole units of a valid trace, with steps renumbered in order, are a valid trace. If
    the Trace class has grown a field this does not know, fall back to the constructor.
    """
    obj = object.__new__(Trace)
    for f in dataclasses.fields(Trace):
        if f.name in values:
            value = values[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            return Trace(**values)
        object.__setattr__(obj, f.name, value)
    return obj


def bootstrap_over_sequences(trace: Trace, statistic: Callable[[Trace], Any], n: int = 200,
                             seed: int = 0, *, workers: int | None = 1) -> Any:
    """``statistic`` on ``n`` resamples of ``trace``'s sequences (see :func:`resample_sequences`).

    ``statistic`` returns a number, an array-like (a pandas Series or a column is fine) of
    a fixed shape, or a dict of those; the result stacks the replicates along a new first
    axis: an array of shape (n, ...), or a dict of such arrays. Replicate i draws from its
    own stream of ``SeedSequence(seed)``, so a seed gives the same replicates whatever
    ``workers`` (threads; None = one per CPU; the numba kernels release the GIL). Raises
    MoecacheError if the trace has fewer than two units.
    """
    if int(n) < 1:
        raise MoecacheError(f"the number of bootstrap resamples must be positive, got {n}")
    blocks = sequence_blocks(trace)
    if len(blocks) - 1 < 2:
        raise MoecacheError(f"{trace.source}: bootstrap over sequences needs at least 2 sequences "
                            "that do not share steps, found 1")
    streams = np.random.SeedSequence(int(seed)).spawn(int(n))

    def one(stream: np.random.SeedSequence) -> Any:
        return statistic(resample_sequences(trace, np.random.default_rng(stream), blocks))

    threads = min(int(n), workers or os.cpu_count() or 1)
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            samples = list(pool.map(one, streams))
    else:
        samples = [one(stream) for stream in streams]
    if isinstance(samples[0], dict):
        return {key: np.stack([np.asarray(s[key], float) for s in samples]) for key in samples[0]}
    return np.stack([np.asarray(s, float) for s in samples])


def bootstrap_band(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (low, high) of bootstrap replicates along their first axis."""
    if not 0.0 < level < 1.0:
        raise MoecacheError(f"the confidence level must lie in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        low, high = np.nanquantile(np.asarray(samples, float), [tail, 1.0 - tail], axis=0)
    return low, high


def reuse_by_window_band(trace: Trace, max_window: int = 16, n: int = 200, seed: int = 0, *,
                         level: float = 0.95, per_token: bool = False,
                         workers: int | None = 1) -> pd.DataFrame:
    """:func:`reuse_by_window` (pooled) with ``low`` and ``high`` columns from ``n`` resamples."""
    frame = reuse_by_window(trace, max_window, per_token=per_token)
    samples = bootstrap_over_sequences(
        trace, lambda tr: reuse_by_window(tr, max_window, per_token=per_token)["reuse"], n, seed,
        workers=workers)
    frame["low"], frame["high"] = bootstrap_band(samples, level)
    return frame
