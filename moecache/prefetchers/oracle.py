"""Oracle: each position's true experts, the upper bound of any prefetcher."""

from __future__ import annotations

from ._select import top_batches
from .base import Lookahead, Prefetcher


def batches(view: Lookahead):
    req = view.requests
    return top_batches(req.ids, req.offsets, view.scores, view.budget, req.num_layers)


PREFETCHER = Prefetcher(
    name="oracle", batches=batches,
    description="the experts the router will choose (the largest router weights first within the "
    "budget): the upper bound",
    source="the bound used by MoE-Infinity, ProMoE and SpecMD evaluations")
