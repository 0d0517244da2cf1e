"""Read the experts llama.cpp selected out of its compute graph, through ``cb_eval``.

llama.cpp's MoE FFN (``build_moe_ffn`` in ``llama-graph.cpp``) names, per layer ``il``,
``ffn_moe_topk-il``: the ids of the K selected experts of every token (int32; a strided
view of the arg-sorted scores, so each token's row is read with the tensor's own
stride), and ``ffn_moe_weights-il``, the gate weights, followed when the architecture
has them by ``ffn_moe_weights_softmax``, ``_norm`` and ``_scaled``: the last of these in
the graph is what multiplies the experts' outputs, and is what is recorded.

The graph scheduler calls the callback twice per graph node: ``ask=True`` (answer
whether this node is wanted) and, for wanted nodes, once more when it is computed; each
wanted node splits the graph's computation there. So one node per MoE layer is asked
for: the last weights variant (learned in the first decode, which asks for all of
them). The ids are read through its sources: ``ffn_moe_weights`` is
``get_rows(probs, ffn_moe_topk)``, and the ids' memory is still live then (the expert
matmuls that follow read it too). The ask path compares the name's first bytes, read
from the tensor struct; see :class:`_Tensor` for the layout, checked against
``ggml_get_name`` at first use.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..errors import MoecacheError
from .gguf_native import ERRORS, TapState, compiled_tap

_TOPK = b"ffn_moe_topk-"
_WEIGHTS = (b"ffn_moe_weights-", b"ffn_moe_weights_softmax-", b"ffn_moe_weights_norm-",
            b"ffn_moe_weights_scaled-")
_PREFIX = b"ffn_moe_"
_I32, _F32 = 26, 0  # ggml_type ids (GGML_TYPE_I32, GGML_TYPE_F32)


class _Tensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h): type, buffer, ne[4], nb[4], ..., name.

    GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64.
    """

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64)]


_NAME_OFFSET = _Tensor.name.offset


def _ggml_base():
    """``libggml-base`` as loaded by llama_cpp (ggml_get_name, ggml_nbytes, tensor reads)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not found:
        raise MoecacheError(f"{folder}: no libggml-base library beside llama_cpp")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    return lib


class MoeTap:
    """The ``cb_eval`` callback and what it collected since the last :meth:`take`.

    ``layers`` are the MoE block indices (ascending); :meth:`take` returns the routing of
    every token decoded since the previous call, in batch order.
    """

    def __init__(self, layers: list[int], top_k: int, capacity: int):
        import llama_cpp

        self.layers = list(layers)
        self.column = {layer: number for number, layer in enumerate(self.layers)}
        self.top_k = top_k
        self._lib = _ggml_base()
        self._experts: list[list[np.ndarray]] = [[] for _ in self.layers]
        self._weights: list[list[np.ndarray]] = [[] for _ in self.layers]
        self._last: dict[int, bytes] = {}  # layer column: name of its last weights variant
        self._final: set[bytes] | None = None  # those names, once learned
        self._checked = False
        self._scratch = np.empty(4096, np.uint8)  # tensor bytes land here, then are copied out
        self._scratch_at = self._scratch.ctypes.data
        self.error: BaseException | None = None
        # cb_eval and its user data: the compiled tap (see .gguf_native) where it builds,
        # writing into arrays of this object, else _eval
        callback_type = llama_cpp.ggml_backend_sched_eval_callback
        self._python = callback_type(self._eval)
        built = compiled_tap(_NAME_OFFSET, _Tensor.src.offset, callback_type)
        self.compiled = built is not None
        if built is None:
            self.callback, self.user_data = self._python, None
        else:
            self.callback, self._release = built
            self._state, self._arrays = self._compiled_state(capacity)
            self.user_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)

    def _compiled_state(self, capacity: int) -> tuple[TapState, dict[str, np.ndarray]]:
        layers, top_k = len(self.layers), self.top_k
        column = np.full(max(self.layers) + 1, -1, np.int32)
        column[self.layers] = np.arange(layers, dtype=np.int32)
        arrays = {"column": column,
                  "ids": np.zeros((layers, capacity, top_k), np.int32),
                  "weights": np.zeros((layers, capacity, top_k), np.float32),
                  "count": np.zeros(layers, np.int32), "start": np.zeros(layers, np.int32),
                  "last": np.full(layers, -1, np.int8), "final": np.full(layers, -1, np.int8)}
        state = TapState(
            get=ctypes.cast(self._lib.ggml_backend_tensor_get, ctypes.c_void_p).value,
            nbytes=ctypes.cast(self._lib.ggml_nbytes, ctypes.c_void_p).value,
            top_k=top_k, columns=layers, capacity=capacity, max_layer=len(column) - 1,
            **{name: array.ctypes.data for name, array in arrays.items()})
        return state, arrays

    def __del__(self) -> None:
        if getattr(self, "compiled", False):
            self._release(ctypes.byref(self._state))

    # -- the callback ------------------------------------------------------------------
    def _eval(self, tensor: int, ask: bool, _user_data) -> bool:
        # An exception cannot cross the C callback (ctypes would print and drop it, a
        # Ctrl-C included): it is kept for check(), and the graph told to stop.
        try:
            if ask:  # hot path: every graph node; one node per MoE layer is asked for
                if ctypes.string_at(tensor + _NAME_OFFSET, 8) != _PREFIX:
                    return False
                name = ctypes.string_at(tensor + _NAME_OFFSET)
                if self._final is not None:
                    return name in self._final
                head, _, layer = name.rpartition(b"-")  # learning: every weights variant
                return head + b"-" in _WEIGHTS and layer.isdigit()
            self._collect(tensor)
            return True
        except BaseException as err:
            if self.error is None:
                self.error = err
            return False

    def check(self) -> None:
        """Raise what the callback caught (KeyboardInterrupt included), if anything."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _collect(self, tensor: int) -> None:
        """Read a weights tensor and, through its sources, the expert ids it was gathered by."""
        if not self._checked:
            self._check_layout(tensor)
        name = ctypes.string_at(tensor + _NAME_OFFSET)
        head, _, layer = name.rpartition(b"-")
        number = self._layer(name, layer)
        weights = self._read(tensor, np.float32, _F32)
        ids = self._read(self._topk(tensor, b"%s%s" % (_WEIGHTS[0], layer)), np.int32, _I32)
        if self._final is None:  # learning the last variant: later ones replace earlier ones
            self._last[number] = name
            if head + b"-" != _WEIGHTS[0]:
                self._experts[number].pop()
                self._weights[number].pop()
        self._experts[number].append(ids)
        self._weights[number].append(weights)

    def _topk(self, tensor: int, gathered: bytes) -> int:
        """The ``ffn_moe_topk`` tensor of the layer: the ids ``ffn_moe_weights`` (a get_rows,
        reached from ``tensor`` through first sources) gathered by. Its memory is still
        live: the expert matmuls after the weights read it too."""
        node = tensor
        for _ in range(8):
            if ctypes.string_at(node + _NAME_OFFSET) == gathered:
                ids = _Tensor.from_address(node).src[1]
                if ids and ctypes.string_at(ids + _NAME_OFFSET).startswith(_TOPK):
                    return ids
                break
            node = _Tensor.from_address(node).src[0]
            if not node:
                break
        raise MoecacheError(f"llama.cpp graph: {ctypes.string_at(tensor + _NAME_OFFSET).decode()} "
                            f"does not lead to {gathered.decode()}(probs, ffn_moe_topk): capture "
                            "cannot read this architecture's routing")

    def _layer(self, name: bytes, text: bytes) -> int:
        try:
            return self.column[int(text)]
        except (KeyError, ValueError):
            raise MoecacheError(f"llama.cpp graph tensor {name.decode()} names no MoE layer "
                                f"of the file's routers (blocks {self.layers})") from None

    def _check_layout(self, tensor: int) -> None:
        """The struct head above must agree with the library's own accessor."""
        if ctypes.string_at(tensor + _NAME_OFFSET) != self._lib.ggml_get_name(tensor):
            raise MoecacheError("llama.cpp's ggml_tensor layout differs from the one moecache "
                                "reads (ggml.h changed): update moecache.capture.gguf_tap")
        self._checked = True

    def _read(self, tensor: int, dtype, ggml_type: int) -> np.ndarray:
        """A (tokens, K) array of the tensor's first K values per token, read by stride.

        Expert ids: ne = (K, tokens), row stride nb[1]. Weights: ne = (1, K, tokens) or
        (K, tokens), token stride the last used nb.
        """
        head = _Tensor.from_address(tensor)
        if head.type != ggml_type:
            raise MoecacheError(f"llama.cpp tensor {head.name.decode()} has ggml type "
                                f"{head.type}, expected {ggml_type}")
        ne, nb = list(head.ne), list(head.nb)
        if ne[0] == 1 and ne[1] == self.top_k:  # (1, K, tokens): weights from get_rows
            k_stride, tokens, t_stride = nb[1], ne[2], nb[2]
        elif ne[0] == self.top_k:
            k_stride, tokens, t_stride = nb[0], ne[1], nb[1]
        else:
            raise MoecacheError(f"llama.cpp tensor {head.name.decode()} has shape {ne[:3]}, "
                                f"expected K={self.top_k} values per token")
        size = self._lib.ggml_nbytes(tensor)  # spans exactly the strided view
        if size > len(self._scratch):
            self._scratch = np.empty(max(size, 2 * len(self._scratch)), np.uint8)
            self._scratch_at = self._scratch.ctypes.data
        self._lib.ggml_backend_tensor_get(tensor, self._scratch_at, 0, size)
        return np.ndarray((tokens, self.top_k), dtype, self._scratch, 0,
                          (t_stride, k_stride)).copy()

    # -- steps -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what was collected (before each decode)."""
        self.error = None
        if self.compiled:
            self._arrays["count"][:] = 0
            self._state.error = 0
        else:
            self._experts = [[] for _ in self.layers]
            self._weights = [[] for _ in self.layers]

    def take(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """``experts`` (tokens, L, K) int16 and ``weights`` (tokens, L, K) float32 of the
        ``tokens`` decoded since the last call, each token's K by descending weight."""
        self.check()
        if self.compiled:
            if self._state.error:
                raise MoecacheError(
                    f"llama.cpp's weights tensor of block {self._state.error_layer} "
                    f"{ERRORS.get(self._state.error, 'could not be read')}: capture cannot read "
                    "this architecture's routing")
            counts = self._arrays["count"]
        else:
            counts = np.array([sum(len(chunk) for chunk in chunks) for chunks in self._experts])
        if (counts != tokens).any():  # every layer gave every token
            column = int(np.flatnonzero(counts != tokens)[0])
            got = int(counts[column])
            what = f"{got} tokens" if got else "no ffn_moe_weights tensor"
            raise MoecacheError(f"llama.cpp's graph gave {what} for MoE layer {self.layers[column]} "
                                f"in a decode of {tokens} tokens: capture cannot read "
                                "this architecture's routing")
        if self.compiled:
            ids = self._arrays["ids"][:, :tokens].transpose(1, 0, 2)  # (tokens, L, K)
            weights = self._arrays["weights"][:, :tokens].transpose(1, 0, 2).copy()
            if self._arrays["final"][0] < 0:  # learned: from now on ask for these variants
                self._arrays["final"][:] = self._arrays["last"]
        else:
            ids = np.stack([_joined(chunks) for chunks in self._experts], axis=1)
            weights = np.stack([_joined(chunks) for chunks in self._weights], axis=1)
        if (weights[..., :-1] < weights[..., 1:]).any():  # not already by descending weight
            order = np.argsort(-weights, axis=2, kind="stable")  # ties in llama.cpp's order
            weights = np.take_along_axis(weights, order, axis=2)
            ids = np.take_along_axis(ids, order, axis=2)
        experts = ids.astype(np.int16)
        if self._final is None:
            self._final = set(self._last.values())
        self.reset()
        return experts, weights


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """The ubatches of one layer in order (one without a copy)."""
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
