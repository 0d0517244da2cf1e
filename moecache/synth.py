"""Synthetic routing: sticky, skewed top-K traces for demos, tests and benchmarks.

Each sequence starts fresh; then, per token and MoE layer, every expert of the previous
token's set is kept with probability ``stickiness`` and the remaining slots are drawn
without replacement from a Zipf(``skew``) popularity over the experts (a different
random ranking per layer). ``skew = 0`` is uniform. The first ``prompt_len`` tokens of
each sequence form one prefill step; every later token is its own decode step.

:func:`synth` returns the trace in memory; :func:`write_synth` streams the same trace
to a file block by block, in memory that does not grow with the number of tokens.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numba import njit
from tqdm.auto import tqdm

from .errors import MoecacheError
from .trace import Trace
from .trace_format import DECODE, PREFILL, build_meta
from .trace_io import TraceWriter
from .units import check_seed, format_bytes

# One expert of a Qwen1.5-MoE-A2.7B-sized FFN in bf16: 3 matrices of 2048 x 1408, 2 bytes each.
DEFAULT_EXPERT_BYTES = 3 * 2048 * 1408 * 2
MAX_IDS = 2**15  # expert ids and layer indices are int16 on disk: at most 32,768 of each
# the least popular of MAX_IDS experts keeps a probability of about 1e-45 > 0 (no underflow)
MAX_SKEW = 10.0
MAX_TOKENS = 2**52  # sequence boundaries are computed in float64
MAX_SEQUENCES = 2**31  # sequence ids are int32 on disk
MAX_SEQUENCE_TOKENS = 2**31 - 1  # so are positions within a sequence
_REJECTIONS = 64  # draws of the full distribution before sampling the remaining experts directly
_BLOCK_ROWS = 2**19  # (token, layer) rows a streamed block holds by default
_BLOCK_SCORES = 2**21  # router scores a streamed block holds by default (logits)


@njit(cache=True)
def _draw_remaining(rng, pdf, chosen, stamp):
    """One expert drawn from ``pdf`` restricted to the experts not yet chosen at ``stamp``."""
    total = 0.0
    for e in range(pdf.shape[0]):
        if chosen[e] != stamp:
            total += pdf[e]
    target = rng.random() * total
    last = -1
    for e in range(pdf.shape[0]):
        if chosen[e] != stamp:
            last = e
            target -= pdf[e]
            if target < 0:
                return e
    return last  # rounding left a sliver of mass: the last remaining expert


@njit(cache=True)
def _route(rng, is_start, previous, cdf, pdf, top_k, stickiness):
    """Experts (tokens, layers, K) of a block of tokens, drawn from ``rng`` (advanced in place);
    ``previous`` (layers, K) holds the experts of the token before the block."""
    num_tokens = is_start.shape[0]
    num_layers, num_experts = cdf.shape
    experts = np.empty((num_tokens, num_layers, top_k), np.int16)
    chosen = np.full(num_experts, -1, np.int64)
    stamp = 0
    for n in range(num_tokens):
        for layer in range(num_layers):
            stamp += 1
            filled = 0
            if not is_start[n]:
                for k in range(top_k):
                    e = experts[n - 1, layer, k] if n > 0 else previous[layer, k]
                    if rng.random() < stickiness:
                        experts[n, layer, filled] = e
                        chosen[e] = stamp
                        filled += 1
            attempts = 0
            while filled < top_k:
                if attempts < _REJECTIONS:
                    attempts += 1
                    e = np.searchsorted(cdf[layer], rng.random() * cdf[layer, -1], side="right")
                    e = min(e, num_experts - 1)
                else:  # the chosen experts hold nearly all the mass: draw among the others
                    e = _draw_remaining(rng, pdf[layer], chosen, stamp)
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
    """A synthetic trace of ``tokens`` tokens split evenly over ``sequences``, in memory.

    ``logits=True`` adds router scores consistent with the routing (and softmax gate
    weights): E standard normal draws per token and layer, sorted, the K largest given
    to the routed experts in rank order and the rest shuffled over the others, so that
    offline rerouting (``moecache reroute``) sees realistic score margins.
    :func:`write_synth` streams the same trace to a file in bounded memory.
    """
    _check(layers, experts, top_k, tokens, sequences, prompt_len, stickiness, skew)
    block = _block_tokens(layers, experts, logits)
    _check_memory(tokens, min(block, tokens), layers, experts, top_k, logits)
    routed = np.empty((tokens, layers, top_k), np.int16)
    columns = {name: np.empty(tokens, kind) for name, kind in _TOKEN_COLUMNS.items()}
    if logits:
        columns["weights"] = np.empty((tokens, layers, top_k), np.float32)
        columns["logits"] = np.empty((tokens, layers, experts), np.float16)
    first = 0
    for part in _blocks(layers, experts, top_k, tokens, sequences, prompt_len, stickiness, skew,
                        seed, logits, block):
        last = first + len(part["experts"])
        routed[first:last] = part.pop("experts")
        for name, values in part.items():
            columns[name][first:last] = values
        first = last
    columns.pop("pos")  # from_arrays numbers the positions from seq
    return Trace.from_arrays(routed, num_experts=experts, expert_bytes=expert_bytes,
                             meta=_meta(layers, experts, top_k, stickiness, skew, seed), **columns)


def write_synth(
    path: str | os.PathLike,
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
    overwrite: bool = False,
    block_tokens: int | None = None,
    progress: bool = False,
) -> Path:
    """Stream the trace :func:`synth` returns for the same arguments to ``path``, identical
    column for column, ``block_tokens`` tokens at a time (default: about half a million
    (token, layer) rows, or two million router scores with ``logits``), so memory does
    not grow with ``tokens``. Written through :class:`~moecache.trace_io.TraceWriter`: an
    interruption leaves a trace of the completed blocks, marked partial.
    ``progress`` shows a progress bar on a terminal.
    """
    _check(layers, experts, top_k, tokens, sequences, prompt_len, stickiness, skew)
    if block_tokens is None:
        block_tokens = _block_tokens(layers, experts, logits)
    elif (isinstance(block_tokens, bool) or not isinstance(block_tokens, numbers.Integral)
          or block_tokens < 1):
        raise MoecacheError(f"block_tokens must be a positive whole number, got {block_tokens!r}")
    block_tokens = min(int(block_tokens), tokens)
    _check_memory(0, block_tokens, layers, experts, top_k, logits)
    meta = build_meta(experts, top_k, range(layers), expert_bytes,
                      _meta(layers, experts, top_k, stickiness, skew, seed))
    with (TraceWriter(path, meta, with_weights=logits, with_logits=logits, overwrite=overwrite,
                      flush_tokens=block_tokens) as writer,
          tqdm(total=tokens, desc="synth", unit="token", unit_scale=True, mininterval=0.5, leave=False,
               disable=None if progress else True) as bar):
        for part in _blocks(layers, experts, top_k, tokens, sequences, prompt_len, stickiness, skew,
                            seed, logits, block_tokens):
            writer.write(**part)
            bar.update(len(part["experts"]))
    return writer.path


_TOKEN_COLUMNS = {"step": np.int64, "seq": np.int32, "pos": np.int32, "phase": np.int8}


def _blocks(layers: int, experts: int, top_k: int, tokens: int, sequences: int, prompt_len: int,
            stickiness: float, skew: float, seed: int, logits: bool,
            block_tokens: int) -> Iterator[dict[str, np.ndarray]]:
    """The trace in consecutive blocks of up to ``block_tokens`` tokens: experts, the per-token
    columns of :data:`_TOKEN_COLUMNS`, and weights and logits with ``logits``.

    Every random stream runs on across blocks, so the blocks concatenate to the same trace
    whatever their size: the routing draws from one Mersenne Twister (the legacy seeding
    of ``np.random.seed``), the scores' normal draws continue ``rng`` and their shuffles a
    copy of ``rng`` advanced past all the normal draws (the order of one whole-trace draw).
    """
    rng = np.random.default_rng(check_seed(seed))
    popularity = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** float(skew)
    pdf = np.stack([rng.permutation(popularity) for _ in range(layers)])
    cdf = np.cumsum(pdf, axis=1)
    route_rng = np.random.Generator(np.random.MT19937())
    route_rng.bit_generator.state = np.random.RandomState(int(rng.integers(2**31))).get_state(legacy=False)
    shuffle_rng = _after_normals(rng, tokens * layers * experts) if logits else None
    sequence_length = float(tokens) / sequences  # np.linspace's step: sequence i starts at int(i * this)
    seq_id, next_step = 0, 0
    previous = np.zeros((layers, top_k), np.int16)
    for first in range(0, tokens, block_tokens):
        token = np.arange(first, min(first + block_tokens, tokens), dtype=np.int64)
        # starts of the sequences from seq_id to one starting after the block (or the end):
        # int(i * sequence_length) > token[-1] once i * sequence_length >= token[-1] + 2, as
        # the product's rounding error stays below 1 (tokens <= MAX_TOKENS)
        index = np.arange(seq_id, min(int((token[-1] + 2) / sequence_length) + 2, sequences) + 1)
        starts = (index * sequence_length).astype(np.int64)
        starts[index == sequences] = tokens
        at = np.searchsorted(starts, token, side="right") - 1  # a sequence rounding left empty: no token
        seq = (seq_id + at).astype(np.int32)
        pos = (token - starts[at]).astype(np.int32)
        # a sequence's prompt tokens share one prefill step; every other token is its own step
        prefill = pos < prompt_len
        step = next_step + np.cumsum(~prefill | (pos == 0)) - 1
        routed = _route(route_rng, pos == 0, previous, cdf, pdf, top_k, stickiness)
        part = {"experts": routed, "step": step, "seq": seq, "pos": pos,
                "phase": np.where(prefill, PREFILL, DECODE).astype(np.int8)}
        if logits:
            scores = _scores(routed, experts, rng, shuffle_rng)
            chosen = np.take_along_axis(scores, routed.astype(np.int64), axis=2)
            weights = np.exp(chosen - scores.max(axis=2, keepdims=True))
            weights /= np.exp(scores - scores.max(axis=2, keepdims=True)).sum(axis=2, keepdims=True)
            part.update(weights=weights.astype(np.float32), logits=scores)
        yield part
        seq_id, next_step, previous = int(seq[-1]), int(step[-1]) + 1, routed[-1]


def _after_normals(rng: np.random.Generator, count: int) -> np.random.Generator:
    """A copy of ``rng`` advanced past ``count`` standard normal draws (drawn and dropped
    a million at a time)."""
    copy = np.random.Generator(type(rng.bit_generator)())
    copy.bit_generator.state = rng.bit_generator.state
    buffer = np.empty(min(count, 2**20))
    while count:
        drawn = min(count, len(buffer))
        copy.standard_normal(out=buffer[:drawn])
        count -= drawn
    return copy


def _block_tokens(layers: int, experts: int, logits: bool) -> int:
    """Tokens a block holds by default: :data:`_BLOCK_ROWS` (token, layer) rows, or
    :data:`_BLOCK_SCORES` router scores with ``logits``; at least one token."""
    return max(1, _BLOCK_SCORES // (layers * experts) if logits else _BLOCK_ROWS // layers)


def _check(layers: int, experts: int, top_k: int, tokens: int, sequences: int, prompt_len: int,
           stickiness: float, skew: float) -> None:
    """One-line MoecacheError for settings that cannot make a trace."""
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
    if tokens > MAX_TOKENS:
        raise MoecacheError(f"tokens {tokens:,} exceed 2**52 = {MAX_TOKENS:,}")
    if sequences > MAX_SEQUENCES:
        raise MoecacheError(f"{sequences:,} sequences exceed {MAX_SEQUENCES:,}: sequence ids are int32 "
                            "in a trace")
    if -(-tokens // sequences) > MAX_SEQUENCE_TOKENS:
        raise MoecacheError(f"{tokens:,} tokens over {sequences:,} sequence(s) put more than "
                            f"{MAX_SEQUENCE_TOKENS:,} tokens in a sequence (positions are int32 in a trace); "
                            "give more sequences")


def _check_memory(held_tokens: int, block_tokens: int, layers: int, experts: int, top_k: int,
                  logits: bool) -> None:
    """One-line MoecacheError when ``held_tokens`` tokens of result and one block of
    ``block_tokens`` tokens being built could never fit this machine's memory."""
    # held: ids (int16), gate weights (float32) and scores (float16), ~32 bytes of per-token
    # columns; a block: its rows on their way to Parquet (~128 bytes each) and the arrays
    # that build its scores (~80 bytes each); a rough bound, to refuse at once what could never fit
    held = held_tokens * (layers * (2 * top_k + (4 * top_k + 2 * experts if logits else 0)) + 32)
    needed = held + block_tokens * layers * (128 + (80 * experts if logits else 0))
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        what = (f"{held_tokens:,} tokens x {layers} layers" if held_tokens
                else f"a block of {block_tokens:,} tokens x {layers} layers x {experts} scores")
        raise MoecacheError(f"synth: {what} need about {format_bytes(needed)} of memory, more than "
                            f"this machine has ({format_bytes(available)})")


def _scores(routed: np.ndarray, experts: int, rng: np.random.Generator,
            shuffle_rng: np.random.Generator) -> np.ndarray:
    """Router scores whose top-K, in order, is ``routed`` (see :func:`synth`): normal draws
    from ``rng``, the unrouted experts' order from ``shuffle_rng``."""
    tokens, layers, top_k = routed.shape
    draws = -np.sort(-rng.standard_normal((tokens, layers, experts)), axis=2).astype(np.float16)
    # keep the routed experts strictly on top once rounded to float16
    below = np.nextafter(draws[:, :, top_k - 1:top_k], np.float16(-np.inf))
    draws[:, :, top_k:] = np.minimum(draws[:, :, top_k:], below)
    others = np.argsort(shuffle_rng.random((tokens, layers, experts)), axis=2)  # random order of ids
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
