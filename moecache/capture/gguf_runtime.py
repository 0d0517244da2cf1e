"""A GGUF model in llama.cpp through llama-cpp-python's bindings: load, tokenize, decode,
sample. Shared by the capture (with its ``cb_eval`` tap) and the overhead benchmark
(without one), so that both run exactly the same llama.cpp calls."""

from __future__ import annotations

import signal
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoecacheError

_LOG: deque[str] = deque(maxlen=20)  # llama.cpp's recent log lines (shown when loading fails)
_STATE: dict[str, Any] = {}


def require_llama_cpp():
    """The ``llama_cpp`` module (one-line error without the gguf extra); its log is kept
    quiet (recent lines are kept for error messages)."""
    try:
        import llama_cpp
    except ImportError:
        raise MoecacheError("capturing a GGUF model needs llama-cpp-python (the gguf extra): "
                            "pip install 'moecache[gguf]'") from None
    if "log" not in _STATE:
        @llama_cpp.llama_log_callback
        def keep(_level, text, _user_data):
            if text:
                _LOG.append(text.decode("utf-8", errors="replace"))

        _STATE["log"] = keep  # the callback must outlive every call into llama.cpp
        llama_cpp.llama_log_set(keep, None)
        llama_cpp.llama_backend_init()
    return llama_cpp


def llama_cpp_version() -> str:
    return str(getattr(require_llama_cpp(), "__version__", "unknown"))


class LlamaRuntime:
    """One model and context (sequence 0 only). Use as a context manager (frees both).

    ``vocab_only`` loads the vocabulary alone (for :meth:`tokenize`). ``n_ctx`` is the
    longest sequence, ``n_batch`` the most tokens decoded at once;
    ``cb_eval`` (a ``ggml_backend_sched_eval_callback``, called with
    ``cb_eval_user_data``) sees the graph's tensors.
    ``device`` auto offloads every layer a GPU build can take, cpu none. Sampling draws
    from the full softmax (llama.cpp's dist sampler seeded by ``seed``) or takes the
    argmax (greedy). ``threads``: llama.cpp's CPU threads (default: its own default).
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 0, n_batch: int = 1, cb_eval=None,
                 cb_eval_user_data=None,
                 device: str = "auto", do_sample: bool = False, seed: int = 0,
                 threads: int | None = None, vocab_only: bool = False):
        lib = self.lib = require_llama_cpp()
        self.path = Path(path)
        self.model = self.ctx = self.sampler = self.batch = None
        model_params = lib.llama_model_default_params()
        if device == "cpu" or vocab_only:
            model_params.n_gpu_layers = 0
        model_params.vocab_only = vocab_only
        _LOG.clear()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise MoecacheError(f"{self.path}: llama.cpp cannot load this model ({_last_error()})")
        self.vocab = lib.llama_model_get_vocab(self.model)
        if vocab_only:  # tokenizing only
            return
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = min(n_batch, 512)
        ctx_params.no_perf = True
        if threads is not None:
            ctx_params.n_threads = ctx_params.n_threads_batch = threads
        if cb_eval is not None:
            ctx_params.cb_eval = cb_eval
            ctx_params.cb_eval_user_data = cb_eval_user_data
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            self.close()
            raise MoecacheError(f"{self.path}: llama.cpp cannot create a context "
                                f"({_last_error()})")
        self.memory = lib.llama_get_memory(self.ctx)
        self.sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self.sampler, lib.llama_sampler_init_dist(seed) if do_sample
                                    else lib.llama_sampler_init_greedy())
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch

    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
        if self.sampler:
            lib.llama_sampler_free(self.sampler)
        if self.ctx:
            lib.llama_free(self.ctx)
        if self.model:
            lib.llama_model_free(self.model)
        self.model = self.ctx = self.sampler = self.batch = None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens (BOS) added as the model's vocabulary says."""
        raw = text.encode("utf-8")
        room = len(raw) + 8
        ids = (self.lib.llama_token * room)()
        count = self.lib.llama_tokenize(self.vocab, raw, len(raw), ids, room, True, False)
        if count < 0:
            raise MoecacheError(f"{self.path}: llama.cpp could not tokenize a prompt")
        return list(ids[:count])

    def end_ids(self) -> list[int]:
        """End-of-sequence and end-of-turn ids (those the vocabulary has)."""
        ids = {self.lib.llama_vocab_eos(self.vocab), self.lib.llama_vocab_eot(self.vocab)}
        return sorted(int(i) for i in ids if i >= 0)

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def clear(self) -> None:
        """Forget the KV cache: the next decode starts a new sequence at position 0."""
        self.lib.llama_memory_clear(self.memory, True)

    def decode(self, tokens: list[int] | np.ndarray, start: int, *, every_output: bool) -> None:
        """Decode ``tokens`` at positions ``start``... of sequence 0.

        ``every_output`` asks for the logits of every token (llama.cpp then runs the last
        layer for all of them), else of the last token only.
        """
        count = len(tokens)
        if not 0 < count <= self.n_batch:
            raise MoecacheError(f"decode of {count} tokens (batch room {self.n_batch})")
        batch = self.batch
        batch.n_tokens = count
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = every_output or i == count - 1
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise MoecacheError(f"{self.path}: llama_decode failed with status {status} "
                                f"({_last_error()})")

    def sample(self) -> int:
        """The next token from the last decoded token's logits."""
        return int(self.lib.llama_sampler_sample(self.sampler, self.ctx, -1))


_HELD = (signal.SIGINT, signal.SIGTERM)


class HeldSignals:
    """While entered, SIGINT and SIGTERM are recorded instead of handled; :meth:`deliver`
    (call it between decodes) runs the handlers of those recorded, as does leaving.

    A Python signal handler runs in whatever Python code runs next: during a decode that
    is the ``cb_eval`` callback, where its KeyboardInterrupt would be printed and dropped
    by ctypes. Outside the main thread (no handlers run there) this does nothing.
    """

    def __enter__(self) -> HeldSignals:
        self.caught: list[int] = []
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._record) for sig in _HELD}
        return self

    def __exit__(self, *exc) -> None:
        self.deliver()
        self._restore()

    def _record(self, number: int, _frame) -> None:
        self.caught.append(number)

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def deliver(self) -> None:
        """Run the handlers of the signals recorded so far (they are handled normally
        from then on)."""
        if not self.caught:
            return
        previous, caught, self.caught = self.previous, self.caught, []
        self._restore()
        for number in caught:
            handler = previous.get(number)
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


def _last_error() -> str:
    lines = [line.strip() for line in _LOG if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0]

