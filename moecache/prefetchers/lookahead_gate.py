"""Lookahead gate: the experts the next MoE layer's router picks from the current layer's
router input, recorded by ``moecache capture --lookahead``."""

from __future__ import annotations

import numpy as np

from moecache.errors import MoecacheError
from moecache.requests import step_scores, step_unions

from ._select import top_batches
from .base import Lookahead, Prefetcher

NAME = "lookahead-gate"


def batches(view: Lookahead):
    """Position (t, l >= 1): the union over step t's tokens of ``lookahead[token, l - 1]``,
    largest lookahead weight (over the tokens) first, else best rank first; l = 0: empty."""
    trace, req = view.trace, view.requests
    if trace is None or trace.lookahead is None:
        source = "the trace" if trace is None else trace.source
        raise MoecacheError(f"prefetcher {NAME}: {source} has no 'lookahead' column "
                            "(capture with --lookahead)")
    layers, steps = req.num_layers, req.num_steps
    starts = trace.step_starts()
    if len(starts) - 1 != steps or trace.num_layers != layers:
        raise MoecacheError(f"prefetcher {NAME}: the requests are not the trace's steps")
    ahead = np.ascontiguousarray(trace.lookahead[:, :-1])  # serves layers 1..L-1
    ids, offsets = step_unions(ahead, starts, req.num_experts)
    if trace.lookahead_weights is not None:
        weights = np.ascontiguousarray(trace.lookahead_weights[:, :-1])
    else:  # rank order: the best rank any token gave the expert
        weights = np.ascontiguousarray(np.broadcast_to(
            -np.arange(trace.top_k, dtype=np.float32), ahead.shape))
    rank = step_scores(ahead, weights, starts, ids, offsets, req.num_experts)
    sizes = np.zeros((steps, layers), np.int64)
    sizes[:, 1:] = np.diff(offsets).reshape(steps, layers - 1)
    return top_batches(ids, np.concatenate([[0], np.cumsum(sizes)]), rank, view.budget, layers)


PREFETCHER = Prefetcher(
    name=NAME, batches=batches, fixed_depth=1,
    description="the experts the next layer's router picks from the current layer's hidden state "
    "(recorded by capture --lookahead; largest weight first within the budget; none for the first layer)",
    source="the gate lookahead of Pre-gated MoE, HOBBIT, ProMoE and AdapMoE")
