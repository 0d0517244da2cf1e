"""Cache replacement policies, one numba kernel per module (see ``_state`` for the contract).

``KERNELS[name](keys, offsets, sizes, capacity, seed) -> hits per request``.
"""

from . import fifo, lfu, lru, opt, random

KERNELS = {
    "lru": lru.simulate,
    "fifo": fifo.simulate,
    "lfu": lfu.simulate,
    "opt": opt.simulate,
    "random": random.simulate,
}
POLICIES = tuple(KERNELS)

__all__ = ["KERNELS", "POLICIES"]
