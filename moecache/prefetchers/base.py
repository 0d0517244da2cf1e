"""What a prefetcher is and what it sees."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moecache.replay import Prefetch
from moecache.requests import Requests
from moecache.trace import Trace


@dataclass(frozen=True, eq=False)
class Lookahead:
    """A prefetcher's input: the replay's requests (step-major positions p = t L + l), the
    router weight of each entry (None without weights), the depth in positions at which
    batches are issued, the budget in experts per batch, how many leading steps are
    training steps (0: none), and the trace (for signals recorded beside the routing)."""

    requests: Requests
    scores: np.ndarray | None
    depth: int
    budget: int
    train_steps: int = 0
    trace: Trace | None = None


@dataclass(frozen=True)
class Prefetcher:
    """A registered prefetcher: ``batches(view)`` gives one batch per position (at most
    ``view.budget`` experts, most wanted first), from what is known ``view.depth``
    positions earlier. ``max_depth_layers``: its signal is known at most one step ahead;
    ``needs_training``: it is fitted on the training steps; ``fixed_depth``: the only depth
    it runs at (its signal exists exactly that many positions ahead)."""

    name: str
    description: str
    batches: Callable[[Lookahead], Prefetch]
    source: str
    needs_training: bool = False
    max_depth_layers: bool = False
    fixed_depth: int | None = None
