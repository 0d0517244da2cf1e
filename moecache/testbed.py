"""Decode time measured on this machine's disk beside the timeline's prediction (docs/testbed.md).

``testbed`` replays a trace for real: every (layer, expert) has its bytes in a file on local
disk, the cache holds real buffers in RAM, and each miss and prefetch is an ``os.preadv`` of
the file opened with ``O_DIRECT`` (the page cache is bypassed) by ``queue_depth`` worker
threads serving one FIFO queue in issue order. Compute is emulated: a busy-wait on
``time.perf_counter_ns`` of ``dense_us`` per position and ``compute_us`` per expert, in the
main thread (the device). Which expert misses, and which prefetch is inserted, comes from
``moecache.replay(..., record_outcomes=True)``, the cache decisions the timeline uses; the
order of the walk is the timeline's (:mod:`moecache.timeline_engine`): at position p the
dense work, then the prefetch batch issued there (the one serving p + depth), then p's demand
misses, then p's experts in order of readiness.

The prediction is ``moecache.timeline`` on a Hardware built from measurements: the link
measured by :func:`calibrate` before the run, and the device's times as the main thread
really spent them (expert busy-waits as they ran; everything else it did outside waiting
for reads, the harness's Python included, as non-expert time per token). So the compute
side is measured, and what is compared is the model of I/O: queueing, overlap, prefetch.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moecache.policies.driver import MISS

from . import prefetchers, profiles
from .errors import MoecacheError
from .replay import replay
from .requests import Requests
from .timeline import TimelineResult, timeline
from .trace import Trace
from .trace_format import OPTIONAL_COLUMNS
from .units import format_bytes

ALIGN = 4096  # O_DIRECT offsets, sizes and buffers are multiples of this
MAX_FILE_BYTES = 256 * 2**20  # the default expert size keeps the file at most this large
WRITE_BYTES = 16 * 2**20  # the expert file is written this much at a time
# how often the spinning main thread hands the GIL over (the default 5 ms would delay the I/O threads)
SWITCH_INTERVAL_S = 5e-5
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # they take O_DIRECT (Linux >= 6.6) but hold files in RAM
CALIBRATION_S = 0.4  # seconds of reads per calibration phase


@dataclass
class TestbedResult:
    """Measured decode time beside the prediction; ``to_dict`` gives the JSON keys."""

    __test__ = False  # not a pytest class

    policy: str
    scope: str
    capacity: int | None
    prefetch: str | None
    depth: int
    budget: int
    steps: int
    expert_bytes: int
    compute_s: float
    dense_s: float
    queue_depth: int
    link: profiles.Link  # calibrated before the run
    observed_link: profiles.Link  # the link with the bandwidth the run's reads got (observed_link)
    device_dense_s: float  # measured: the main thread's time per token outside expert busy-waits and stalls
    device_expert_s: float  # measured: one expert busy-wait as it ran
    measured_stall_s: float  # measured: the main thread's wait for reads, in all
    file_bytes: int
    direct_io: bool  # the file descriptor the reads used carried O_DIRECT
    reads: int  # demand reads
    prefetch_reads: int
    hits: int
    misses: int
    measured_tpot_s: float
    measured_tpot_p50_s: float
    measured_tpot_p95_s: float
    predicted_tpot_s: float
    predicted_tpot_p50_s: float
    predicted_tpot_p95_s: float
    predicted_observed_tpot_s: float  # the prediction with observed_link
    step_seconds: np.ndarray = field(repr=False)
    prediction: TimelineResult = field(repr=False)
    walked: Walked = field(repr=False)

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured of the mean TPOT."""
        return (self.predicted_tpot_s - self.measured_tpot_s) / self.measured_tpot_s

    @property
    def observed_error(self) -> float:
        """The relative error of the prediction with the link the run's reads saw."""
        return (self.predicted_observed_tpot_s - self.measured_tpot_s) / self.measured_tpot_s

    def to_dict(self) -> dict[str, Any]:
        keys = ("policy", "scope", "capacity", "prefetch", "depth", "budget", "steps", "expert_bytes",
                "compute_s", "dense_s", "queue_depth", "file_bytes", "direct_io", "reads", "prefetch_reads",
                "hits", "misses", "measured_tpot_s", "measured_tpot_p50_s", "measured_tpot_p95_s",
                "predicted_tpot_s", "predicted_tpot_p50_s", "predicted_tpot_p95_s", "relative_error",
                "predicted_observed_tpot_s", "observed_error")
        out = {k: getattr(self, k) for k in keys}
        out["link"] = self.link.to_dict()
        out["observed_link"] = self.observed_link.to_dict()
        out["device_dense_s"] = self.device_dense_s
        out["device_expert_s"] = self.device_expert_s
        out["measured_stall_s"] = self.measured_stall_s
        out["predicted_stall_s"] = self.prediction.stall_s
        out["predicted_stall_share"] = self.prediction.stall_share
        out["predicted_io_busy_share"] = self.prediction.io_busy_share
        return out

    def summary(self) -> str:
        """A few lines for the terminal."""
        link = self.link
        return "\n".join([
            f"{self.policy}, capacity {self.capacity} ({self.scope}), prefetch {self.prefetch or 'none'}"
            f"{f' depth {self.depth}' if self.prefetch else ''}: {self.steps} steps, "
            f"{self.reads} demand + {self.prefetch_reads} prefetch reads of {self.expert_bytes} B (O_DIRECT)",
            f"link: {link.bandwidth / 1e6:.0f} MB/s, latency {link.latency * 1e6:.0f} us, "
            f"queue depth {link.queue_depth}; device as it ran: {self.device_dense_s * 1e3:.3f} ms/token "
            f"non-expert, {self.device_expert_s * 1e6:.1f} us/expert (nominal {self.dense_s * 1e6:.0f} us/"
            f"position, {self.compute_s * 1e6:.0f} us/expert)",
            f"TPOT measured  {self.measured_tpot_s * 1e3:8.3f} ms (p50 {self.measured_tpot_p50_s * 1e3:.3f}, "
            f"p95 {self.measured_tpot_p95_s * 1e3:.3f})",
            f"TPOT predicted {self.predicted_tpot_s * 1e3:8.3f} ms "
            f"(p50 {self.predicted_tpot_p50_s * 1e3:.3f}, p95 {self.predicted_tpot_p95_s * 1e3:.3f})",
            f"relative error {100 * self.relative_error:+.1f}%",
            f"with the bandwidth the run's reads got ({self.observed_link.bandwidth / 1e6:.0f} MB/s): "
            f"predicted {self.predicted_observed_tpot_s * 1e3:.3f} ms, "
            f"error {100 * self.observed_error:+.1f}%",
        ])


# -- the expert file -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertFile:
    """A file of ``keys`` experts of ``expert_bytes`` each (key = layer x E + expert at offset
    key x expert_bytes) and a descriptor of it opened with O_DIRECT."""

    path: Path
    fd: int
    keys: int
    expert_bytes: int

    @property
    def size(self) -> int:
        return self.keys * self.expert_bytes


def aligned(size: int) -> int:
    """``size`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-size // ALIGN) * ALIGN


def default_expert_bytes(trace: Trace) -> int:
    """The trace's largest expert size, capped so that the file of every expert stays within
    :data:`MAX_FILE_BYTES`; aligned."""
    cap = max(ALIGN, MAX_FILE_BYTES // (trace.num_layers * trace.num_experts) // ALIGN * ALIGN)
    sizes = trace.expert_bytes
    return cap if sizes is None else min(cap, aligned(int(sizes.max())))


@contextlib.contextmanager
def expert_file(keys: int, expert_bytes: int, directory: str | os.PathLike | None = None,
                seed: int = 0) -> Iterator[ExpertFile]:
    """A temporary file of ``keys`` random experts in ``directory`` (default: beside the
    current directory if it is writable, else $TMPDIR), opened with O_DIRECT; removed on exit."""
    if expert_bytes % ALIGN or expert_bytes <= 0:
        raise MoecacheError(f"expert bytes must be a positive multiple of {ALIGN} for O_DIRECT, "
                            f"got {expert_bytes}")
    where = Path(directory) if directory is not None else _default_directory()
    if not where.is_dir():
        raise MoecacheError(f"{where}: not a directory (the testbed's expert file goes there)")
    total, free = keys * expert_bytes, shutil.disk_usage(where).free
    if total > free:
        raise MoecacheError(f"{where}: the expert file needs {format_bytes(total)} ({keys} experts of "
                            f"{format_bytes(expert_bytes)}), the disk has {format_bytes(free)} free: "
                            "give smaller --expert-bytes")
    kind = filesystem(where)
    if kind in MEMORY_FILESYSTEMS:
        raise MoecacheError(f"{where}: a {kind} filesystem lives in memory, its O_DIRECT reads touch no "
                            "disk: give a directory on a local disk")
    try:
        handle, name = tempfile.mkstemp(prefix="moecache-testbed-", suffix=".bin", dir=where)
    except OSError as err:
        raise MoecacheError(f"{where}: cannot create the expert file: {err.strerror}") from None
    path, fd = Path(name), -1
    try:
        with os.fdopen(handle, "wb") as out:
            rng = np.random.default_rng(seed)
            for start in range(0, total, WRITE_BYTES):
                out.write(rng.bytes(min(WRITE_BYTES, total - start)))
            out.flush()
            os.fsync(out.fileno())
        fd = _open_direct(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        yield ExpertFile(path, fd, keys, expert_bytes)
    finally:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; '' if unknown)."""
    target, best, kind = path.resolve(), -1, ""
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            mount = Path(fields[1].replace("\\040", " "))
            if (target == mount or mount in target.parents) and len(mount.parts) > best:
                best, kind = len(mount.parts), fields[2]
    return kind


def _default_directory() -> Path:
    here = Path.cwd()
    return here if os.access(here, os.W_OK) else Path(tempfile.gettempdir())


def _open_direct(path: Path) -> int:
    """``path`` opened read-only with O_DIRECT, after one aligned read proves it works there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        raise MoecacheError(f"{path.parent}: the filesystem refuses O_DIRECT ({err.strerror}): give a "
                            "directory on a local disk") from None
    probe = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [probe], 0)
    except OSError as err:
        os.close(fd)
        raise MoecacheError(f"{path.parent}: O_DIRECT reads fail there ({err.strerror}): give a "
                            "directory on a local disk") from None
    finally:
        probe.close()
    return fd


def is_direct(fd: int) -> bool:
    """Whether the open file ``fd`` reads with O_DIRECT."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


# -- calibration -----------------------------------------------------------------------------------

def calibrate(path: str | os.PathLike, expert_bytes: int, queue_depth: int, *,
              seconds: float = CALIBRATION_S, seed: int = 0) -> profiles.Link:
    """The link of the timeline (docs/semantics.md, "Timeline"), measured on ``path`` with
    O_DIRECT reads at random aligned offsets: a request costs ``latency`` (overlapping across
    the ``queue_depth`` slots), then its bytes over one channel at ``bandwidth``.

    ``t_small``: mean time of one 4 KiB read at a time (latency + 4096 / bandwidth); ``T``:
    mean time per read of ``expert_bytes`` with ``queue_depth`` threads reading back to back
    (timed after as long a warm-up: a throttled disk serves a burst faster than it sustains),
    which the model gives as max(s/B, (latency + s/B) / queue_depth). Solving the two:
    s/B = min(T, queue_depth x T - latency).
    """
    if expert_bytes % ALIGN or expert_bytes <= 0:
        raise MoecacheError(f"expert bytes must be a positive multiple of {ALIGN}, got {expert_bytes}")
    _check_queue_depth(queue_depth)
    fd = _open_direct(Path(path))
    try:
        size = os.fstat(fd).st_size
        if size < expert_bytes:
            raise MoecacheError(f"{path}: the file ({size} B) is smaller than one expert ({expert_bytes} B)")
        t_small = _mean_read_time(fd, ALIGN, size, 1, seconds, seed)
        _mean_read_time(fd, expert_bytes, size, queue_depth, seconds, seed + 1)  # to the steady state
        per_read = _mean_read_time(fd, expert_bytes, size, queue_depth, seconds, seed + 2)
    finally:
        os.close(fd)
    transfer = min(per_read, queue_depth * per_read - t_small)
    bandwidth = expert_bytes / max(transfer, 1e-9)
    latency = max(0.0, t_small - ALIGN / bandwidth)
    return profiles.Link(bandwidth, latency, queue_depth)


def _mean_read_time(fd: int, size: int, file_bytes: int, threads: int, seconds: float, seed: int) -> float:
    """Wall seconds per read of ``size`` bytes, ``threads`` reading at once for ``seconds``."""
    slots = file_bytes // size
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def work(index: int) -> None:
        buffer = mmap.mmap(-1, size)
        offsets = np.random.default_rng([seed, index]).integers(0, slots, 1 << 16) * size
        n = 0
        while time.perf_counter() < deadline:
            os.preadv(fd, [buffer], int(offsets[n % len(offsets)]))
            n += 1
        counts[index] = n
        buffer.close()

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - start) / max(1, sum(counts))


def _check_queue_depth(queue_depth: int) -> None:
    if isinstance(queue_depth, bool) or not isinstance(queue_depth, int) or not 1 <= queue_depth <= 256:
        raise MoecacheError(f"queue depth must be a whole number from 1 to 256, got {queue_depth!r}")


# -- the walk --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """What the walk does at each position p (step-major, p = t L + l), CSR by position:
    the positions' experts (key, read or hit) and the prefetch reads of the batch serving p
    (issued at position p - depth)."""

    dense_ns: np.ndarray  # busy-wait per position
    entry_offsets: np.ndarray
    entry_keys: np.ndarray
    entry_read: np.ndarray  # bool: a demand miss
    batch_offsets: np.ndarray
    batch_keys: np.ndarray
    depth: int
    layers: int

    @property
    def positions(self) -> int:
        return len(self.dense_ns)


def _spin(ns: int) -> int:
    """Busy-wait ``ns`` nanoseconds (sleeping is far too coarse); returns the nanoseconds it
    really took (more when the thread was descheduled at its end)."""
    begin = time.perf_counter_ns()
    end, now = begin + ns, begin
    while now < end:
        now = time.perf_counter_ns()
    return now - begin


@dataclass(frozen=True)
class Walked:
    """Seconds from the start of a walk: the end of every position, and when each read
    began and completed (in issue order); the seconds the main thread waited for reads
    (stall) and spent in expert busy-waits, as they really ran."""

    ends: np.ndarray
    read_starts: np.ndarray
    read_ends: np.ndarray
    stall_s: float
    expert_s: float


def walk(schedule: Schedule, store: ExpertFile, compute_ns: int, queue_depth: int, slots: int,
         progress: bool = False) -> Walked:
    """Run ``schedule`` for real and time it. Reads go to ``queue_depth`` threads serving one
    FIFO queue; each lands in one of ``slots`` expert buffers (the cache's memory), in turn."""
    size = store.expert_bytes
    memory = mmap.mmap(-1, max(1, slots) * size)
    view = memoryview(memory)
    done: list[int] = []  # completion time of each read (0 while in flight)
    began: list[int] = []  # when a thread started each read
    requests: queue.SimpleQueue = queue.SimpleQueue()
    stopping = threading.Event()

    def serve() -> None:
        while True:
            item = requests.get()
            if item is None or stopping.is_set():
                return
            read, offset, slot = item
            began[read] = time.perf_counter_ns()
            os.preadv(store.fd, [view[slot * size:(slot + 1) * size]], offset)
            done[read] = time.perf_counter_ns()

    workers = [threading.Thread(target=serve, daemon=True) for _ in range(queue_depth)]
    for worker in workers:
        worker.start()
    latest = {}  # key -> its latest read
    ends = np.zeros(schedule.positions)
    entry_offsets, entry_keys, entry_read = (schedule.entry_offsets.tolist(), schedule.entry_keys.tolist(),
                                             schedule.entry_read.tolist())
    batch_offsets, batch_keys = schedule.batch_offsets.tolist(), schedule.batch_keys.tolist()
    dense = schedule.dense_ns.tolist()
    depth, layers = schedule.depth, schedule.layers

    def issue(key: int) -> int:
        read = len(done)
        done.append(0)
        began.append(0)
        latest[key] = read
        requests.put((read, key * size, read % slots))
        return read

    def first_ready(waiting: list[int]) -> int:
        """Index of the read in ``waiting`` that completed first (-1: a resident expert, done),
        or -1 when none has."""
        best, best_time = -1, 0
        for i, read in enumerate(waiting):
            ready = 1 if read < 0 else done[read]
            if ready and (best < 0 or ready < best_time):
                best, best_time = i, ready
        return best

    stalled = computed = 0
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    bar = tqdm(total=schedule.positions // layers, desc="testbed", unit="step",
               disable=None if progress else True, mininterval=0.5, leave=False)
    try:
        start = time.perf_counter_ns()
        for p in range(-depth, schedule.positions):
            if p >= 0:
                _spin(dense[p])
            issued = p + depth
            if 0 <= issued < schedule.positions:
                for j in range(batch_offsets[issued], batch_offsets[issued + 1]):
                    issue(batch_keys[j])
            if p < 0:
                continue
            waiting = []
            for j in range(entry_offsets[p], entry_offsets[p + 1]):
                key = entry_keys[j]
                waiting.append(issue(key) if entry_read[j] else latest.get(key, -1))
            while waiting:  # compute the ready expert that became ready first
                best = first_ready(waiting)
                if best < 0:
                    waited = time.perf_counter_ns()
                    while best < 0:
                        best = first_ready(waiting)
                    stalled += time.perf_counter_ns() - waited
                waiting.pop(best)
                computed += _spin(compute_ns)
            ends[p] = time.perf_counter_ns()
            if p % layers == layers - 1:
                bar.update()
        return Walked((ends - start) / 1e9, (np.array(began, np.float64) - start) / 1e9,
                      (np.array(done, np.float64) - start) / 1e9, stalled / 1e9, computed / 1e9)
    finally:
        sys.setswitchinterval(previous)
        bar.close()
        stopping.set()
        for _ in workers:
            requests.put(None)
        for worker in workers:
            worker.join()
        view.release()
        memory.close()


# -- the testbed -----------------------------------------------------------------------------------

def testbed(
    trace: Trace,
    policy: Any = "lru",
    capacity: int | None = None,
    *,
    scope: str = "layer",
    prefetch: str | None = None,
    depth: int = 1,
    budget: int | None = None,
    expert_bytes: int | None = None,
    compute_us: float = 400.0,
    dense_us: float = 200.0,
    queue_depth: int = 4,
    directory: str | os.PathLike | None = None,
    calibrate: bool | profiles.Link = True,
    store: ExpertFile | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
) -> TestbedResult:
    """Replay ``trace`` on this machine's disk and predict the same run with the timeline.

    The cache (``policy``, ``capacity`` experts, ``scope``) and the prefetcher (``prefetch``,
    ``budget`` experts issued ``depth`` positions ahead) are those of ``moecache.timeline``.
    Each expert has ``expert_bytes`` (default: :func:`default_expert_bytes`); misses and
    prefetches are O_DIRECT reads by ``queue_depth`` threads; the device busy-waits
    ``dense_us`` per position (times the step's tokens) and ``compute_us`` per expert.
    ``calibrate``: True measures the link (:func:`calibrate`), or give a Link. ``store``: an open
    :func:`expert_file` to reuse (else one is written in ``directory`` and removed after).
    ``max_steps`` keeps the first steps of the trace.
    """
    if not isinstance(trace, Trace):
        raise MoecacheError(f"testbed needs a Trace, got {type(trace).__name__}")
    _check_queue_depth(queue_depth)
    for name, value in (("compute_us", compute_us), ("dense_us", dense_us)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0):
            raise MoecacheError(f"{name} must be a finite number >= 0, got {value!r}")
    if max_steps is not None:
        trace = first_steps(trace, max_steps)
    size = aligned(expert_bytes) if expert_bytes is not None else default_expert_bytes(trace)
    if store is not None and store.expert_bytes != size:
        raise MoecacheError(f"the expert file holds experts of {store.expert_bytes} B, not {size} B")
    layers, experts = trace.num_layers, trace.num_experts
    trace = replace(trace, meta={**trace.meta, "expert_bytes": [size] * layers, "dtype": "float16"})
    req = Requests.from_trace(trace)
    budget = trace.top_k if budget is None else budget
    batches = None
    if prefetch is not None:
        if prefetchers.resolve(prefetch).needs_training:
            raise MoecacheError(f"prefetcher {prefetch} is fitted on training sequences: the testbed runs "
                                "prefetchers that need no training")
        scores = req.scores(trace) if trace.weights is not None else None
        batches = prefetchers.plan(prefetch, prefetchers.Lookahead(req, scores, depth, budget, 0, trace))
    outcome = replay(trace, policy, capacity, scope, seed=seed, requests=req, prefetch=batches,
                     record_outcomes=True)
    positions = len(req.offsets) - 1
    tokens = np.repeat(req.step_tokens(trace), layers)
    if batches is None:
        batch_offsets, batch_keys = np.zeros(positions + 1, np.int64), np.zeros(0, np.int64)
    else:
        batch_keys, _, batch_offsets = batches.inserted(outcome.prefetch_outcomes, experts)
    schedule = Schedule(np.round(tokens * dense_us * 1e3).astype(np.int64), req.offsets.astype(np.int64),
                        req.pooled()[0].astype(np.int64), outcome.outcomes == MISS,
                        batch_offsets.astype(np.int64), batch_keys, depth if batches is not None else 0,
                        layers)
    cache_slots = min(layers * experts, outcome.capacity * (layers if scope == "layer" else 1))
    memory = max(cache_slots, queue_depth) * size
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if memory > available:
        raise MoecacheError(f"the testbed's cache needs {format_bytes(memory)} of RAM "
                            f"({max(cache_slots, queue_depth)} experts of {format_bytes(size)}), "
                            f"{format_bytes(available)} is free: give smaller --expert-bytes")
    with contextlib.ExitStack() as stack:
        if store is None:
            store = stack.enter_context(expert_file(layers * experts, size, directory, seed))
        link = calibrate_link(store, queue_depth, calibrate, seed)
        walked = walk(schedule, store, round(compute_us * 1e3), queue_depth, max(cache_slots, queue_depth),
                      progress)
        direct = is_direct(store.fd)
        file_bytes = store.size
    step_end = walked.ends[layers - 1::layers]
    measured = per_token(np.diff(np.concatenate([[0.0], step_end])), req.step_tokens(trace))
    seen = observed_link(walked, size, link)
    computed = int(req.offsets[-1])
    expert_s = walked.expert_s / computed if computed else compute_us / 1e6
    dense_s = (float(walked.ends[-1]) - walked.stall_s - walked.expert_s) / req.num_tokens
    predicted, predicted_seen = (
        timeline(trace, _machine(used, size, expert_s, file_bytes), policy, capacity, scope,
                 dense_ms=dense_s * 1e3, prefetch=prefetch, depth=depth, budget=budget, seed=seed)
        for used in (link, seen))
    return TestbedResult(
        policy=outcome.policy, scope=scope, capacity=outcome.capacity, prefetch=prefetch, depth=depth,
        budget=budget, steps=req.num_steps, expert_bytes=size, compute_s=compute_us / 1e6,
        dense_s=dense_us / 1e6, queue_depth=queue_depth, link=link, observed_link=seen,
        device_dense_s=dense_s, device_expert_s=expert_s, measured_stall_s=walked.stall_s,
        file_bytes=file_bytes, direct_io=direct, reads=int(schedule.entry_read.sum()),
        prefetch_reads=len(batch_keys), hits=outcome.hits, misses=outcome.misses,
        measured_tpot_s=float(measured.mean()), measured_tpot_p50_s=float(np.percentile(measured, 50)),
        measured_tpot_p95_s=float(np.percentile(measured, 95)), predicted_tpot_s=predicted.tpot_s,
        predicted_tpot_p50_s=predicted.tpot_p50_s, predicted_tpot_p95_s=predicted.tpot_p95_s,
        predicted_observed_tpot_s=predicted_seen.tpot_s, step_seconds=step_end, prediction=predicted,
        walked=walked)


def _machine(link: profiles.Link, expert_bytes: int, expert_s: float, file_bytes: int) -> profiles.Hardware:
    """The testbed as a timeline Hardware: ``link`` to the disk, experts computed in ``expert_s``
    (infinite FLOP/s, so the memory-bound time expert_bytes / memory_bandwidth is the time)."""
    return profiles.Hardware(
        "testbed", "this machine: a disk link, busy-wait compute", math.inf,
        expert_bytes / expert_s if expert_s > 0 else math.inf, file_bytes, math.inf, math.inf, link,
        (profiles.Tier("disk", file_bytes, link),))


def observed_link(walked: Walked, expert_bytes: int, link: profiles.Link) -> profiles.Link:
    """``link`` with the bandwidth the walk's reads got: their bytes over the time at least one
    read was in service, less one ``link.latency`` per such busy period (the model's latency
    of the first read of a period; later ones overlap). The disk of a shared machine drifts
    between a calibration and the run; this separates that drift from the model's error."""
    if not len(walked.read_starts):
        return link
    order = np.argsort(walked.read_starts, kind="stable")
    starts, ends = walked.read_starts[order], walked.read_ends[order]
    reach = np.maximum.accumulate(ends)
    first = np.concatenate([[True], starts[1:] > reach[:-1]])  # a read that opens a busy period
    last = np.concatenate([first[1:], [True]])
    busy = float((reach[last] - starts[first]).sum()) - link.latency * int(first.sum())
    return replace(link, bandwidth=len(starts) * expert_bytes / max(busy, 1e-9))


def calibrate_link(store: ExpertFile, queue_depth: int, choice: bool | profiles.Link, seed: int = 0
                   ) -> profiles.Link:
    """The link to predict with: ``choice`` itself, or measured on ``store`` (True)."""
    if isinstance(choice, profiles.Link):
        return choice
    if choice is not True:
        raise MoecacheError("calibrate must be True (measure the disk) or a Link")
    return calibrate(store.path, store.expert_bytes, queue_depth, seed=seed)


def per_token(step_seconds: np.ndarray, step_tokens: np.ndarray) -> np.ndarray:
    """Seconds per output token as the timeline counts them: the decode steps (one token)
    when there are any, else every step's time over its tokens."""
    decode = step_tokens == 1
    return step_seconds[decode] if decode.any() else step_seconds / step_tokens


def first_steps(trace: Trace, steps: int) -> Trace:
    """The first ``steps`` steps of ``trace``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MoecacheError(f"max steps must be a whole number >= 1, got {steps!r}")
    end = int(trace.step_starts()[min(steps, trace.num_steps)])
    names = ("experts", "step", "seq", "pos", "token_id", "phase")
    cut = {name: getattr(trace, name)[:end] for name in names}
    for name in OPTIONAL_COLUMNS:
        if getattr(trace, name) is not None:
            cut[name] = getattr(trace, name)[:end]
    return replace(trace, **cut)
