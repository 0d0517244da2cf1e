"""Cache replacement policies, one module each, found here by their ``POLICY`` records.

``REGISTRY`` maps each name to its :class:`~.registry.Policy`, ordered by ``rank`` then
name (online policies first, offline bounds last); ``resolve`` turns a user's choice
into a validated :class:`~.registry.Choice`. The hooks' contract is in docs/semantics.md,
"Kernel contract"; docs/adding-a-policy.md walks through a new policy.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from moecache.errors import MoecacheError

from ._state import bit_index
from .registry import Choice, Hooks, Param, Policy, Session, SpanKernel, choose, number, parse_args


def _discover() -> dict[str, Policy]:
    found: list[Policy] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):  # helpers and __main__
            continue
        record = getattr(importlib.import_module(f"{__name__}.{module.name}"), "POLICY", None)
        if isinstance(record, Policy):
            found.append(record)
    names = [p.name for p in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two policy modules declare the same name: {sorted(names)}")
    return {p.name: p for p in sorted(found, key=lambda p: (p.rank, p.name))}


REGISTRY: dict[str, Policy] = _discover()
POLICIES = tuple(REGISTRY)
# policies that keep every fetched expert (docs/semantics.md); opt bounds these
DEMAND_POLICIES = tuple(name for name, p in REGISTRY.items() if p.admission == "demand")
# the fast kernels by name (benchmarks/bench_replay.py times them directly)
KERNELS = {name: p.kernel for name, p in REGISTRY.items() if p.kernel is not None}


def resolve(spec: Any, args: Mapping[str, Any] | None = None) -> Choice:
    """A validated policy choice from ``"lru"``, ``"clock:bits=2"`` (CLI form), a name with
    ``args`` ({"bits": 2}, Python form), a Choice, a PythonPolicy class or instance, or a
    user's file ``"path/to/my_policy.py:MyPolicy[:name=value,...]"`` (moecache/user_policy.py)."""
    if isinstance(spec, Choice) and not args:
        return spec
    if isinstance(spec, str):
        from moecache.user_policy import is_policy_file, load_policy  # it imports this package

        if is_policy_file(spec):
            instance, text = load_policy(spec)
            record = instance.as_policy()
            name, sep = record.name, bool(text)
        else:
            name, sep, text = spec.partition(":")
            name = name.strip()
            if name not in REGISTRY:
                raise MoecacheError(f"unknown policy {name!r}: choose one of {', '.join(REGISTRY)}")
            record = REGISTRY[name]
        if sep and args:
            raise MoecacheError(f"policy {name}: give parameters in the spec or in policy_args, not both")
        given = parse_args(text, name) if sep else dict(args or {})
        return choose(record, given)
    record = getattr(spec() if isinstance(spec, type) else spec, "as_policy", None)
    if record is None:
        raise MoecacheError(f"policy must be a name such as 'lru' or a moecache.PythonPolicy, got {spec!r}")
    return choose(record(), dict(args or {}))


def policy_table() -> str:
    """The README's policy table, in markdown, from the registry."""
    rows = ["| policy | parameters | description |", "|---|---|---|"]
    for p in REGISTRY.values():
        params = "; ".join(q.describe() for q in p.params) or "—"
        rows.append(f"| `{p.name}` | {params} | {p.description} |")
    return "\n".join(rows)


__all__ = ["DEMAND_POLICIES", "KERNELS", "POLICIES", "REGISTRY", "Choice", "Hooks", "Param", "Policy",
           "Session", "SpanKernel", "bit_index", "number", "policy_table", "resolve"]
