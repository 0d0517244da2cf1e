"""What a GGUF file says about its MoE layers: read with the ``gguf`` package (gguf-py).

Architecture, MoE layer indices (the blocks holding a router, ``blk.N.ffn_gate_inp``;
leading dense blocks have none), E, K, shared experts, and the bytes of one routed
expert per MoE layer exactly as stored: the routed expert tensors of a block
(``blk.N.ffn_*_exps.*``, stacked along the expert axis) hold E experts each, so one
expert is their stored bytes (for their quantization type, sized by gguf-py's tables)
divided by E.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoecacheError

_ROUTER = re.compile(r"blk\.(\d+)\.ffn_gate_inp\.weight$")
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_[a-z_]*_exps\.[a-z_]+$")
_SHARED = re.compile(r"blk\.(\d+)\.ffn_[a-z_]*_shexp\.weight$")


@dataclass(frozen=True)
class GGUFInfo:
    """The MoE layout of one GGUF model file."""

    path: Path
    name: str | None             # general.name
    architecture: str            # general.architecture (llama.cpp's name, e.g. "qwen3moe")
    num_layers: int              # {arch}.block_count
    moe_layers: list[int]        # blocks with a router, ascending
    num_experts: int             # E, routed experts per MoE layer
    top_k: int                   # K, experts used per token
    num_shared_experts: int
    expert_bytes: list[int]      # bytes of one routed expert, per MoE layer
    expert_types: list[str]      # quantization types of the routed expert tensors (e.g. "Q8_0")


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """The MoE layout of the GGUF file ``path``; one-line MoecacheError for a file that is
    missing, not GGUF, truncated, or not an MoE model."""
    path = Path(path)
    if not path.is_file():
        raise MoecacheError(f"{path}: no such GGUF file")
    try:
        import gguf
    except ImportError:
        raise MoecacheError("capturing a GGUF model needs the gguf extra: "
                            "pip install 'moecache[gguf]'") from None
    fields, tensors, data_start = _read_header(path, gguf)
    data_end = data_start + max((t.offset + t.n_bytes for t in tensors.values()), default=0)
    if data_end > path.stat().st_size:
        raise MoecacheError(f"{path}: truncated GGUF file (tensor data ends at byte {data_end}, "
                            f"the file has {path.stat().st_size})")
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise MoecacheError(f"{path}: GGUF file without general.architecture")
    moe = sorted(int(m.group(1)) for name in tensors if (m := _ROUTER.match(name)))
    if not moe:
        raise MoecacheError(f"{path}: {arch} model without MoE layers (no blk.N.ffn_gate_inp "
                            "router tensors): a dense model has no routing to capture")
    experts = fields.get(f"{arch}.expert_count")
    if not isinstance(experts, int):
        experts = int(tensors[f"blk.{moe[0]}.ffn_gate_inp.weight"].shape[-1])
    top_k = fields.get(f"{arch}.expert_used_count")
    if not isinstance(top_k, int) or not 0 < top_k <= experts:
        raise MoecacheError(f"{path}: {arch}.expert_used_count is {top_k!r}, expected 1..{experts}")
    shared = fields.get(f"{arch}.expert_shared_count")
    if not isinstance(shared, int):
        shared = int(any(_SHARED.match(name) for name in tensors))
    sizes, types = _expert_sizes(path, tensors, moe, experts)
    block_count = fields.get(f"{arch}.block_count")
    name = fields.get("general.name")
    return GGUFInfo(
        path=path, name=name if isinstance(name, str) else None, architecture=arch,
        num_layers=int(block_count) if isinstance(block_count, int) else moe[-1] + 1,
        moe_layers=moe, num_experts=experts, top_k=top_k, num_shared_experts=shared,
        expert_bytes=sizes, expert_types=types)


def _expert_sizes(path: Path, tensors: dict, moe: list[int], experts: int
                  ) -> tuple[list[int], list[str]]:
    """Bytes of one routed expert per MoE layer, and the quantization types involved."""
    totals = dict.fromkeys(moe, 0)
    types: set[str] = set()
    for name, tensor in tensors.items():
        match = _EXPERTS.match(name)
        if not match or int(match.group(1)) not in totals:
            continue
        stored = tensor.n_bytes
        if int(tensor.shape[-1]) != experts or stored % experts:
            raise MoecacheError(f"{path}: tensor {name} does not hold {experts} equal experts "
                                f"(shape {[int(x) for x in tensor.shape]}, {stored} bytes)")
        totals[int(match.group(1))] += stored // experts
        types.add(tensor.type_name)
    missing = [layer for layer, size in totals.items() if not size]
    if missing:
        raise MoecacheError(f"{path}: MoE block {missing[0]} has a router but no routed expert "
                            "tensors (blk.N.ffn_*_exps)")
    return [totals[layer] for layer in moe], sorted(types)


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]   # ggml order (ne0 first): stacked experts are the last axis
    type_name: str           # e.g. "F32", "Q8_0"
    n_bytes: int
    offset: int              # from the start of the tensor data


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9


def _read_header(path: Path, gguf) -> tuple[dict, dict[str, _TensorInfo], int]:
    """(scalar and string keys, tensor infos, byte where tensor data starts) of a GGUF file.

    Reads the header alone (arrays such as the vocabulary are skipped, not decoded):
    gguf-py's GGUFReader decodes every array element and takes seconds on a 100k-token
    vocabulary. Types and sizes of tensors come from gguf-py's tables.
    """
    import mmap
    import struct

    with open(path, "rb") as file:
        if path.stat().st_size < 24 or file.read(4) != b"GGUF":
            raise MoecacheError(f"{path}: not a readable GGUF file (no GGUF magic)")
        view = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    at = 4

    def take(fmt: str):
        nonlocal at
        value = struct.unpack_from(fmt, view, at)[0]
        at += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal at
        size = take("<Q")
        if at + size > len(view):
            raise struct.error("string past the end of the file")
        at += size
        return bytes(view[at - size:at]).decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal at
        if kind == _STRING:
            return text()
        if kind == _ARRAY:
            item, count = take("<I"), take("<Q")
            if item == _STRING:
                for _ in range(count):
                    size = take("<Q")  # (not `at += take(...)`: that reads `at` first)
                    at += size
            elif item in _SCALARS:
                at += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    value(item)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return take(_SCALARS[kind])

    try:
        version, n_tensors, n_keys = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reads versions 2 and 3)")
        fields = {}
        for _ in range(n_keys):
            key = text()
            fields[key] = value(take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = text()
            shape = tuple(take("<Q") for _ in range(take("<I")))
            kind = gguf.GGMLQuantizationType(take("<I"))
            block, size = gguf.GGML_QUANT_SIZES[kind]
            count = math.prod(shape)  # exact: a hostile shape must not wrap around
            offset = take("<Q")
            tensors[name] = _TensorInfo(shape, kind.name, count // block * size, offset)
        if at > len(view):
            raise struct.error("header past the end of the file")
    except struct.error:
        raise MoecacheError(f"{path}: truncated GGUF file (its header runs past the end)") from None
    except RecursionError:  # arrays of arrays nested past Python's stack
        raise MoecacheError(f"{path}: not a readable GGUF file (arrays nested too deep)") from None
    except (ValueError, KeyError) as err:
        raise MoecacheError(f"{path}: not a readable GGUF file ({_reason(err)})") from None
    finally:
        view.close()
    align = fields.get("general.alignment")
    align = align if isinstance(align, int) and align > 0 else 32
    return fields, tensors, -(-at // align) * align


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
