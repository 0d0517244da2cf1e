"""Previous token: the same layer's experts of the previous step."""

from __future__ import annotations

import numpy as np

from ._select import top_batches
from .base import Lookahead, Prefetcher


def batches(view: Lookahead):
    req = view.requests
    layers = req.num_layers
    # batch p = the set of position p - L (empty for the first step), kept within the budget
    lengths = np.diff(req.offsets)
    shifted = np.concatenate([np.zeros(layers, np.int64), lengths[:-layers]])
    offsets = np.concatenate([[0], np.cumsum(shifted)]).astype(np.int64)
    stop = req.offsets[-layers - 1] if len(req.offsets) > layers else 0
    rank = None if view.scores is None else view.scores[:stop]
    return top_batches(req.ids[:stop], offsets, rank, view.budget, layers)


PREFETCHER = Prefetcher(
    name="previous-token", batches=batches, max_depth_layers=True,
    description="the experts the same layer used for the previous token (temporal locality; "
    "largest router weights first within the budget)",
    source="the temporal-locality baseline of ReMoE (ICML 2026) and fMoE")
