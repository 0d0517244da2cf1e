"""Array indices that numba needs not wrap around.

numba reads ``a[i]`` for a signed ``i`` as ``a[i + len(a)]`` when ``i`` is negative, a few
instructions on every access that the hot loops of the kernels feel (LRU's masks kernel
runs half again as fast without them); an unsigned index skips that.
"""

from numba import njit, uint64


@njit(cache=True, inline="always")
def cell(i):
    """``i`` (never negative) as an unsigned index."""
    return uint64(i)
