"""Prefetchers, one module each, found here by their ``PREFETCHER`` records.

A prefetcher turns a trace's routing (and, if it learns, its training steps) into one
batch of experts per (step, MoE layer) position, issued ``depth`` positions ahead of the
position it serves (docs/semantics.md, "Timeline"). ``REGISTRY`` maps names to records;
``plan`` checks a choice and builds the batches.
"""

from __future__ import annotations

import importlib
import pkgutil

from moecache.errors import MoecacheError
from moecache.replay import Prefetch

from .base import Lookahead, Prefetcher


def _discover() -> dict[str, Prefetcher]:
    found: dict[str, Prefetcher] = {}
    for module in pkgutil.iter_modules(__path__):
        record = getattr(importlib.import_module(f"{__name__}.{module.name}"), "PREFETCHER", None)
        if isinstance(record, Prefetcher):
            if record.name in found:
                raise RuntimeError(f"two prefetcher modules declare the name {record.name!r}")
            found[record.name] = record
    return dict(sorted(found.items()))


REGISTRY: dict[str, Prefetcher] = _discover()


def resolve(name: str) -> Prefetcher:
    """The registered prefetcher called ``name``; an unknown name is a one-line error."""
    if name not in REGISTRY:
        raise MoecacheError(f"unknown prefetcher {name!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def plan(name: str, view: Lookahead) -> Prefetch:
    """The batches of prefetcher ``name`` for ``view``, after checking that it can run there."""
    record = resolve(name)
    if view.depth < 1:
        raise MoecacheError(f"prefetch depth must be at least 1 MoE layer, got {view.depth}")
    if view.budget < 1:
        raise MoecacheError(f"prefetch budget must be at least 1 expert per layer, got {view.budget}")
    if record.fixed_depth is not None and view.depth != record.fixed_depth:
        raise MoecacheError(f"prefetcher {name} runs at depth {record.fixed_depth} only (its signal "
                            f"exists that far ahead), got depth {view.depth}")
    if record.max_depth_layers and view.depth > view.requests.num_layers:
        raise MoecacheError(f"prefetcher {name}: depth {view.depth} is more than the trace's "
                            f"{view.requests.num_layers} MoE layers (its signal is not known that early)")
    if record.needs_training and view.train_steps < 1:
        raise MoecacheError(f"prefetcher {name} is fitted on training sequences: give a train fraction "
                            "(--train-fraction) and a trace with at least 2 sequences")
    return record.batches(view)


__all__ = ["REGISTRY", "Lookahead", "Prefetcher", "plan", "resolve"]
