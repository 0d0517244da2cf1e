"""least-stale beyond the policy contract: the worked example of the rule it follows, and
the collision misses of LRU it removes on a cyclic pass through the layers."""

import numpy as np

import moecache as mc


def hits_per_step(ids, policy, capacity):
    experts = np.asarray(ids, np.int16).reshape(-1, 1, 1)
    trace = mc.Trace.from_arrays(experts, num_experts=max(ids) + 1)
    return mc.replay(trace, policy, capacity, record_events=True).events["hits"].tolist()


def test_worked_example():
    """A B C A B C A D A B C D at C = 3: every interval is 3, so the prediction last + 3
    evicts A at the 8th request (D), then D (its interval is still unknown, so its next
    use is last + 1 = 8, against C's 5 + 3 = 8: the tie goes to the more recent last use),
    then at the 11th C (10 + 1 against B's, A's and D's earlier predictions)."""
    A, B, C, D = 0, 1, 2, 3
    assert hits_per_step([A, B, C, A, B, C, A, D, A, B, C, D], "least-stale", 3) == \
        [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0]


def test_cyclic_layers_in_one_cache():
    """Six layers each route the same two experts at every token; a global cache of 8 holds
    two thirds of the 12. LRU evicts exactly the expert that returns next (no hit after the
    first pass); least-stale keeps most of the cache hitting."""
    tokens, layers = 50, 6
    experts = np.tile(np.array([0, 1], np.int16), (tokens, layers, 1))
    trace = mc.Trace.from_arrays(experts, num_experts=2)
    lru = mc.replay(trace, "lru", 8, "global")
    stale = mc.replay(trace, "least-stale", 8, "global")
    assert lru.hits == 0
    assert stale.hits >= 0.5 * stale.requests
