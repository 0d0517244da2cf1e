"""``capture()``: run a Hugging Face MoE model over prompts and stream its routing to a trace.

Two modes:

``generate`` (default)
    ``model.generate`` with a KV cache, prompts in batches of ``batch_size`` (left
    padded). Each model forward is one step: the prefill of a batch is one step holding
    every real prompt token of the batch (phase ``prefill``), each decode forward is one
    step holding one token per unfinished sequence (phase ``decode``). Padding is never
    recorded. The last generated token is never forwarded, so N new tokens give N - 1
    decode steps; a sequence that produced EOS stops being recorded (its EOS, like a last
    token, is not forwarded for it).

``forward``
    Teacher forcing over the prompt texts: one forward (no cache) per batch, and every
    real token becomes its own step, sequence after sequence, so that replay sees the
    text as a batch-1 decode would. These rows have phase ``prefill`` because the tokens
    are given, not generated. ``max_new_tokens`` is unused.

Rows: ``seq`` is the prompt's index (after ``limit``), ``pos`` the token's position in
its sequence (prompt tokens first, BOS included), ``token_id`` the token fed to the
model. Experts are what each layer's router returned (see :mod:`.routers`), ordered by
descending gate weight. With ``lookahead`` the ``lookahead`` columns hold what the next
MoE layer's router returns for this layer's router input (see :mod:`.recorder`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import platform
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import MoecacheError
from ..remoe.checkpoint import router_label as default_router_label
from ..trace_format import DECODE, PREFILL, build_meta, now_iso
from ..trace_io import TraceWriter, check_output
from ..units import check_seed
from .gguf_capture import capture_gguf, is_gguf
from .prompts import Prompts, load_prompts
from .torch_env import dtype_name, input_device, load_model, require_torch, seed_torch

MODES = ("generate", "forward")


def capture(
    model_path: str | os.PathLike,
    prompts: str | os.PathLike | Sequence[str],
    out: str | os.PathLike | None = None,
    *,
    mode: str = "generate",
    max_new_tokens: int = 32,
    batch_size: int = 1,
    do_sample: bool = False,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    save_logits: bool = False,
    lookahead: bool = False,
    router_label: str | None = None,
    limit: int | None = None,
    chat_template: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Capture the routing of the model at ``model_path`` over ``prompts`` into ``out``.

    Loads the model and its tokenizer from the local folder (or the local Hugging Face
    cache; nothing is downloaded) with ``AutoModelForCausalLM`` / ``AutoTokenizer``,
    hooks its routers and writes a trace with one row per (token, MoE
    layer). ``prompts`` is a text file (one prompt a line), a JSONL file (``prompt`` or
    ``text`` field) or a list of strings. See the module docstring for ``mode``.

    Options map to ``moecache capture``: MODEL, --prompts, --out, --mode,
    --max-new-tokens, --batch-size, --sample/--greedy (``do_sample``), --seed,
    --device auto|cpu|cuda, --dtype auto|float32|float16|bfloat16, --save-logits
    (store each router's full scores, float16), --lookahead (also record the experts,
    and their weights, that the next MoE layer's router picks from each MoE layer's
    router input: the signal of gate-lookahead prefetchers), --router-label (default: "remoe" for a
    folder written by ``moecache remoe finetune``, i.e. holding remoe.json, else
    "baseline"), --limit,
    --chat-template (wrap each prompt as a user message of the tokenizer's chat
    template), --force (``overwrite``). ``out`` defaults to ``traces/<model>.parquet``.

    Output is streamed crash-safely: if the run is interrupted (KeyboardInterrupt or an
    error) the trace of every completed step is written with metadata ``partial: true``
    and the exception propagates. Returns the path written.

    A ``model_path`` ending in ``.gguf`` runs in llama.cpp instead
    (:func:`.gguf_capture.capture_gguf`; batch_size, dtype, save_logits, lookahead and
    chat_template must keep their defaults there).
    """
    if is_gguf(model_path):
        out = default_out(model_path, mode) if out is None else out
        return capture_gguf(
            model_path, prompts, out, mode=mode, max_new_tokens=max_new_tokens,
            do_sample=do_sample, seed=seed, device=device,
            router_label=router_label or default_router_label(model_path), limit=limit,
            overwrite=overwrite, progress=progress, batch_size=batch_size, dtype=dtype,
            save_logits=save_logits, lookahead=lookahead, chat_template=chat_template)
    check_options(mode=mode, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype, seed=seed)
    prompt_set = load_prompts(prompts, limit=limit)
    out = default_out(model_path, mode) if out is None else Path(out)
    check_output(out, overwrite=overwrite, streaming=True)
    if router_label is None:
        router_label = default_router_label(model_path)
    model, tokenizer = load_model(model_path, device=device, dtype=dtype)
    return capture_model(
        model, tokenizer, prompt_set, out, mode=mode, max_new_tokens=max_new_tokens,
        batch_size=batch_size, do_sample=do_sample, seed=seed, save_logits=save_logits,
        lookahead=lookahead, router_label=router_label, chat_template=chat_template, overwrite=overwrite,
        progress=progress, model_name=str(model_path))


def capture_model(
    model: Any,
    tokenizer: Any,
    prompts: str | os.PathLike | Sequence[str] | Prompts,
    out: str | os.PathLike,
    *,
    mode: str = "generate",
    max_new_tokens: int = 32,
    batch_size: int = 1,
    do_sample: bool = False,
    seed: int = 0,
    save_logits: bool = False,
    lookahead: bool = False,
    router_label: str = "baseline",
    limit: int | None = None,
    chat_template: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> Path:
    """:func:`capture` for a model and tokenizer already loaded (puts the model in eval mode)."""
    torch = require_torch()
    from tqdm.auto import tqdm

    from .recorder import RoutingRecorder
    from .routers import find_routers

    check_options(mode=mode, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    prompt_set = load_prompts(prompts, limit=limit)
    out = Path(out)
    check_output(out, overwrite=overwrite, streaming=True)
    model.eval()
    info = find_routers(model, probe_token=pad_id(model, tokenizer))
    token_lists = encode_prompts(tokenizer, prompt_set.texts, chat_template=chat_template)
    eos = eos_ids(model, tokenizer)
    meta = _meta(model, info, prompt_set, mode=mode, max_new_tokens=max_new_tokens,
                 batch_size=batch_size, do_sample=do_sample, seed=seed,
                 chat_template=chat_template, router_label=router_label,
                 model_name=model_name, eos=eos, lookahead=lookahead)
    seed_torch(seed)
    session_type = _GenerateSession if mode == "generate" else _ForwardSession
    total = None if mode == "generate" else sum(len(t) for t in token_lists)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"capture {mode}",
               disable=not progress, dynamic_ncols=True)
    with (bar, TraceWriter(out, meta, with_weights=True, with_logits=save_logits,
                           with_lookahead=lookahead, overwrite=overwrite) as writer,
          RoutingRecorder(info.sites, with_logits=save_logits, lookahead=lookahead) as recorder):
        session = session_type(model, tokenizer, recorder, writer, bar, eos=eos,
                               max_new_tokens=max_new_tokens, do_sample=do_sample)
        try:
            with session, torch.no_grad():
                for start in range(0, len(token_lists), batch_size):
                    seqs = np.arange(start, min(start + batch_size, len(token_lists)))
                    session.run_batch(seqs, [token_lists[i] for i in seqs])
                    bar.set_postfix(prompts=f"{seqs[-1] + 1}/{len(token_lists)}", refresh=False)
                session.drain()
        except BaseException:
            # keep every step whose forward completed; the writer then marks the file partial
            with contextlib.suppress(Exception):
                session.drain()
            raise
    return out


# -- options, loading, prompts -------------------------------------------------------------

def check_options(*, mode: str = "generate", max_new_tokens: int = 1, batch_size: int = 1,
                  dtype: str = "auto", seed: int = 0) -> None:
    """One-line MoecacheError for an impossible capture setting."""
    check_seed(seed)
    if mode not in MODES:
        raise MoecacheError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MoecacheError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MoecacheError(f"--batch-size must be a positive integer, got {batch_size!r}")
    dtype_name(dtype)


def default_out(model_path: str | os.PathLike, mode: str = "generate") -> Path:
    """``traces/<model folder or GGUF file name>[-forward].parquet``."""
    path = Path(str(model_path).rstrip("/\\"))
    name = (path.stem if is_gguf(path) else path.name) or "model"
    if path.parent.name == "snapshots":  # HF cache: models--Org--Name/snapshots/<sha>
        name = path.parent.parent.name.split("--")[-1] or name
    return Path("traces") / f"{name}{'-forward' if mode == 'forward' else ''}.parquet"


def encode_prompts(tokenizer: Any, texts: Sequence[str], *, chat_template: bool = False
                   ) -> list[list[int]]:
    """Token ids of each prompt (special tokens added; the chat template supplies its own)."""
    token_lists = []
    for number, text in enumerate(texts):
        if chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise MoecacheError("--chat-template: the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise MoecacheError(f"prompt {number} is empty after tokenization")
        token_lists.append([int(i) for i in ids])
    return token_lists


# -- sessions: drive the model, turn router outputs into trace rows ----------------------------

class _Session:
    """Shared bookkeeping: step counter, pending device copies, writing rows.

    Steps stay pending (their routing on its way to or in host memory) until
    ``hold_steps`` of them are waiting or ``hold_seconds`` passed since the last
    write, then their rows are built and written together; an interrupt writes them
    too (see :func:`capture_model`), so only a killed process loses them.
    """

    hold_steps = 64
    hold_seconds = 1.0

    def __init__(self, model, tokenizer, recorder, writer, bar, *, eos: np.ndarray,
                 max_new_tokens: int, do_sample: bool):
        self.model, self.tokenizer = model, tokenizer
        self.recorder, self.writer, self.bar = recorder, writer, bar
        self.eos = eos
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.pad = pad_id(model, tokenizer)
        self.device = input_device(model)
        self.step = 0
        self.pending: deque = deque()
        self._drained_at = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def drain(self) -> None:
        """Write every pending step (waiting for its copy)."""
        if self.pending:
            self._process(len(self.pending))
        self._drained_at = time.monotonic()

    def _drain_ready(self) -> None:
        """Write pending steps whose copies are done, always keeping at most one in flight."""
        count = len(self.pending)
        if count and not self.pending[-1][-1].ready():
            count -= 1
        if count:
            self._process(count)
        self._drained_at = time.monotonic()

    def _hold(self, item) -> None:
        """Add a step to the pending ones; write those ready when enough are held."""
        self.pending.append(item)
        if (len(self.pending) > self.hold_steps
                or time.monotonic() - self._drained_at >= self.hold_seconds):
            self._drain_ready()

    def _write(self, arrays: dict[str, np.ndarray], keep: np.ndarray, *, step, seq, pos,
               token_id, phase) -> None:
        if not len(keep):
            return
        optional = {name: arrays[name][keep] if name in arrays else None
                    for name in ("logits", "lookahead", "lookahead_weights")}
        self.writer.write(
            arrays["experts"][keep], step=step, seq=seq, pos=pos, token_id=token_id,
            phase=phase, weights=arrays["weights"][keep], **optional)
        self.bar.update(len(keep))

    def _process(self, count: int) -> None:
        """Write the first ``count`` pending steps, removing them from ``pending``."""
        raise NotImplementedError


class _Batch:
    """Prompts of one batch laid out in a (B, P) grid, left- or right-padded."""

    def __init__(self, seqs: np.ndarray, token_lists: list[list[int]], *, left: bool, pad: int):
        self.seqs = np.asarray(seqs, np.int32)
        self.lens = np.array([len(t) for t in token_lists], np.int64)
        self.size, self.width = len(token_lists), int(self.lens.max())
        self.ids = np.full((self.size, self.width), pad, np.int64)
        self.mask = np.zeros((self.size, self.width), np.int64)
        for row, tokens in enumerate(token_lists):
            cols = slice(self.width - len(tokens), None) if left else slice(0, len(tokens))
            self.ids[row, cols] = tokens
            self.mask[row, cols] = 1
        self.offset = (self.width - self.lens) if left else np.zeros(self.size, np.int64)
        self.finished = np.zeros(self.size, bool)
        self.next_col = 0


class _GenerateSession(_Session):
    """``model.generate``; a hook pair on the model turns every forward into one step."""

    def __enter__(self):
        self._batch: _Batch | None = None
        self._current = None
        self.generation_config = generation_config(
            self.model, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
            eos=self.eos, pad=self.pad)
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def run_batch(self, seqs: np.ndarray, token_lists: list[list[int]]) -> None:
        torch = require_torch()
        batch = _Batch(seqs, token_lists, left=True, pad=self.pad)
        self._batch = batch
        self.model.generate(
            input_ids=torch.from_numpy(batch.ids).to(self.device),
            attention_mask=torch.from_numpy(batch.mask).to(self.device),
            generation_config=self.generation_config)
        self._drain_ready()

    def _before(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = self._batch
        if ids is None or batch is None or ids.dim() != 2 or ids.shape[0] != batch.size:
            raise MoecacheError("capture: generate called the model without a (batch, tokens) "
                                "input_ids tensor; this model's generate loop is not supported")
        width = int(ids.shape[1])
        start = batch.next_col
        if start >= batch.width and width != 1:
            raise MoecacheError(f"capture: a decode forward fed {width} tokens per sequence; "
                                "generation without a KV cache is not supported")
        batch.next_col += width
        self.recorder.reset()
        self._current = (start, width, ids if start + width > batch.width else None)

    def _after(self, _module, _args, _output):
        start, width, ids = self._current
        extras = {"fed": ids} if ids is not None else None
        self._hold((self._batch, start, width, self.recorder.take(extras)))

    def _process(self, count: int) -> None:
        pending = self.pending
        while count:
            batch, start, width, _ = pending[0]
            run = 1
            if width == 1 and start >= batch.width:  # decode: with the next decode steps of the batch
                while (run < count and pending[run][0] is batch
                       and pending[run][1] == start + run and pending[run][2] == 1):
                    run += 1
                self._decode_steps(batch, start, run)
            else:
                self._step(*pending.popleft())
            count -= run

    def _step(self, batch: _Batch, start: int, width: int, pending) -> None:
        """One forward's rows (prompt tokens, or the rare decode of several tokens)."""
        arrays = pending.wait()
        rows = batch.size * width
        if arrays["experts"].shape[0] != rows:
            raise MoecacheError(f"capture: routers saw {arrays['experts'].shape[0]} tokens in a "
                                f"forward of {batch.size} x {width}")
        cols = start + np.arange(width)[None, :]                      # (1, S)
        if start + width <= batch.width:                              # prompt tokens
            keep = batch.mask[:, start:start + width].astype(bool)
            pos = cols - batch.offset[:, None]
            token = batch.ids[:, start:start + width]
            phase = PREFILL
        else:                                                         # one generated token each
            fed = arrays["fed"].reshape(batch.size, width)
            new = start - batch.width + 1                             # 1-based generated index
            is_eos = (fed[:, :1] == self.eos[None, :]).any(axis=1)
            keep = (~batch.finished & ~is_eos & (new < self.max_new_tokens))[:, None]
            batch.finished |= is_eos
            pos = np.broadcast_to((batch.lens + new - 1)[:, None], keep.shape)
            token = fed
            phase = DECODE
        flat = np.flatnonzero(keep)                                   # batch-major order
        if not len(flat):
            return
        grid_rows = flat // width
        self._write(arrays, flat, step=np.full(len(flat), self.step, np.int64),
                    seq=batch.seqs[grid_rows],
                    pos=np.broadcast_to(pos, keep.shape).reshape(-1)[flat],
                    token_id=token.reshape(-1)[flat], phase=np.full(len(flat), phase, np.int8))
        self.step += 1

    def _decode_steps(self, batch: _Batch, start: int, count: int) -> None:
        """The rows of ``count`` consecutive one-token decode steps of ``batch`` (the first
        ``count`` pending steps, fed column ``start`` on), written as one block."""
        from .recorder import wait_steps

        steps = [self.pending[i][3] for i in range(count)]
        size = batch.size
        for pending in steps:
            if pending.rows != size:
                raise MoecacheError(f"capture: routers saw {pending.rows} tokens in a "
                                    f"forward of {size} x 1")
        arrays = wait_steps(steps)
        fed = arrays["fed"].reshape(count, size)                      # (T, B)
        new = start - batch.width + 1 + np.arange(count)              # 1-based generated index
        is_eos = (fed[:, :, None] == self.eos).any(axis=2)
        # finished after each step: EOS fed now or before; before each step: the row above
        ended = np.logical_or.accumulate(is_eos, axis=0) | batch.finished
        finished = np.concatenate([batch.finished[None], ended[:-1]])
        keep = ~finished & ~is_eos & (new < self.max_new_tokens)[:, None]
        flat = np.flatnonzero(keep)                                   # step-major, then batch rows
        written = keep.any(axis=1)                                    # a step without rows gets no number
        numbers = self.step - 1 + np.cumsum(written)
        step, row = np.divmod(flat, size)
        for _ in range(count):
            self.pending.popleft()
        batch.finished = ended[-1].copy()
        self.step += int(np.count_nonzero(written))
        self._write(arrays, flat, step=numbers[step], seq=batch.seqs[row],
                    pos=batch.lens[row] + new[step] - 1, token_id=fed.reshape(-1)[flat],
                    phase=np.full(len(flat), DECODE, np.int8))


class _ForwardSession(_Session):
    """Teacher forcing: one forward per batch, each real token its own step."""

    def run_batch(self, seqs: np.ndarray, token_lists: list[list[int]]) -> None:
        torch = require_torch()
        batch = _Batch(seqs, token_lists, left=False, pad=self.pad)
        kwargs: dict[str, Any] = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # the LM head's output is not needed
        self.recorder.reset()
        self.model(input_ids=torch.from_numpy(batch.ids).to(self.device),
                   attention_mask=torch.from_numpy(batch.mask).to(self.device), **kwargs)
        self.pending.append((batch, self.recorder.take()))
        self._drain_ready()

    def _process(self, count: int) -> None:
        for _ in range(count):
            self._forward(*self.pending.popleft())

    def _forward(self, batch: _Batch, pending) -> None:
        arrays = pending.wait()
        keep = batch.mask.astype(bool)
        flat = np.flatnonzero(keep)
        if arrays["experts"].shape[0] != keep.size:
            raise MoecacheError(f"capture: routers saw {arrays['experts'].shape[0]} tokens in a "
                                f"forward of {batch.size} x {batch.width}")
        steps = self.step + np.arange(len(flat), dtype=np.int64)
        self._write(arrays, flat, step=steps, seq=batch.seqs[flat // batch.width],
                    pos=(flat % batch.width).astype(np.int32),
                    token_id=batch.ids.reshape(-1)[flat],
                    phase=np.full(len(flat), PREFILL, np.int8))
        self.step += len(flat)


# -- helpers ----------------------------------------------------------------------------------

def generation_config(model: Any, *, max_new_tokens: int, do_sample: bool, eos: np.ndarray,
                      pad: int) -> Any:
    """The model's generation config as capture runs it: exactly ``max_new_tokens``, eager,
    stopping only at ``eos``."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.min_new_tokens = None
    config.min_length = 0
    config.do_sample = do_sample
    config.num_beams = 1
    config.use_cache = True
    config.disable_compile = True  # hooks record eagerly; compiled graphs would skip them
    config.prefill_chunk_size = None
    config.stop_strings = None  # rows stopped by other criteria would be fed padding
    config.max_time = None
    config.eos_token_id = [int(e) for e in eos] or None
    config.pad_token_id = pad
    config.return_dict_in_generate = False
    if not do_sample:  # silence "temperature is set but do_sample=False" warnings
        for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
            if hasattr(config, name):
                setattr(config, name, None)
    return config


def eos_ids(model: Any, tokenizer: Any) -> np.ndarray:
    """The end-of-sequence token ids (generation config first, then the tokenizer)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return np.zeros(0, np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))


def pad_id(model: Any, tokenizer: Any) -> int:
    """The padding token id (tokenizer, generation config, else an end token)."""
    for value in (getattr(tokenizer, "pad_token_id", None),
                  getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(value, int):
            return value
    eos = eos_ids(model, tokenizer)
    return int(eos[0]) if len(eos) else 0


def _meta(model, info, prompts: Prompts, *, mode, max_new_tokens, batch_size, do_sample, seed,
          chat_template, router_label, model_name, eos, lookahead) -> dict[str, Any]:
    import torch
    import transformers

    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    name = model_name or getattr(config, "_name_or_path", None) or type(model).__name__
    return build_meta(info.num_experts, info.top_k, info.moe_layers, info.expert_bytes, {
        "model": {
            "name": str(name),
            "revision": _revision(config, name),
            "architecture": architectures[0],
            "model_type": getattr(config, "model_type", None),
        },
        "num_layers": info.num_layers,
        "num_shared_experts": info.num_shared_experts,
        "dtype": str(model.dtype).removeprefix("torch."),
        "router": router_label,
        "capture": {
            "mode": mode,
            "prompts": prompts.source,
            "prompts_sha256": prompts.sha256,
            "num_prompts": len(prompts),
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens if mode == "generate" else None,
            "do_sample": bool(do_sample),
            "seed": seed,
            "chat_template": bool(chat_template),
            "lookahead": bool(lookahead),
            "eos_token_id": [int(e) for e in eos],
            "device": str(input_device(model)),
            "router_module": info.router_class,
            "router_path": info.router_path,
            "moecache_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "date": now_iso(),
            "notes": info.notes,
        },
    })


def _revision(config, name: str) -> str | None:
    revision = getattr(config, "_commit_hash", None)
    if revision:
        return str(revision)
    path = Path(name)
    if path.parent.name == "snapshots":  # a Hugging Face cache snapshot folder
        return path.name
    return None
