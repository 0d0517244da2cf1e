"""Co-activation: a transition table from the experts of the position ``depth`` earlier to
those of the next, counted on the training steps."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._select import top_batches
from .base import Lookahead, Prefetcher


@njit(cache=True)
def _fit(ids, offsets, layers, experts, depth, train_positions):
    """``table[l, a, b]``: among training positions p of layer l, the share of those whose
    source position p - depth chose expert a that chose b."""
    table = np.zeros((layers, experts, experts))
    for p in range(depth, train_positions):
        layer = p % layers
        for i in range(offsets[p - depth], offsets[p - depth + 1]):
            for j in range(offsets[p], offsets[p + 1]):
                table[layer, ids[i], ids[j]] += 1.0
    for layer in range(layers):
        for a in range(experts):
            total = table[layer, a].sum()
            if total > 0:
                table[layer, a] /= total
    return table


@njit(cache=True)
def _predict(ids, offsets, layers, table, depth):
    """Per position, every expert with a positive score (the sum of the transition shares
    from the source position's experts), with its score."""
    experts = table.shape[1]
    num_positions = offsets.shape[0] - 1
    out = np.empty(num_positions * experts, np.int32)
    rank = np.empty(num_positions * experts)
    out_offsets = np.zeros(num_positions + 1, np.int64)
    score = np.zeros(experts)
    fill = 0
    for p in range(num_positions):
        if p >= depth:
            layer = p % layers
            for i in range(offsets[p - depth], offsets[p - depth + 1]):
                score += table[layer, ids[i]]
            for b in range(experts):
                if score[b] > 0:
                    out[fill] = b
                    rank[fill] = score[b]
                    fill += 1
            score[:] = 0.0
        out_offsets[p + 1] = fill
    return out[:fill], out_offsets, rank[:fill]


def batches(view: Lookahead):
    req = view.requests
    layers = req.num_layers
    table = _fit(req.ids, req.offsets, layers, req.num_experts, view.depth, view.train_steps * layers)
    ids, offsets, rank = _predict(req.ids, req.offsets, layers, table, view.depth)
    return top_batches(ids, offsets, rank, view.budget, layers)


PREFETCHER = Prefetcher(
    name="co-activation", batches=batches, needs_training=True,
    description="a table of which experts follow which (the position depth layers earlier), "
    "counted on the training sequences; the most likely first within the budget",
    source="the expert co-activation / transition predictors of MoE-Infinity, ProMoE and fMoE")
