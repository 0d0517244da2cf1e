"""Policies written in plain Python, run by the same driver as the compiled ones.

Subclass :class:`PythonPolicy`, override the hooks, and pass the class (or an instance)
as ``policy=`` to ``mc.replay`` or ``mc.curve``. The driver (``policies/driver.py``)
calls the hooks exactly as it calls a compiled policy's (docs/semantics.md, "Kernel
contract"); ``self`` is the state. Slow (Python per request) and exact.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np

from moecache.policies import Hooks, Param, Policy


class PythonPolicy:
    """Base class of a plain-Python policy: override ``victim`` and whichever of the other
    hooks the policy needs (the defaults do nothing and keep every miss).

    ``name`` labels results; ``params`` declares parameters, read in ``reset`` from the
    ``params`` array (Param order). Each run works on a fresh copy of the instance. A
    policy that sets ``needs_scores = True`` finds the router weight of every entry of ``keys``
    in ``self.scores`` (float32) during ``reset`` and after; replays of traces without
    weights refuse it.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = "a policy written in Python"
    params: ClassVar[tuple[Param, ...]] = ()
    admission: ClassVar[str] = "demand"
    needs_scores: ClassVar[bool] = False

    def reset(self, keys: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, capacity: int,
              params: np.ndarray, seed: int) -> None:
        """Start of a run: the whole request stream, key sizes, capacity, parameters, seed."""

    def access(self, key: int, now: int, hit: bool) -> None:
        """Each key of demand request ``now``, after the request's admissions."""

    def admit(self, key: int, now: int) -> None:
        """Every insertion, demand or prefetch (before request ``now``)."""

    def victim(self, resident: np.ndarray, pinned: np.ndarray, mark: int) -> int:
        """A key to evict: one with ``resident[key]`` and ``pinned[key] != mark``."""
        raise NotImplementedError(f"{type(self).__name__} must define victim()")

    def evict(self, key: int) -> None:
        """``key`` leaves the cache (the one ``victim`` returned)."""

    def keep(self, key: int, now: int, resident: np.ndarray, pinned: np.ndarray, mark: int) -> bool:
        """Bypass policies (``admission = "bypass"``): cache the demand miss ``key``?"""
        return True

    def as_policy(self) -> Policy:
        """A registry record whose hooks run a fresh copy of this instance."""
        template = self
        cls = type(self)

        def init(keys, offsets, sizes, capacity, params, seed, scores):
            state = copy.deepcopy(template)
            state.scores = scores
            state.reset(keys, offsets, sizes, int(capacity), params, int(seed))
            return state

        hooks = Hooks(init, cls.access, cls.admit, cls.victim, cls.evict, cls.keep)
        return Policy(name=self.name or cls.__name__, description=self.description, hooks=hooks,
                      admission=self.admission, params=self.params, needs_scores=cls.needs_scores)
