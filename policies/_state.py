"""Small numba data structures shared by the policy kernels.

Every kernel sees the same input: ``keys`` (int32), the expert ids of all requests in
order, ``offsets`` (int64, one more than the requests) delimiting each request, whose
keys are distinct and ascending; ``sizes`` (int64 per key) and ``capacity`` in the same
units. It returns the hits of every request (int32). Keys of the current request are
never eviction candidates (DESIGN section 3).
"""

import numpy as np
from numba import njit

# -- doubly linked list over keys, with sentinel node ``head == len(keys)`` -----------


@njit(cache=True, inline="always")
def list_new(num_keys):
    links = np.empty((2, num_keys + 1), np.int64)  # row 0: prev, row 1: next
    links[:, :] = num_keys
    return links


@njit(cache=True, inline="always")
def list_unlink(links, key):
    prev, nxt = links[0, key], links[1, key]
    links[1, prev] = nxt
    links[0, nxt] = prev


@njit(cache=True, inline="always")
def list_append(links, head, key):
    """Insert ``key`` just before the sentinel, i.e. at the newest end."""
    last = links[0, head]
    links[1, last] = key
    links[0, key] = last
    links[1, key] = head
    links[0, head] = key


# -- unordered set of resident keys with O(1) add and remove --------------------------


@njit(cache=True, inline="always")
def slots_new(num_keys):
    """``slots[:count]`` lists residents; ``where[key]`` is its slot or -1."""
    return np.empty(num_keys, np.int64), np.full(num_keys, -1, np.int64)


@njit(cache=True, inline="always")
def slots_remove(slots, where, count, key):
    """Swap-remove ``key``; returns the new count."""
    index = where[key]
    last = slots[count - 1]
    slots[index] = last
    where[last] = index
    where[key] = -1
    return count - 1


@njit(cache=True, inline="always")
def slots_add(slots, where, count, key):
    slots[count] = key
    where[key] = count
    return count + 1


@njit(cache=True)
def check_room(used, size, capacity):
    if used + size > capacity:
        raise ValueError("capacity is below the size of one request")
