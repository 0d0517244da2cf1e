"""Streaming replay: traces larger than memory, a span of whole steps at a time
(docs/semantics.md, "Streaming").

:func:`open_stream` reads a trace file once, a batch of rows at a time, and writes its
requests (the step sets of :mod:`moecache.requests`, step-major) to a temporary folder:
the ids (int16), the size of each set (uint16) and, when asked, each entry's router
weight (float32); the routing-only metrics (requests, cold misses, reuse) are summed on
the way. Replays read it back one span at a time and serve each span with the policy's
hooks (:class:`moecache.policies.Session`), the caches carried from span to span; the
policies that look ahead (OPT) get each entry's next use from one backward pass over
the spans, written next to them. Memory holds one span and the per-key state of the
caches, whatever the length of the trace; the numbers are those of the in-memory replay.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numba import njit

from moecache.policies import Choice, Session, resolve

from .errors import MoecacheError
from .files import write_errors
from .parallel import map_parallel, read_ahead
from .requests import (
    NEVER,
    TOTALS,
    Requests,
    largest_at,
    routing_counts,
    step_bounds,
    step_scores,
    step_unions,
)
from .results import ReplayResult, summarize
from .storage import Location
from .trace import Trace
from .trace_io import TraceReader
from .validate import Plan, plan, plan_range

if TYPE_CHECKING:
    import pandas as pd

SPAN_ENTRIES = 1 << 23
"""Requested experts read per batch (about 16 MB of ids): a span holds one batch's whole steps."""
BYTES_PER_REQUEST = 12
"""Peak memory per requested expert of an in-memory replay, at most (ids, step sets, the
policy's arrays: 2-6 bytes in layer scope, measured by benchmarks/bench_scale.py, more in
global scope); ``auto`` streams a trace that would need more than a quarter of this
machine's memory."""


STREAM_LRU_ABOVE = 4 * SPAN_ENTRIES
"""Requested experts above which ``auto`` streams a replay whose policy has a span kernel
and reads no future (lru), and ``moecache.replay`` serves a loaded trace in spans:
streamed, it is as fast and holds no copy of the trace."""


def should_stream(path: str | os.PathLike | Location, stream: bool | None = None,
                  policy: Any = None) -> bool:
    """``stream`` if given; otherwise whether an in-memory replay of the trace would need
    more than a quarter of this machine's memory (estimated from the file's footer:
    BYTES_PER_REQUEST per requested expert), or, for a replay under ``policy``, whether
    that policy streams as fast as it replays in memory and the trace holds more than
    STREAM_LRU_ABOVE requested experts."""
    if stream is not None:
        return stream
    reader = TraceReader(path, weights=False, logits=False, lookahead=False)
    requests = reader.rows * int(reader.meta["top_k"])
    if requests * BYTES_PER_REQUEST > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4:
        return True
    if policy is None or requests <= STREAM_LRU_ABOVE:
        return False
    return serves_in_one_pass(policy)


def in_spans(trace: Trace, policy: Any, per_token: bool = False) -> bool:
    """Whether :func:`moecache.replay` serves ``trace`` in spans (:func:`replay_in_spans`):
    under a policy that :func:`serves_in_one_pass`, a trace of more than STREAM_LRU_ABOVE
    requested experts whose step sets are not built yet (a replay reuses those)."""
    if not isinstance(trace, Trace):
        return False  # the replay's own checks say what it is
    entries = trace.num_tokens * trace.num_layers * trace.top_k
    return entries > STREAM_LRU_ABOVE and not Requests.built(trace, per_token) and serves_in_one_pass(policy)


def serves_in_one_pass(policy: Any) -> bool:
    """Whether a streamed replay under ``policy`` serves the caches while the file is read
    (:func:`replay_file`): a policy with a span kernel that reads neither the future nor
    the length of the stream (lru)."""
    chosen = resolve(policy).policy
    return chosen.compiled and chosen.spans is not None and not chosen.needs_future


@dataclass(frozen=True)
class Span:
    """One span of whole steps: its requests (step-major, as a :class:`Requests`), the
    number of its first step and of its first entry in the whole stream."""

    requests: Requests
    first_step: int
    first_entry: int
    scores: np.ndarray | None = None
    next_steps: np.ndarray | None = None  # per entry: the next step requesting its (layer, expert)


@dataclass(eq=False)
class StreamedTrace:
    """The requests of a trace file spilled to a folder, read back a span at a time.

    ``header`` is the trace without its tokens (metadata, layers, source) for the checks
    and reports shared with in-memory replays; the totals per layer are those of
    :attr:`moecache.requests.Requests.layer_totals`. Close it (or use ``with``) to remove
    the folder.
    """

    header: Trace
    per_token: bool
    num_tokens: int
    num_steps: int
    layer_totals: dict[str, np.ndarray]
    folder: Path | None  # None: counted in one pass, nothing spilled to read back
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)  # (first step, steps,
    # first entry, entries) of each span
    has_scores: bool = False
    largest_at: tuple[int, int] = (0, 0)
    _cleanup: Any = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.header.num_layers

    @property
    def num_experts(self) -> int:
        return self.header.num_experts

    @property
    def num_entries(self) -> int:
        return sum(span[3] for span in self.spans)

    def largest_set(self) -> tuple[int, int]:
        """(step, layer index) of the largest step set, the first if several."""
        return self.largest_at

    def close(self) -> None:
        """Remove the spilled folder."""
        if self._cleanup is not None:
            self._cleanup.cleanup()
            self._cleanup = None

    def __enter__(self) -> StreamedTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, name: str, dtype: type, start: int, count: int) -> np.ndarray:
        with open(self.folder / name, "rb") as f:
            return np.fromfile(f, dtype, count, offset=start * np.dtype(dtype).itemsize)

    def _requests(self, first_step: int, steps: int, first_entry: int, entries: int) -> Requests:
        """One span's step sets read back (the sets before it: ``first_step`` x L)."""
        layers = self.num_layers
        sizes = self._read("sizes.u16", np.uint16, first_step * layers, steps * layers)
        offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return Requests(self._read("ids.i16", np.int16, first_entry, entries), offsets, layers,
                        self.num_experts, 0)

    def iter_spans(self, *, scores: bool = False, future: bool = False) -> Iterator[Span]:
        """The spans in order; ``scores`` and ``future`` (next steps, see :class:`Span`) on demand."""
        if self.folder is None:
            raise MoecacheError(f"{self.header.source}: counted in one pass, nothing spilled to read "
                                "back: open it with open_stream to replay it")
        if scores and not self.has_scores:
            raise MoecacheError(f"{self.header.source}: opened without router weights (weights=True)")
        if future:
            self._write_next_steps()
        for first_step, steps, first_entry, entries in self.spans:
            yield Span(self._requests(first_step, steps, first_entry, entries), first_step, first_entry,
                       self._read("scores.f32", np.float32, first_entry, entries) if scores else None,
                       self._read("next.steps", self._step_type, first_entry, entries) if future else None)

    @property
    def _step_type(self) -> type:
        """The type of the next steps written (int32 while the steps fit: half the I/O)."""
        return np.int32 if self.num_steps <= np.iinfo(np.int32).max else np.int64

    def _write_next_steps(self) -> None:
        """Each entry's next step requesting its (layer, expert), ``num_steps`` if none: one
        backward pass over the spans, written once to ``next.steps``."""
        path = self.folder / "next.steps"
        if path.exists():
            return
        upcoming = np.full(self.num_layers * self.num_experts, self.num_steps, np.int64)
        partial = path.with_suffix(".partial")
        width = np.dtype(self._step_type).itemsize
        with write_errors(self.folder), open(partial, "wb") as out:
            out.truncate(self.num_entries * width)
            for first_step, steps, first_entry, entries in reversed(self.spans):
                req = self._requests(first_step, steps, first_entry, entries)
                nxt = np.empty(len(req.ids), self._step_type)
                _next_steps(req.ids, req.offsets, self.num_layers, self.num_experts, upcoming, first_step,
                            nxt)
                out.seek(first_entry * width)
                nxt.tofile(out)
        os.replace(partial, path)


@njit(cache=True)
def _next_steps(ids, offsets, num_layers, num_experts, upcoming, first_step, out):
    """Backward over a span: per entry (into ``out``) the next step requesting its (layer,
    expert); ``upcoming`` (per key, the earliest step seen so far) carries to the span before."""
    for r in range(offsets.shape[0] - 2, -1, -1):
        key_base = (r % num_layers) * num_experts
        t = first_step + r // num_layers
        for j in range(offsets[r], offsets[r + 1]):
            out[j] = upcoming[key_base + ids[j]]
            upcoming[key_base + ids[j]] = t


def open_stream(path: str | os.PathLike | Location, *, per_token: bool = False, weights: bool = False,
                folder: str | os.PathLike | None = None, span_entries: int = SPAN_ENTRIES) -> StreamedTrace:
    """Read a trace file once, a batch of rows at a time, checking it as ``Trace.load``
    does, and spill its requests to a temporary folder (in ``folder``, default the
    system's temporary directory). ``weights`` keeps the router weight of each entry for
    the policies that read them. Memory: one batch of about ``span_entries`` requested
    experts plus the tokens of one step."""
    reader = _reader(path, weights)
    header = _header(reader, weights)
    place = folder if folder is not None else tempfile.gettempdir()
    with write_errors(f"spill folder in {place}"):  # a full disk, or no folder there: one line
        cleanup = tempfile.TemporaryDirectory(prefix="moecache-stream-", dir=folder)
        try:
            counter = _Counter(header, per_token, weights)
            spill = Path(cleanup.name)
            with contextlib.ExitStack() as stack:
                files = {name: stack.enter_context(open(spill / name, "wb"))
                         for name in ("ids.i16", "sizes.u16", "scores.f32")}
                # three stages side by side: decoding, checking and step sets, counting and spilling
                blocks = reader.token_blocks(_batch_rows(reader, span_entries))
                for part in read_ahead(counter.parts(read_ahead(blocks))):
                    span = counter.count(part)
                    req = part.requests
                    req.ids.tofile(files["ids.i16"])
                    req.set_sizes.astype(np.uint16).tofile(files["sizes.u16"])
                    if span.scores is not None:
                        span.scores.tofile(files["scores.f32"])
            return counter.finish(cleanup)  # the files closed (flushed) before they are read back
        except BaseException:
            cleanup.cleanup()
            raise


def _reader(path: str | os.PathLike | Location, weights: bool) -> TraceReader:
    """The trace's expert ids, and its router weights with ``weights`` (which it must have)."""
    reader = TraceReader(path, weights=weights, logits=False, lookahead=False)
    if weights and "weights" not in reader.grids:
        raise MoecacheError(f"{reader.source}: the trace has no router weights, which this policy needs "
                            "(capture or import them with the routing)")
    return reader


def _batch_rows(reader: TraceReader, span_entries: int) -> int:
    """Rows (whole tokens) of a batch of about ``span_entries`` requested experts."""
    layers = reader.num_layers
    return max(layers, span_entries // int(reader.meta["top_k"]) // layers * layers)


def trace_header(path: str | os.PathLike | Location) -> Trace:
    """The trace without its tokens: its metadata and source, read from the footer."""
    return _header(TraceReader(path, weights=False, logits=False, lookahead=False), False)


def _header(reader: TraceReader, weights: bool) -> Trace:
    empty = np.zeros((0, reader.num_layers, int(reader.meta["top_k"])), np.int16)
    return Trace(experts=empty, step=np.zeros(0, np.int64), seq=np.zeros(0, np.int32),
                 pos=np.zeros(0, np.int32), token_id=np.zeros(0, np.int32), phase=np.zeros(0, np.int8),
                 meta=reader.meta, weights=np.zeros(empty.shape, np.float32) if weights else None,
                 source=reader.source)


def checked_parts(header: Trace, blocks: Iterator[dict[str, np.ndarray]], per_token: bool = False
                  ) -> Iterator[Trace]:
    """Token blocks cut after their last whole step (the rest goes on with the next block;
    ``per_token``: every token is a step), each checked as a Trace, and the steps checked
    to ascend from one part to the next."""
    carry: dict[str, np.ndarray] | None = None
    previous_step = -1
    for block in itertools.chain(blocks, [None]):
        if block is None:  # the end: what is left
            if carry is None or not len(carry["step"]):
                return
            block, cut = carry, len(carry["step"])
        else:
            if carry is not None:
                block = {name: np.concatenate([carry[name], values]) for name, values in block.items()}
            steps = block["step"]
            cut = len(steps)
            if not per_token and np.all(steps[1:] >= steps[:-1]):  # the last step may go on
                cut = int(np.searchsorted(steps, steps[-1]))
            carry = {name: values[cut:] for name, values in block.items()}
            if not cut:
                continue
        part = Trace(experts=block["experts"][:cut], step=block["step"][:cut], seq=block["seq"][:cut],
                     pos=block["pos"][:cut], token_id=block["token_id"][:cut], phase=block["phase"][:cut],
                     meta=header.meta, weights=None if "weights" not in block else block["weights"][:cut],
                     source=header.source)
        first = int(part.step[0])
        if first < previous_step or (first == previous_step and not per_token):  # a step is never cut
            raise MoecacheError(f"{header.source}: steps are not sorted (step {first} after {previous_step})")
        previous_step = int(part.step[-1])
        yield part


def scan(path: str | os.PathLike | Location, span_entries: int = SPAN_ENTRIES
         ) -> tuple[Trace, dict[str, np.ndarray]]:
    """Check a trace file a block at a time, as ``Trace.load`` checks it, keeping only its
    per-token columns: (the trace without tokens, {"step", "seq", "phase"}). Memory: a
    block of about ``span_entries`` requested experts and those columns."""
    reader = TraceReader(path, weights=False, logits=False, lookahead=False)
    header = _header(reader, False)
    kept: dict[str, list[np.ndarray]] = {"step": [], "seq": [], "phase": []}
    for part in checked_parts(header, read_ahead(reader.token_blocks(_batch_rows(reader, span_entries)))):
        for name, values in kept.items():
            values.append(getattr(part, name))
    return header, {name: np.concatenate(values) if values else getattr(header, name)
                    for name, values in kept.items()}


class Part(NamedTuple):
    """One part of a trace, whole steps: its tokens, step sets and (for the policies that
    read them) router weight per entry."""

    tokens: int
    requests: Requests
    scores: np.ndarray | None


class _Counter:
    """Cuts token blocks at step boundaries into parts, checks them and builds their step
    sets (``parts``), then counts each into the routing totals (``count``)."""

    def __init__(self, header: Trace, per_token: bool, weights: bool) -> None:
        self.header, self.per_token, self.weights = header, per_token, weights
        layers, experts = header.num_layers, header.num_experts
        self.last_step = np.full(layers * experts, NEVER, np.int64)
        self.totals = {name: np.zeros(layers, np.int64) for name in TOTALS}
        self.largest_at = (0, 0)
        self.spans: list[tuple[int, int, int, int]] = []
        self.steps = self.tokens = self.entries = 0

    def parts(self, blocks: Iterator[dict[str, np.ndarray]]) -> Iterator[Part]:
        """The checked parts of the blocks (:func:`checked_parts`), with their step sets."""
        for part in checked_parts(self.header, blocks, self.per_token):
            req = Requests.from_trace(part, per_token=self.per_token)
            scores = req.scores(part, per_token=self.per_token) if self.weights else None
            yield Part(part.num_tokens, req, scores)

    def count(self, part: Part) -> Span:
        """Count a part's requests into the totals; the part as a span."""
        header, req = self.header, part.requests
        totals, largest_step = routing_counts(req.ids, req.offsets, header.num_layers, header.num_experts,
                                              self.last_step, self.steps)
        largest = totals[TOTALS.index("largest")]
        if largest.max() > self.totals["largest"].max():
            self.largest_at = largest_at(totals, largest_step)
        for name, row in zip(TOTALS, totals, strict=True):
            kept = self.totals[name]
            if name == "largest":
                np.maximum(kept, row, out=kept)
            else:
                kept += row
        span = Span(req, self.steps, self.entries, part.scores)
        self.spans.append((self.steps, req.num_steps, self.entries, len(req.ids)))
        self.steps += req.num_steps
        self.tokens += part.tokens
        self.entries += len(req.ids)
        return span

    def progress(self) -> StreamedTrace:
        """The totals of the parts counted so far (nothing to read back)."""
        return StreamedTrace(self.header, self.per_token, self.tokens, self.steps, self.totals, None,
                             self.spans, self.weights, self.largest_at)

    def finish(self, cleanup: Any = None) -> StreamedTrace:
        """The whole trace's totals, with the folder of ``cleanup`` (a TemporaryDirectory)
        where the spans were spilled, if they were."""
        if not self.tokens:
            raise MoecacheError(f"{self.header.source}: the trace holds no tokens: nothing to replay")
        if cleanup is None:
            return self.progress()
        return StreamedTrace(self.header, self.per_token, self.tokens, self.steps, self.totals,
                             Path(cleanup.name), self.spans, self.weights, self.largest_at, cleanup)


def replay_stream(stream: StreamedTrace, policy: Any = "lru", capacity: int | None = None,
                  scope: str = "layer", *, memory: str | int | None = None,
                  bandwidth: str | float | None = None, latency: str | float = 0.0, seed: int = 0,
                  policy_args: dict[str, Any] | None = None, workers: int | None = None) -> ReplayResult:
    """:func:`moecache.replay` of a streamed trace (a demand replay: no prefetch, events
    or outcomes): the same result, in memory bounded by one span."""
    checked = plan(stream.header, resolve(policy, policy_args), scope, capacity=capacity, memory=memory,
                   per_token=stream.per_token, bandwidth=bandwidth, latency=latency, seed=seed,
                   requests=stream)  # type: ignore[arg-type]
    caches = [checked.layer_capacities] if scope == "layer" else [(checked.pool, checked.units)]
    hits = _serve(stream, checked.policy, scope, caches, checked.seed, workers)[0]
    return summarize(stream.header, stream, hits, checked.policy.label, scope,  # type: ignore[arg-type]
                     checked.capacity, checked.memory_bytes, checked.bandwidth, checked.latency)


def curve_stream(stream: StreamedTrace, policy: Any = "lru", scope: str = "layer", *,
                 capacities: Any = None, bandwidth: str | float | None = None, latency: str | float = 0.0,
                 seed: int = 0, policy_args: dict[str, Any] | None = None,
                 workers: int | None = None) -> pd.DataFrame:
    """:func:`moecache.curve` of a streamed trace: the same table, every capacity served
    in one pass over the spans."""
    import pandas as pd

    checked = plan_range(stream.header, resolve(policy, policy_args), scope, capacities=capacities,
                         per_token=stream.per_token, bandwidth=bandwidth, latency=latency, seed=seed,
                         requests=stream)  # type: ignore[arg-type]
    layers = stream.num_layers
    caches = [(c,) * layers if scope == "layer" else (c, (1,) * layers) for c in checked.capacities]
    hits = _serve(stream, checked.policy, scope, caches, checked.seed, workers)
    rows = [summarize(stream.header, stream, row, checked.policy.label, scope, c, None,  # type: ignore[arg-type]
                      checked.bandwidth, checked.latency).to_dict()
            for c, row in zip(checked.capacities, hits, strict=True)]
    return pd.DataFrame(rows).drop(columns=["memory_bytes"])


def replay_file(path: str | os.PathLike | Location, policy: Any = "lru", capacity: int | None = None,
                scope: str = "layer", *, per_token: bool = False, memory: str | int | None = None,
                bandwidth: str | float | None = None, latency: str | float = 0.0, seed: int = 0,
                policy_args: dict[str, Any] | None = None, workers: int | None = None,
                folder: str | os.PathLike | None = None, span_entries: int = SPAN_ENTRIES) -> ReplayResult:
    """:func:`replay_stream` of a trace file: the same result. A policy that
    :func:`serves_in_one_pass` is served while the file is read, nothing spilled: the caches
    take each span as soon as it is checked and counted, beside the decoding. The step sets
    counted so far are checked against the cache before each span; a set that does not fit
    stops the serving, and the error names the largest set once the whole file is read,
    as for a replay in memory (:func:`_one_pass`). Other policies: :func:`open_stream`, then
    :func:`replay_stream`."""
    choice = resolve(policy, policy_args)
    weights = choice.policy.needs_scores
    if not serves_in_one_pass(choice):
        with open_stream(path, per_token=per_token, weights=weights, folder=folder,
                         span_entries=span_entries) as streamed:
            return replay_stream(streamed, choice, capacity, scope, memory=memory, bandwidth=bandwidth,
                                 latency=latency, seed=seed, workers=workers)
    reader = _reader(path, weights)
    header = _header(reader, weights)
    counter = _Counter(header, per_token, weights)
    parts = counter.parts(read_ahead(reader.token_blocks(_batch_rows(reader, span_entries))))
    return _one_pass(counter, read_ahead(parts), choice, capacity, scope, memory=memory, bandwidth=bandwidth,
                     latency=latency, seed=seed, workers=workers)


def replay_in_spans(trace: Trace, policy: Any = "lru", capacity: int | None = None, scope: str = "layer", *,
                    per_token: bool = False, memory: str | int | None = None,
                    bandwidth: str | float | None = None, latency: str | float = 0.0, seed: int = 0,
                    policy_args: dict[str, Any] | None = None, workers: int | None = None,
                    span_entries: int = SPAN_ENTRIES) -> ReplayResult:
    """:func:`moecache.replay` of an in-memory trace under a policy that
    :func:`serves_in_one_pass`, a span of steps at a time: the same result, in the memory of
    the trace and one span (the step sets of the whole trace are never built)."""
    choice = resolve(policy, policy_args)
    if not serves_in_one_pass(choice):
        raise MoecacheError(f"policy {choice.label} cannot be served in one pass over spans: use "
                            "moecache.replay")
    weights = choice.policy.needs_scores  # the plan checks the trace has them before a part is built
    counter = _Counter(trace, per_token, weights)  # an empty trace: finish() says so
    return _one_pass(counter, read_ahead(memory_parts(trace, per_token, weights, span_entries)), choice,
                     capacity, scope, memory=memory, bandwidth=bandwidth, latency=latency, seed=seed,
                     workers=workers)


def memory_parts(trace: Trace, per_token: bool, weights: bool, span_entries: int = SPAN_ENTRIES
                 ) -> Iterator[Part]:
    """An in-memory trace's whole steps, about ``span_entries`` requested experts at a time
    (a larger step alone), each with its step sets (and router weight per entry with
    ``weights``)."""
    starts = step_bounds(trace, per_token)
    num_steps = len(starts) - 1
    span_tokens = max(1, span_entries // (trace.num_layers * trace.top_k))
    first = 0
    while first < num_steps:
        start = int(starts[first])
        stop = int(np.searchsorted(starts, start + span_tokens, side="right")) - 1
        stop = min(max(stop, first + 1), num_steps)
        end = int(starts[stop])
        bounds, experts = starts[first:stop + 1] - start, trace.experts[start:end]
        ids, offsets = step_unions(experts, bounds, trace.num_experts)
        scores = None
        if weights:
            scores = step_scores(experts, trace.weights[start:end], bounds, ids, offsets, trace.num_experts)
        req = Requests(ids, offsets, trace.num_layers, trace.num_experts, end - start)
        yield Part(end - start, req, scores)
        first = stop


def _one_pass(counter: _Counter, parts: Iterator[Part], choice: Choice, capacity: int | None, scope: str, *,
              memory: str | int | None, bandwidth: str | float | None, latency: str | float, seed: int,
              workers: int | None) -> ReplayResult:
    """The replay of ``parts`` counted by ``counter``, each part served as soon as it is
    counted. The step sets counted so far are checked against the cache before each
    part; a set that does not fit stops the serving, and the error names the largest set
    once every part is counted, as for a replay of the whole trace."""
    header, per_token = counter.header, counter.per_token

    def checked() -> Plan:  # the replay's settings against the step sets counted so far
        return plan(header, choice, scope, capacity=capacity, memory=memory, per_token=per_token,
                    bandwidth=bandwidth, latency=latency, seed=seed, requests=counter.progress())  # type: ignore[arg-type]

    settings = checked()
    caches = [settings.layer_capacities] if scope == "layer" else [(settings.pool, settings.units)]

    def fitting_spans() -> Iterator[Span]:
        fits = True
        for part in parts:
            span = counter.count(part)
            if fits:
                try:
                    checked()
                except MoecacheError:
                    fits = False  # read on: the error names the largest set of the whole trace
            if fits:
                yield span
    hits = _serve_spans(fitting_spans(), choice, scope, caches, seed, workers, header.num_layers,
                        header.num_experts)[0]
    counted = counter.finish()
    final = checked()  # raises if a step set did not fit
    return summarize(header, counted, hits, final.policy.label, scope,  # type: ignore[arg-type]
                     final.capacity, final.memory_bytes, final.bandwidth, final.latency)


def _serve(stream: StreamedTrace, choice: Choice, scope: str, caches: list, seed: int,
           workers: int | None) -> np.ndarray:
    """Hits per layer (rows: ``caches``) of one pass over the spilled spans."""
    policy = choice.policy
    return _serve_spans(stream.iter_spans(scores=policy.needs_scores, future=policy.needs_future), choice,
                        scope, caches, seed, workers, stream.num_layers, stream.num_experts, stream.num_steps)


def _serve_spans(spans: Iterator[Span], choice: Choice, scope: str, caches: list, seed: int,
                 workers: int | None, layers: int, experts: int, num_steps: int = 0) -> np.ndarray:
    """Hits per layer (rows: ``caches``) of one pass over ``spans``. A cache is the
    capacities per layer (layer scope) or (pool, units per layer) (global scope); the
    caches of a span run ``workers`` at a time. ``num_steps``: of the whole stream, for
    the policies that read its length or future (0 when it is not known yet: a one-pass
    replay, whose policies read neither)."""
    if scope == "layer":
        sessions = [Session(choice, np.ones(experts, np.int64), capacity, seed)
                    for cache in caches for capacity in cache]
        total = num_steps
    else:
        sessions = [Session(choice, np.repeat(np.asarray(units, np.int64), experts), pool, seed)
                    for pool, units in caches]
        total = num_steps * layers
    hits = np.zeros((len(caches), layers), np.int64)
    layer_entries = np.zeros(layers, np.int64)  # entries of each layer's stream before the span
    streamed = ((span, _span_streams(span, scope, num_steps, layers))  # the next one read while
                for span in spans)
    for span, streams in read_ahead(streamed):  # the caches serve this one
        first = span.first_step * (1 if scope == "layer" else layers)
        starts = layer_entries if scope == "layer" else [span.first_entry]

        def one(index: int, streams=streams, first=first, starts=starts) -> np.ndarray:
            keys, offsets, scores, future = streams[index % len(streams)]
            per_request = sessions[index].serve(keys, offsets, first, int(starts[index % len(streams)]),
                                                total, scores, future)
            return per_request.reshape(-1, 1 if scope == "layer" else layers).sum(axis=0, dtype=np.int64)

        hits += np.concatenate(map_parallel(one, len(sessions), workers)).reshape(len(caches), layers)
        if scope == "layer":
            layer_entries += [len(keys) for keys, _, _, _ in streams]
    return hits


def _span_streams(span: Span, scope: str, num_steps: int, layers: int) -> list[tuple]:
    """The request streams a span feeds: (keys, offsets, scores, next requests) of each
    layer (layer scope: the next request is the next step) or of the pooled keys (global
    scope: the next request is step x L + layer, or L x the steps if none)."""
    req = span.requests
    if scope == "layer":
        out = []
        for layer in range(layers):
            keys, offsets = req.layer(layer)
            out.append((keys, offsets, None if span.scores is None else req.layer_values(span.scores, layer),
                        None if span.next_steps is None else req.layer_values(span.next_steps, layer)))
        return out
    keys, offsets = req.pooled()
    future = None
    if span.next_steps is not None:
        layer_of = np.repeat(np.arange(len(offsets) - 1) % layers, np.diff(offsets))
        next_steps = span.next_steps.astype(np.int64)  # x L may pass 32 bits
        future = np.where(next_steps == num_steps, num_steps * layers, next_steps * layers + layer_of)
    return [(keys, offsets, span.scores, future)]
