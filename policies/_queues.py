"""Several doubly linked queues over the same keys, for policies made of queues and ghost
lists (s3fifo, arc, lirs): each key is on at most one queue at a time.

The arrays are those of ``_state.list_new`` with more sentinels: queue ``q``'s sentinel is
node ``N + q`` (N keys), the sink is the last node. ``list_append`` and ``list_unlink`` of
``_state`` work on them unchanged; ``nxt[head]`` is a queue's oldest key, ``prev[head]``
its newest.
"""

from numba import njit

from ._state import list_append, list_new, list_unlink


@njit(cache=True)
def queues_new(num_keys, count):
    """(prev, next): ``count`` empty queues over keys 0..num_keys-1."""
    prev, nxt, _ = list_new(num_keys + count - 1)
    for head in range(num_keys, num_keys + count):
        prev[head] = head
        nxt[head] = head
    return prev, nxt


@njit(cache=True, inline="always")
def queue_head(prev, count, queue):
    """The sentinel of queue ``queue`` of ``count``."""
    return prev.shape[0] - 1 - count + queue


@njit(cache=True)
def sized_move(where, prev, nxt, used, sizes, count, key, queue):
    """Make ``key`` the newest of ``queue``, keeping ``where[key]`` (its queue, -1 for none)
    and ``used`` (the size each queue holds) true."""
    if where[key] >= 0:
        used[where[key]] -= sizes[key]
    move_to_tail(prev, nxt, queue_head(prev, count, queue), key)
    where[key] = queue
    used[queue] += sizes[key]


@njit(cache=True)
def sized_remove(where, prev, nxt, used, sizes, key):
    """Take ``key`` off its queue, keeping ``where`` and ``used`` true."""
    used[where[key]] -= sizes[key]
    where[key] = -1
    list_unlink(prev, nxt, key)


@njit(cache=True)
def oldest_unpinned(prev, nxt, count, queue, pinned, mark):
    """The oldest key of queue ``queue`` (of ``count``) with ``pinned[key] != mark``, -1 if none."""
    head = queue_head(prev, count, queue)
    key = nxt[head]
    while key != head:
        if pinned[key] != mark:
            return key
        key = nxt[key]
    return -1


@njit(cache=True, inline="always")
def move_to_tail(prev, nxt, head, key):
    """Take ``key`` off its queue (if any) and make it the newest of ``head``'s queue."""
    list_unlink(prev, nxt, key)
    list_append(prev, nxt, head, key)
