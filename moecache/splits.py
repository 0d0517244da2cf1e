"""Train/test splits by sequence: policies or prefetchers fitted on a profile are scored
only on sequences they did not see (``moecache rank``, ``moecache timeline``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import MoecacheError
from .trace import Trace
from .trace_format import OPTIONAL_COLUMNS


@dataclass(frozen=True, eq=False)
class Split:
    """A trace reordered as training sequences then test sequences."""

    trace: Trace
    train_seqs: np.ndarray  # sequence ids of the training part, ascending
    train_tokens: int  # the first train_tokens tokens of ``trace`` are the training part

    def train_steps(self, per_token: bool = False) -> int:
        """Steps of the replay that belong to the training part."""
        if per_token:
            return self.train_tokens
        return int(self.trace.step[self.train_tokens])  # steps are renumbered 0, 1, ...; a test part exists


def split_by_sequence(trace: Trace, train_fraction: float = 0.5, seed: int = 0) -> Split:
    """Training sequences (round(``train_fraction`` x S), kept within 1..S-1, drawn by a
    permutation seeded with ``seed``) first, then the test sequences."""
    check_fraction(train_fraction)
    seqs = np.unique(trace.seq)
    if len(seqs) < 2:
        raise MoecacheError(f"{trace.source}: a train/test split needs at least 2 sequences, "
                            f"the trace has {len(seqs)}")
    count = min(len(seqs) - 1, max(1, round(train_fraction * len(seqs))))
    train = np.sort(np.random.default_rng(seed).permutation(seqs)[:count])
    is_test = ~np.isin(trace.seq, train)
    order = np.argsort(is_test, kind="stable")
    part, step = is_test[order], trace.step[order]
    new_step = np.concatenate([[0], np.cumsum((np.diff(part) != 0) | (np.diff(step) != 0))]).astype(np.int64)
    arrays = {name: getattr(trace, name)[order] for name in ("experts", "seq", "pos", "token_id", "phase")}
    for name in OPTIONAL_COLUMNS:
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)[order]
    reordered = replace(trace, step=new_step, meta=dict(trace.meta), **arrays)
    return Split(reordered, train, int((~is_test).sum()))


def check_fraction(train_fraction: float) -> float:
    """``train_fraction`` if it is a number strictly between 0 and 1."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0 < train_fraction < 1:
        raise MoecacheError(f"train fraction must be a number between 0 and 1 (exclusive), "
                            f"got {train_fraction!r}")
    return float(train_fraction)
