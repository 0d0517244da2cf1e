"""Synthetic routing: sticky, skewed top-K traces for demos, tests and benchmarks.

Each sequence starts fresh; then, per token and MoE layer, every expert of the previous
token's set is kept with probability ``stickiness`` and the remaining slots are drawn
without replacement from a Zipf(``skew``) popularity over the experts (a different
random ranking per layer). ``skew = 0`` is uniform. The first ``prompt_len`` tokens of
each sequence form one prefill step; every later token is its own decode step.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from numba import njit

from .errors import MoecacheError
from .trace import Trace, positions
from .trace_format import DECODE, PREFILL
from .units import check_seed, format_bytes

# One expert of a Qwen1.5-MoE-A2.7B-sized FFN in bf16: 3 matrices of 2048 x 1408, 2 bytes each.
DEFAULT_EXPERT_BYTES = 3 * 2048 * 1408 * 2
MAX_IDS = 2**15  # expert ids and layer indices are int16 on disk: at most 32,768 of each
# the least popular of MAX_IDS experts keeps a probability of about 1e-45 > 0 (no underflow)
MAX_SKEW = 10.0
_REJECTIONS = 64  # draws of the full distribution before sampling the remaining experts directly


@njit(cache=True)
def _draw_remaining(pdf, chosen, stamp):
    """One expert drawn from ``pdf`` restricted to the experts not yet chosen at ``stamp``."""
    total = 0.0
    for e in range(pdf.shape[0]):
        if chosen[e] != stamp:
            total += pdf[e]
    target = np.random.random() * total
    last = -1
    for e in range(pdf.shape[0]):
        if chosen[e] != stamp:
            last = e
            target -= pdf[e]
            if target < 0:
                return e
    return last  # rounding left a sliver of mass: the last remaining expert


@njit(cache=True)
def _route(num_tokens, seq_starts, cdf, pdf, top_k, stickiness, seed):
    np.random.seed(seed)
    num_layers, num_experts = cdf.shape
    experts = np.empty((num_tokens, num_layers, top_k), np.int16)
    chosen = np.full(num_experts, -1, np.int64)
    is_start = np.zeros(num_tokens, np.bool_)
    for s in seq_starts:
        is_start[s] = True
    stamp = 0
    for n in range(num_tokens):
        for layer in range(num_layers):
            stamp += 1
            filled = 0
            if not is_start[n]:
                for k in range(top_k):
                    e = experts[n - 1, layer, k]
                    if np.random.random() < stickiness:
                        experts[n, layer, filled] = e
                        chosen[e] = stamp
                        filled += 1
            attempts = 0
            while filled < top_k:
                if attempts < _REJECTIONS:
                    attempts += 1
                    e = np.searchsorted(cdf[layer], np.random.random() * cdf[layer, -1], side="right")
                    e = min(e, num_experts - 1)
                else:  # the chosen experts hold nearly all the mass: draw among the others
                    e = _draw_remaining(pdf[layer], chosen, stamp)
                if chosen[e] != stamp:
                    chosen[e] = stamp
                    experts[n, layer, filled] = e
                    filled += 1
    return experts


def synth(
    layers: int = 8,
    experts: int = 64,
    top_k: int = 8,
    tokens: int = 4096,
    *,
    sequences: int = 1,
    prompt_len: int = 0,
    stickiness: float = 0.5,
    skew: float = 0.8,
    seed: int = 0,
    expert_bytes: int | None = DEFAULT_EXPERT_BYTES,
    logits: bool = False,
) -> Trace:
    """A synthetic trace of ``tokens`` tokens split evenly over ``sequences``.

    ``logits=True`` adds router scores consistent with the routing (and softmax gate
    weights): E standard normal draws per token and layer, sorted, the K largest given
    to the routed experts in rank order and the rest shuffled over the others, so that
    offline rerouting (``moecache reroute``) sees realistic score margins.
    """
    _check(layers, experts, top_k, tokens, sequences, prompt_len, stickiness, skew, logits)
    rng = np.random.default_rng(check_seed(seed))
    popularity = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** float(skew)
    pdf = np.stack([rng.permutation(popularity) for _ in range(layers)])
    cdf = np.cumsum(pdf, axis=1)
    lengths = np.diff(np.linspace(0, tokens, sequences + 1).astype(np.int64))
    seq = np.repeat(np.arange(sequences, dtype=np.int32), lengths)
    seq_starts = np.flatnonzero(np.diff(seq, prepend=-1))
    routed = _route(tokens, seq_starts, cdf, pdf, top_k, stickiness, int(rng.integers(2**31)))
    # a sequence's prompt tokens share one prefill step; every other token is its own step
    prefill = positions(seq) < prompt_len
    step = np.cumsum(~prefill | (np.diff(seq, prepend=-1) != 0)) - 1
    scores = _scores(routed, experts, rng) if logits else None
    weights = None
    if scores is not None:
        chosen = np.take_along_axis(scores, routed.astype(np.int64), axis=2)
        weights = np.exp(chosen - scores.max(axis=2, keepdims=True))
        weights /= np.exp(scores - scores.max(axis=2, keepdims=True)).sum(axis=2, keepdims=True)
    return Trace.from_arrays(routed, num_experts=experts, seq=seq, expert_bytes=expert_bytes,
                             meta=_meta(layers, experts, top_k, stickiness, skew, seed),
                             step=step, phase=np.where(prefill, PREFILL, DECODE),
                             weights=weights, logits=scores)


def _check(layers: int, experts: int, top_k: int, tokens: int, sequences: int, prompt_len: int,
           stickiness: float, skew: float, logits: bool) -> None:
    """One-line MoecacheError for settings that cannot make a trace (or would not finish)."""
    counts = {"layers": layers, "experts": experts, "top_k": top_k, "tokens": tokens,
              "sequences": sequences, "prompt_len": prompt_len}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise MoecacheError(f"{name} must be a whole number, got {value!r}")
        if value < (0 if name == "prompt_len" else 1):
            raise MoecacheError(f"{name} must be {'>= 0' if name == 'prompt_len' else 'positive'}, "
                                f"got {value}")
    for name in ("layers", "experts"):
        if counts[name] > MAX_IDS:
            raise MoecacheError(f"{name} {counts[name]} exceeds {MAX_IDS:,}: ids and layer indices are "
                                "int16 in a trace")
    if top_k > experts:
        raise MoecacheError(f"top_k {top_k} exceeds experts {experts}")
    if not 0.0 <= stickiness <= 1.0:  # also rejects nan
        raise MoecacheError(f"stickiness must lie in [0, 1], got {stickiness}")
    if not 0.0 <= skew <= MAX_SKEW:
        raise MoecacheError(f"skew must lie in [0, {MAX_SKEW:g}], got {skew}")
    if sequences > tokens:
        raise MoecacheError(f"{sequences} sequences need at least as many tokens, got {tokens}")
    # ids (int16) and per-token columns (~32 bytes), plus the arrays that build scores (~48 bytes
    # an entry); a rough bound, to refuse at once what could never fit
    needed = tokens * layers * (2 * top_k + (48 * experts if logits else 0)) + 32 * tokens
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise MoecacheError(f"synth: {tokens:,} tokens x {layers} layers need about "
                            f"{format_bytes(needed)} of memory, more than this machine has "
                            f"({format_bytes(available)})")


def _scores(routed: np.ndarray, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Router scores whose top-K, in order, is ``routed`` (see :func:`synth`)."""
    tokens, layers, top_k = routed.shape
    draws = -np.sort(-rng.standard_normal((tokens, layers, experts)), axis=2).astype(np.float16)
    # keep the routed experts strictly on top once rounded to float16
    below = np.nextafter(draws[:, :, top_k - 1:top_k], np.float16(-np.inf))
    draws[:, :, top_k:] = np.minimum(draws[:, :, top_k:], below)
    others = np.argsort(rng.random((tokens, layers, experts)), axis=2)  # random order of ids
    is_routed = np.zeros((tokens, layers, experts), bool)
    np.put_along_axis(is_routed, routed.astype(np.int64), True, axis=2)
    # unrouted ids in random order fill the slots after the K routed ones
    order = np.take_along_axis(is_routed, others, axis=2)
    unrouted_first = np.argsort(order, axis=2, kind="stable")
    rest = np.take_along_axis(others, unrouted_first, axis=2)[:, :, :experts - top_k]
    ranking = np.concatenate([routed.astype(np.int64), rest], axis=2)
    scores = np.empty((tokens, layers, experts), np.float16)
    np.put_along_axis(scores, ranking, draws, axis=2)
    return scores


def _meta(layers: int, experts: int, top_k: int, stickiness: float, skew: float, seed: int) -> dict:
    return {
        "model": {"name": "synthetic", "revision": None, "architecture": "synthetic"},
        "router": "synthetic",
        "dtype": "bfloat16",
        "capture": {"mode": "synth", "stickiness": stickiness, "skew": skew, "seed": seed},
    }
