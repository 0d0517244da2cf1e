"""Readers for routing logs that third-party tools write as arrays, not rows.

Each reader turns one file into the same dictionary of NumPy arrays an ``.npz`` log
holds (see :mod:`moecache.importer`): ``experts`` (tokens, layers, K) integer ids,
and optionally ``weights`` (same shape), ``logits`` (tokens, layers, E) router scores,
``seq``/``step``/``token_id`` (one per token), ``layers`` (the model layer id of each
axis-1 entry) and ``num_experts`` (a 0-d integer array, when the format records E).
The importer validates and writes what a reader returns; readers only check what
their own format promises and raise :class:`MoecacheError` naming the file.

:data:`READERS` maps a format name to its reader; :func:`sniff` names the format of a
file from its suffix or leading bytes, or returns None for the importer's own formats.

``vllm``: vLLM's routed experts
-------------------------------
Read from vLLM's source (github.com/vllm-project/vllm: ``vllm/outputs.py`` at commit
003d3ee2, ``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py`` at
00bd1493, ``vllm/v1/core/sched/scheduler.py`` at 00024d31). With the engine argument
``enable_return_routed_experts=True`` (``--enable-return-routed-experts``) every
finished ``CompletionOutput`` carries ``routed_experts``: an int32 array shaped
(tokens, num_hidden_layers, num_experts_per_tok) holding each token's top-k expert ids
in the router's order. Its tokens are the prompt and the generated tokens except the
last generated one (that one never went through the model): ``len(prompt_token_ids) +
len(token_ids) - 1`` rows. Axis 1 spans *all* hidden layers, indexed by model layer id;
vLLM never writes the rows of dense (non-MoE) layers, so they stay 0.

Files users save from it, one request (completion) per sequence, tokens contiguous,
requests in file order (vLLM does not record how requests were interleaved, so the
importer makes one step per token):

- ``.jsonl`` (one object per line) or ``.json`` (a list of objects, or one object):
  an object holds ``routed_experts`` as nested lists (``.tolist()``), optionally
  ``request_id``, ``prompt_token_ids`` and the generated ``token_ids`` (or
  ``output_token_ids``); or it mirrors ``RequestOutput`` with ``prompt_token_ids`` and
  ``outputs``: a list of completions, each with ``routed_experts`` (and ``token_ids``),
  each its own sequence. With prompt and generated ids for every completion, the row
  count is checked against them and ``token_id`` is filled.
- ``.npz`` of per-request arrays (``np.savez(f, **{request_id: routed_experts})``; an
  archive with an ``experts`` array is the importer's own layout instead).

Layers whose ids are 0 for every token are the dense layers vLLM leaves empty; with
K > 1 they are recognised (a routed row never repeats an id) and left out, ``layers``
naming the rest. With K = 1 an all-zero layer is ambiguous and an error. Prefix-cached
prompt tokens were not computed for their request, but vLLM returns the routing stored
with their cached KV blocks: run with prefix caching off to replay what was computed.

``rtrace``: fitz-tec RTRACE01
-----------------------------
Read from the published ``fitz-tec`` 0.1.1 package (PyPI; ``fitz_tec/tools/
_trace_format.py`` and ``runner.py``): ``llama-router-trace`` of its patched llama.cpp
writes, little-endian, the 8-byte magic ``RTRACE01``, int32 ``n_experts``, int32 header
version (0), then one record per (token, layer): int32 token index, int32 layer index
and ``n_experts`` float32 softmax probabilities. One file is one run (one prompt and
its generation): one sequence, tokens ordered by token index. K is not recorded:
:func:`read_rtrace` needs ``top_k`` (the model's ``n_expert_used``; CLI ``--top-k``).
``experts`` are the top-K probabilities, highest first (ties: smaller id), as
llama.cpp selects for plain softmax top-k routers; models whose selection adds a bias
or limits expert groups (DeepSeek-V3 style) are not reproduced. ``weights`` are the
selected probabilities as stored (not renormalised); ``logits`` are their natural log
(probabilities of 0 become log of the smallest normal float32, about -87.3): the
router's logits up to a per-row constant, which softmax-based rerouting ignores.
Layers without any record (dense layers of hybrid models) are not MoE layers; a token
missing a MoE layer (llama.cpp runs the last layer only for tokens whose logits are
requested) or a (token, layer) recorded twice is an error.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MoecacheError
from .files import first_line
from .trace_format import MAX_EXPERTS

Reader = Callable[[Path, str], dict[str, np.ndarray]]

RTRACE_MAGIC = b"RTRACE01"
RTRACE_VERSION = 0
_RTRACE_HEADER = np.dtype([("magic", "S8"), ("num_experts", "<i4"), ("version", "<i4")])
_TOP_K_CHUNK = 1 << 14                  # (token, layer) rows ranked at a time
_SNIFF_BYTES = 4 << 20                  # enough for a long prompt_token_ids before routed_experts
_VLLM_JSON = re.compile(rb'"routed_experts"\s*:\s*\[\s*\[\s*\[')
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


def sniff(path: Path) -> str | None:
    """The name of the array format of ``path`` in :data:`READERS`, or None.

    RTRACE01 is told by its magic whatever the suffix; vLLM routed experts by a
    ``routed_experts`` key holding a 3-deep list near the start of a JSON/JSONL file,
    or by an ``.npz`` without an ``experts`` array. Only regular files are opened.
    """
    try:
        if not path.is_file():
            return None
        suffix = path.suffix.lower()
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES if suffix in _JSON_SUFFIXES else len(RTRACE_MAGIC))
    except OSError:
        return None
    if head.startswith(RTRACE_MAGIC):
        return "rtrace"
    if suffix in _JSON_SUFFIXES and _VLLM_JSON.search(head):
        return "vllm"
    if suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        return "vllm" if names and "experts.npy" not in names else None
    return None


# -- fitz-tec RTRACE01 --------------------------------------------------------------------

def read_rtrace(path: Path, src: str, *, top_k: int | None = None) -> dict[str, np.ndarray]:
    """Read a fitz-tec RTRACE01 trace; ``top_k`` (the model's K) is required."""
    if top_k is None:
        raise MoecacheError(f"{src}: RTRACE01 traces do not record K (experts per token): "
                            "pass --top-k with the model's n_expert_used")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise MoecacheError(f"{src}: --top-k must be a positive integer, got {top_k!r}")
    _regular_file(path, src)
    size = path.stat().st_size
    if size < _RTRACE_HEADER.itemsize:
        raise MoecacheError(f"{src}: truncated RTRACE01 header ({size} of {_RTRACE_HEADER.itemsize} bytes)")
    header = np.fromfile(path, dtype=_RTRACE_HEADER, count=1)[0]
    if header["magic"] != RTRACE_MAGIC:
        raise MoecacheError(f"{src}: not an RTRACE01 trace (starts with {bytes(header['magic'])!r})")
    if int(header["version"]) != RTRACE_VERSION:
        raise MoecacheError(f"{src}: RTRACE01 header version {int(header['version'])} is not supported "
                            f"(known: {RTRACE_VERSION})")
    num_experts = int(header["num_experts"])
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise MoecacheError(f"{src}: RTRACE01 header gives n_experts = {num_experts} "
                            f"(expected 1 to {MAX_EXPERTS})")
    if top_k > num_experts:
        raise MoecacheError(f"{src}: --top-k {top_k} exceeds the trace's n_experts = {num_experts}")
    record = np.dtype([("token", "<i4"), ("layer", "<i4"), ("probs", "<f4", (num_experts,))])
    count, rest = divmod(size - _RTRACE_HEADER.itemsize, record.itemsize)
    if rest:
        raise MoecacheError(f"{src}: truncated RTRACE01 trace: the last record has {rest} of "
                            f"{record.itemsize} bytes (after {count} complete records)")
    if count == 0:
        raise MoecacheError(f"{src}: RTRACE01 trace holds no records")
    records = np.memmap(path, dtype=record, mode="r", offset=_RTRACE_HEADER.itemsize, shape=(count,))
    token = np.array(records["token"], np.int64)
    layer = np.array(records["layer"], np.int64)
    for name, values in (("token", token), ("layer", layer)):
        if values.min() < 0:
            at = int(np.argmax(values < 0))
            raise MoecacheError(f"{src}: record {at} has a negative {name} index ({values[at]})")
    order, tokens, layers = _rtrace_grid(token, layer, src)
    probs = records["probs"][order].reshape(len(tokens), len(layers), num_experts)
    del records
    bad = ~np.isfinite(probs) | (probs < 0)
    if bad.any():
        t, li, e = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise MoecacheError(f"{src}: token {tokens[t]}, layer {layers[li]}: expert {e} has probability "
                            f"{probs[t, li, e]} (expected a finite value >= 0)")
    flat = probs.reshape(-1, num_experts)
    experts = np.empty((len(flat), top_k), np.int32)
    for start in range(0, len(flat), _TOP_K_CHUNK):
        chunk = flat[start:start + _TOP_K_CHUNK]
        experts[start:start + len(chunk)] = np.argsort(-chunk, axis=1, kind="stable")[:, :top_k]
    experts = experts.reshape(len(tokens), len(layers), top_k)
    weights = np.take_along_axis(probs, experts, axis=2)
    np.maximum(probs, np.finfo(np.float32).tiny, out=probs)
    logits = np.log(probs, out=probs)
    return {"experts": experts, "weights": weights, "logits": logits, "layers": layers,
            "num_experts": np.array(num_experts)}


def _rtrace_grid(token: np.ndarray, layer: np.ndarray, src: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The record order that lays records out as (token, layer), with the token and layer ids."""
    tokens, token_rank = np.unique(token, return_inverse=True)
    layers, layer_rank = np.unique(layer, return_inverse=True)
    key = token_rank * len(layers) + layer_rank
    order = np.argsort(key, kind="stable")
    repeated = key[order][1:] == key[order][:-1]
    if repeated.any():
        first, second = order[int(np.argmax(repeated))], order[int(np.argmax(repeated)) + 1]
        raise MoecacheError(f"{src}: token {token[second]}, layer {layer[second]} is recorded twice "
                            f"(records {first} and {second}; several runs in one file?)")
    if len(order) != len(tokens) * len(layers):
        per_token = np.bincount(token_rank, minlength=len(tokens))
        short = per_token < len(layers)
        t = int(np.argmax(short))
        missing = np.setdiff1d(layers, layer[token_rank == t])
        raise MoecacheError(
            f"{src}: {int(short.sum())} of {len(tokens)} tokens lack records for some of the "
            f"{len(layers)} MoE layers (first: token {tokens[t]} has no layer {missing[0]}); llama.cpp "
            "runs the last layer only for tokens whose logits are requested")
    return order, tokens, layers


# -- vLLM routed experts ------------------------------------------------------------------

@dataclass
class _Routed:
    """One completion's routed experts (tokens, layers, K) and, when known, its token ids."""

    where: str
    experts: np.ndarray
    token_ids: np.ndarray | None


def read_vllm(path: Path, src: str) -> dict[str, np.ndarray]:
    """Read vLLM ``routed_experts`` saved as JSON/JSONL request outputs or an ``.npz``."""
    _regular_file(path, src)
    routed = list(_vllm_npz(path, src) if path.suffix.lower() == ".npz" else _vllm_json(path, src))
    if not routed:
        raise MoecacheError(f"{src}: no request with routed_experts")
    shape = routed[0].experts.shape[1:]
    for item in routed:
        if item.experts.shape[1:] != shape:
            raise MoecacheError(f"{src}: {item.where}: routed_experts has {item.experts.shape[1]} layers x "
                                f"top_k {item.experts.shape[2]}, the first request {shape[0]} x {shape[1]}")
    experts = np.concatenate([item.experts for item in routed])
    lengths = [len(item.experts) for item in routed]
    arrays = {"seq": np.repeat(np.arange(len(routed), dtype=np.int64), lengths)}
    if all(item.token_ids is not None for item in routed):
        arrays["token_id"] = np.concatenate([item.token_ids for item in routed])
    dense = (experts == 0).all(axis=(0, 2))
    if dense.all():
        raise MoecacheError(f"{src}: every expert id is 0 in every layer: no routing was recorded")
    top_k = shape[1]
    if dense.any() and top_k == 1:
        raise MoecacheError(f"{src}: layer {int(np.argmax(dense))} routes every token to expert 0 with "
                            "top_k 1: a dense layer (vLLM leaves it 0) cannot be told from a MoE layer; "
                            "save the MoE layers as an .npz with 'experts' and 'layers' arrays")
    moe = np.flatnonzero(~dense)
    experts = experts[:, moe]
    if top_k > 1:
        empty = (experts == 0).all(axis=2)
        if empty.any():
            n, li = np.unravel_index(int(np.argmax(empty)), empty.shape)
            starts = np.cumsum([0, *lengths])
            item = int(np.searchsorted(starts, n, side="right")) - 1
            row = n - starts[item]
            raise MoecacheError(f"{src}: {routed[item].where}: token {row}, layer {moe[li]} has no routing "
                                f"(all {top_k} ids are 0) in a MoE layer")
    return {"experts": experts, "layers": moe.astype(np.int64), **arrays}


def _vllm_npz(path: Path, src: str) -> Iterator[_Routed]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise MoecacheError(f"{src}: not a readable .npz archive: {first_line(err)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise MoecacheError(f"{src}: not an .npz archive")
    with archive:
        for name in archive.files:
            try:
                values = archive[name]
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
                raise MoecacheError(f"{src}: array {name!r} is damaged or holds Python objects: "
                                    f"{first_line(err)}") from None
            yield _Routed(f"array {name!r}", _routed_array(values, f"array {name!r}", src), None)


def _vllm_json(path: Path, src: str) -> Iterator[_Routed]:
    try:
        with open(path, encoding="utf-8") as handle:
            if path.suffix.lower() == ".json":
                document = json.load(handle)
                objects = document if isinstance(document, list) else [document]
                for index, obj in enumerate(objects):
                    yield from _vllm_request(obj, f"request {index + 1}", src)
                return
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise MoecacheError(f"{src}: line {number} is not valid JSON: {err}") from None
                    yield from _vllm_request(obj, f"line {number}", src)
    except json.JSONDecodeError as err:
        raise MoecacheError(f"{src}: not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MoecacheError(f"{src}: cannot read: {first_line(err)}") from None


def _vllm_request(obj: Any, where: str, src: str) -> Iterator[_Routed]:
    """The completions of one request object (``routed_experts`` at top level or in ``outputs``)."""
    if not isinstance(obj, dict):
        raise MoecacheError(f"{src}: {where} is not a JSON object with routed_experts")
    if "request_id" in obj:
        where = f"{where} (request_id {obj['request_id']!r})"
    if "routed_experts" in obj:
        completions = [(where, obj)]
    elif isinstance(obj.get("outputs"), list) and obj["outputs"]:
        completions = [(f"{where} output {i}", out) for i, out in enumerate(obj["outputs"])]
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise MoecacheError(f"{src}: {where} has no 'routed_experts' and no 'outputs' list (keys: {keys})")
    prompt = _ids(obj.get("prompt_token_ids"), where, "prompt_token_ids", src)
    for at, out in completions:
        if not isinstance(out, dict) or out.get("routed_experts") is None:
            raise MoecacheError(f"{src}: {at}: routed_experts is missing or null (was the engine started "
                                "with enable_return_routed_experts=True?)")
        experts = _routed_array(out["routed_experts"], at, src)
        generated = out.get("token_ids", out.get("output_token_ids"))
        yield _Routed(at, experts, _token_ids(prompt, _ids(generated, at, "token_ids", src), len(experts),
                                              at, src))


def _routed_array(value: Any, where: str, src: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise MoecacheError(f"{src}: {where}: routed_experts is not a rectangular "
                            "(tokens, layers, top_k) array") from None
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise MoecacheError(f"{src}: {where}: routed_experts must be integer ids shaped "
                            f"(tokens, layers, top_k), got shape {array.shape} dtype {array.dtype}")
    if 0 in array.shape:
        raise MoecacheError(f"{src}: {where}: routed_experts is empty (shape {array.shape})")
    return array


def _ids(value: Any, where: str, name: str, src: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = np.asarray(None)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise MoecacheError(f"{src}: {where}: {name} must be a list of integer token ids")
    return array.astype(np.int64)


def _token_ids(prompt: np.ndarray | None, generated: np.ndarray | None, rows: int, where: str,
               src: str) -> np.ndarray | None:
    """Each routed token's id, checking the row count; None unless both id lists are known."""
    if prompt is None:
        return None
    if generated is None:
        if rows < len(prompt):
            raise MoecacheError(f"{src}: {where}: routed_experts has {rows} tokens, fewer than the "
                                f"{len(prompt)} prompt tokens")
        return None
    expected = len(prompt) + len(generated) - 1
    if rows != expected:
        raise MoecacheError(f"{src}: {where}: routed_experts has {rows} tokens, expected {expected} "
                            f"({len(prompt)} prompt + {len(generated)} generated - 1: vLLM routes every "
                            "token but the last generated one)")
    return np.concatenate([prompt, generated])[:rows]


def _regular_file(path: Path, src: str) -> None:
    if not path.is_file():
        raise MoecacheError(f"{src}: not a regular file" if path.exists() else f"{src}: no such file")



READERS: dict[str, Reader] = {"vllm": read_vllm, "rtrace": read_rtrace}
