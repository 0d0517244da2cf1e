"""The decode timeline's event walk (numba): one device, one host, and I/O links, over the
(step, layer) positions of a replay whose cache outcome is already known.

Semantics (docs/semantics.md, "Timeline"): at position p (step t, MoE layer l, p = t L + l)
the device first runs the layer's non-expert compute; the router's choice is then known and
the prefetch batches whose issue position is p and the position's demand fetches are
issued, in that order. Each routed expert is computed once its weights are resident, in
order of readiness (ties: entry order, i.e. ascending id). A link serves its requests in
issue order (one FIFO queue), each in one of ``queue_depth`` slots: the latency first
(overlapping across slots), then the bytes over the link's single data channel at its
bandwidth. A fixed service order keeps every time a max-plus function of the durations, so
no time rises when a link gets faster. Without overlap the device waits for every transfer:
each costs latency + bytes / bandwidth on the critical path, one at a time.
"""

import numpy as np
from numba import njit

# an entry's source: RESIDENT (a hit) or the link k >= 0 its miss is fetched over
RESIDENT = -1


# columns of a link's state
CHANNEL_FREE, LAST_END, BUSY = range(3)


@njit(cache=True)
def _serve(link, arrival, size, bandwidth, latency, slots, state):
    """Put a request of ``size`` bytes into service on ``link`` no earlier than ``arrival``;
    returns (when its bytes start moving, its completion). Invariant: requests enter service in
    call order, so the data channel serves them in that order and completions never
    decrease; BUSY sums the union of service intervals after LAST_END (set to the scored
    window's start)."""
    free = slots[link]
    slot = np.argmin(free)
    start = max(arrival, free[slot])
    end = max(start + latency[link], state[link, CHANNEL_FREE]) + size / bandwidth[link]
    state[link, CHANNEL_FREE] = end
    free[slot] = end
    if end > state[link, LAST_END]:
        state[link, BUSY] += end - max(start, state[link, LAST_END])
        state[link, LAST_END] = end
    return end - size / bandwidth[link], end


@njit(cache=True)
def simulate(dense, entry_offsets, entry_key, entry_compute, entry_host, entry_bytes, entry_source,
             batch_offsets, batch_key, batch_bytes, batch_source, depth,
             bandwidth, latency, queue_depth, overlap, host_misses, num_keys, scored_from, record):
    """Walk every position; returns (end time of each position, device stall per position,
    seconds each link is busy from the start of position ``scored_from`` on, and with
    ``record`` the spans [start, end] of each entry's compute, of its fetch's bytes on the
    link and of each batch entry's, NaN where none; empty otherwise).

    Entries (the positions' experts, CSR ``entry_offsets``): key, device compute seconds,
    host compute seconds, bytes, source (RESIDENT or the link a miss is fetched over). With
    ``host_misses`` a miss is computed by the host while its copy to fast memory goes over
    the link without anyone waiting for it. Batches (prefetches, CSR ``batch_offsets`` by
    the position they serve): key, bytes and link of each expert the cache inserted; batch
    q is issued at position q - ``depth`` (at time 0 when that is < 0). Invariant:
    ``ready[key]`` is when the key's latest insertion completes.
    """
    num_positions = dense.shape[0]
    num_links = bandwidth.shape[0]
    slots = np.full((num_links, max(1, queue_depth.max())), np.inf)  # when each slot frees
    for k in range(num_links):
        slots[k, :queue_depth[k]] = 0.0
    state = np.zeros((num_links, 3))
    ready = np.zeros(num_keys)
    ends = np.zeros(num_positions)
    stalls = np.zeros(num_positions)
    spans = np.full((entry_key.shape[0] if record else 0, 4), np.nan)  # compute, then fetch
    batch_spans = np.full((batch_key.shape[0] if record else 0, 2), np.nan)
    order = np.empty(entry_key.shape[0], np.int64)
    entry_ready = np.empty(entry_key.shape[0])
    now = 0.0
    host_free = 0.0
    depth = min(depth, num_positions)  # farther ahead, every batch goes out at time 0 just the same
    for p in range(-depth, num_positions):
        stall = 0.0  # the device's wait at this position
        if p == scored_from:
            state[:, LAST_END] = np.maximum(state[:, LAST_END], now)
            state[:, BUSY] = 0.0
        if p >= 0:
            now += dense[p]
        issue = p + depth  # the batch issued at this position
        if 0 <= issue < num_positions:
            for j in range(batch_offsets[issue], batch_offsets[issue + 1]):
                start, end = _serve(batch_source[j], now, batch_bytes[j], bandwidth, latency, slots, state)
                ready[batch_key[j]] = end
                if record:
                    batch_spans[j, 0], batch_spans[j, 1] = start, end
                if not overlap:  # the device waits for the transfer
                    stall += end - now
                    now = end
        if p < 0:
            stalls[0] += stall
            continue
        lo, hi = entry_offsets[p], entry_offsets[p + 1]
        host_done = now
        for j in range(lo, hi):
            key, link = entry_key[j], entry_source[j]
            entry_ready[j] = ready[key]
            if link < 0:
                continue
            if host_misses:
                host_free = max(now, host_free) + entry_host[j]
                host_done = max(host_done, host_free)
                if record:
                    spans[j, 0], spans[j, 1] = host_free - entry_host[j], host_free
                entry_ready[j] = -1.0  # not computed on the device
                if not overlap:
                    stall += host_free - now
                    now = host_free
            start, end = _serve(link, now, entry_bytes[j], bandwidth, latency, slots, state)
            ready[key] = end
            if record:
                spans[j, 2], spans[j, 3] = start, end
            if not host_misses:
                entry_ready[j] = end
            if not overlap:
                stall += end - now
                now = end
        # the device computes the position's experts in order of readiness
        count = 0
        for j in range(lo, hi):
            if entry_ready[j] < 0:
                continue
            i = count
            while i > 0 and entry_ready[order[i - 1]] > entry_ready[j]:
                order[i] = order[i - 1]
                i -= 1
            order[i] = j
            count += 1
        for i in range(count):
            j = order[i]
            if entry_ready[j] > now:
                stall += entry_ready[j] - now
                now = entry_ready[j]
            if record:
                spans[j, 0], spans[j, 1] = now, now + entry_compute[j]
            now += entry_compute[j]
        if host_done > now:  # the layer's output waits for the host's experts
            stall += host_done - now
            now = host_done
        stalls[p] += stall
        ends[p] = now
    return ends, stalls, state[:, BUSY].copy(), spans, batch_spans
