"""``capture_gguf()``: run a GGUF MoE model in llama.cpp over prompts and record the
experts llama.cpp itself selected (see :mod:`.gguf_tap`), in the trace format of the
Hugging Face capture.

Prompts run one at a time (sequence ``seq``, batch size 1), each from an empty KV cache.

``generate``
    The prompt is decoded as one batch: one step (phase ``prefill``) holding every prompt
    token. Each generated token is then fed back as one step (phase ``decode``). As on
    the Hugging Face side, the last generated token (the ``max_new_tokens``-th) and an
    end-of-generation token are not fed back, so N new tokens give N - 1 decode steps.

``forward``
    The prompt text is decoded as one batch and each token becomes its own step (phase
    ``prefill``), as a batch-1 decode of the text would see them.

Logits are requested for every prompt token: llama.cpp otherwise skips the last layer
for the tokens whose logits nobody asked for, and that layer's routing would be missing.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import MoecacheError
from ..trace_format import DECODE, PREFILL, build_meta, now_iso
from ..trace_io import TraceWriter, check_output
from .gguf_file import GGUFInfo, read_gguf
from .prompts import Prompts, load_prompts

_NOT_FOR_GGUF = {  # option: (its value, the value GGUF capture takes)
    "--batch-size": ("batch_size", 1),
    "--dtype": ("dtype", "auto"),
    "--save-logits": ("save_logits", False),
    "--lookahead": ("lookahead", False),
    "--chat-template": ("chat_template", False),
}
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def is_gguf(model_path: str | os.PathLike) -> bool:
    """Whether ``model_path`` names a GGUF file (by its suffix)."""
    return str(model_path).lower().endswith(".gguf")


def capture_gguf(
    model_path: str | os.PathLike,
    prompts: str | os.PathLike | Sequence[str] | Prompts,
    out: str | os.PathLike,
    *,
    mode: str = "generate",
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    router_label: str = "baseline",
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **unsupported: Any,
) -> Path:
    """Capture the routing of the GGUF model ``model_path`` over ``prompts`` into ``out``.

    The options mean what they mean for :func:`moecache.capture.capture`; those that do
    not apply to llama.cpp (``unsupported``: batch_size, dtype, save_logits, lookahead,
    chat_template) must keep their defaults. ``threads`` sets llama.cpp's CPU threads
    (default: llama.cpp's own). Interrupted runs keep every completed step
    (metadata ``partial: true``). Returns the path written.
    """
    from tqdm.auto import tqdm

    from .driver import check_options
    from .gguf_runtime import HeldSignals, LlamaRuntime, require_llama_cpp
    from .gguf_tap import MoeTap

    for flag, (name, default) in _NOT_FOR_GGUF.items():
        if unsupported.pop(name, default) != default:
            raise MoecacheError(f"{flag} is not available when capturing a GGUF model")
    if unsupported:
        raise TypeError(f"capture_gguf: unexpected options {sorted(unsupported)}")
    check_options(mode=mode, max_new_tokens=max_new_tokens, seed=seed)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise MoecacheError(f"threads must be a positive integer, got {threads!r}")
    prompt_set = load_prompts(prompts, limit=limit)
    out = Path(out)
    check_output(out, overwrite=overwrite, streaming=True)
    info = read_gguf(model_path)
    require_llama_cpp()
    # tokenize first (the vocabulary alone) to size the context
    with LlamaRuntime(model_path, vocab_only=True) as probe:
        token_lists = [probe.tokenize(text) for text in prompt_set.texts]
    for number, tokens in enumerate(token_lists):
        if not tokens:
            raise MoecacheError(f"prompt {number} is empty after tokenization")
    longest = max(len(t) for t in token_lists)
    tap = MoeTap(info.moe_layers, info.top_k, capacity=longest)
    n_ctx = longest + (max_new_tokens if mode == "generate" else 0)
    if n_ctx >= 2**31:  # llama.cpp's context size is 32-bit: a larger one would wrap or abort
        raise MoecacheError(f"--max-new-tokens {max_new_tokens} with a prompt of {longest} tokens "
                            f"needs a context of {n_ctx} tokens, more than llama.cpp takes (2**31 - 1)")
    with LlamaRuntime(model_path, n_ctx=n_ctx, n_batch=longest, cb_eval=tap.callback,
                      cb_eval_user_data=tap.user_data, device=device, do_sample=do_sample,
                      seed=seed, threads=threads) as runtime:
        meta = _meta(info, prompt_set, runtime.end_ids(), compiled=tap.compiled, mode=mode,
                     max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
                     device=device, router_label=router_label, model_name=str(model_path))
        total = sum(len(t) for t in token_lists) if mode == "forward" else None
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"capture {mode}",
                   disable=not progress, dynamic_ncols=True)
        with (bar, TraceWriter(out, meta, with_weights=True, overwrite=overwrite) as writer,
              HeldSignals() as held):
            steps = _Steps(runtime, tap, writer, bar, held)
            for seq, tokens in enumerate(token_lists):
                if mode == "generate":
                    steps.generate(seq, tokens, max_new_tokens)
                else:
                    steps.forward(seq, tokens)
                bar.set_postfix(prompts=f"{seq + 1}/{len(token_lists)}", refresh=False)
    return out


class _Steps:
    """Decodes through ``runtime`` and writes each decode's routing as trace steps.

    Decodes are handed to the writer in batches (one call per sequence, or sooner: every
    ``BATCH_DECODES`` decodes or ``BATCH_SECONDS``): one writer call per decode cost as
    much as the rest of the capture's Python. A sequence that ends in an error or a
    signal hands over the decodes completed before it."""

    BATCH_DECODES = 256
    BATCH_SECONDS = 0.5

    def __init__(self, runtime, tap, writer: TraceWriter, bar, held):
        self.runtime, self.tap, self.writer, self.bar = runtime, tap, writer, bar
        self.held = held  # signals that arrive during a decode act once it returns
        self.step = 0
        self.pending: list[dict[str, np.ndarray]] = []  # decodes not handed to the writer yet
        self.handed_at = time.monotonic()

    def generate(self, seq: int, tokens: list[int], max_new_tokens: int) -> None:
        runtime = self.runtime
        runtime.clear()
        try:
            self._decode(tokens, 0, seq, PREFILL, one_step=True)
            position = len(tokens)
            for _ in range(max_new_tokens - 1):  # the max_new_tokens-th token is not fed back
                token = runtime.sample()
                if runtime.is_end(token):
                    return
                self._decode([token], position, seq, DECODE, one_step=True)
                position += 1
        finally:
            self._hand_over()

    def forward(self, seq: int, tokens: list[int]) -> None:
        self.runtime.clear()
        try:
            self._decode(tokens, 0, seq, PREFILL, one_step=False)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        """Write the pending decodes, in order, in one writer call."""
        if self.pending:
            blocks, self.pending = self.pending, []
            self.writer.write(**{name: np.concatenate([block[name] for block in blocks])
                                 for name in blocks[0]})
        self.handed_at = time.monotonic()

    def _decode(self, tokens: list[int], start: int, seq: int, phase: int, *, one_step: bool
                ) -> None:
        count = len(tokens)
        self.tap.reset()
        try:
            self.runtime.decode(tokens, start, every_output=True)
        finally:  # a signal, then what stopped the graph inside the Python callback
            self.held.deliver()
            self.tap.check()
        experts, weights = self.tap.take(count)
        if one_step:
            step = np.full(count, self.step, np.int64)
            self.step += 1
        else:
            step = self.step + np.arange(count, dtype=np.int64)
            self.step += count
        self.pending.append({"experts": experts, "step": step, "seq": np.full(count, seq, np.int32),
                             "pos": start + np.arange(count, dtype=np.int32),
                             "token_id": np.asarray(tokens, np.int32),
                             "phase": np.full(count, phase, np.int8), "weights": weights})
        if (len(self.pending) >= self.BATCH_DECODES
                or time.monotonic() - self.handed_at >= self.BATCH_SECONDS):
            self._hand_over()
        self.bar.update(count)


def _meta(info: GGUFInfo, prompts: Prompts, end_ids: list[int], *, compiled: bool, mode: str,
          max_new_tokens: int, do_sample: bool, seed: int, device: str, router_label: str,
          model_name: str) -> dict[str, Any]:
    from .gguf_runtime import llama_cpp_version

    types = info.expert_types
    dtype = _FLOAT_TYPES.get(types[0], types[0].lower()) if len(types) == 1 else "+".join(
        t.lower() for t in types)
    return build_meta(info.num_experts, info.top_k, info.moe_layers, info.expert_bytes, {
        "model": {
            "name": model_name,
            "revision": None,
            "architecture": info.architecture,
            "model_type": info.architecture,
            "format": "gguf",
            "gguf_name": info.name,
        },
        "num_layers": info.num_layers,
        "num_shared_experts": info.num_shared_experts,
        "dtype": dtype,
        "router": router_label,
        "capture": {
            "runtime": "llama.cpp",
            "mode": mode,
            "prompts": prompts.source,
            "prompts_sha256": prompts.sha256,
            "num_prompts": len(prompts),
            "batch_size": 1,
            "max_new_tokens": max_new_tokens if mode == "generate" else None,
            "do_sample": bool(do_sample),
            "seed": seed,
            "chat_template": False,
            "lookahead": False,
            "eos_token_id": end_ids,
            "device": device,
            "router_module": "llama.cpp build_moe_ffn",
            "router_path": "ffn_moe_topk / ffn_moe_weights graph tensors (cb_eval)",
            "moecache_version": __version__,
            "llama_cpp_python_version": llama_cpp_version(),
            "python": platform.python_version(),
            "date": now_iso(),
            "notes": [] if compiled else [
                "no C compiler: the graph was read by the Python callback (slower)"],
        },
    })

