"""Cache replacement policies, one numba kernel per module (see ``_state`` for the contract).

``KERNELS[name](keys, offsets, sizes, capacity, seed) -> hits per request``.
"""

from . import fifo, lfu, lru, opt, opt_bypass, random

KERNELS = {
    "lru": lru.simulate,
    "fifo": fifo.simulate,
    "lfu": lfu.simulate,
    "opt": opt.simulate,
    "opt-bypass": opt_bypass.simulate,
    "random": random.simulate,
}
POLICIES = tuple(KERNELS)
# policies that keep every fetched expert (demand admission, docs/semantics.md); opt bounds these
DEMAND_POLICIES = tuple(p for p in POLICIES if p != "opt-bypass")

__all__ = ["DEMAND_POLICIES", "KERNELS", "POLICIES"]
