"""What a GGUF file says about its MoE layers: read with the ``gguf`` package (gguf-py).

Architecture, MoE layer indices (the blocks holding a router, ``blk.N.ffn_gate_inp``;
leading dense blocks have none), E, K, shared experts, and the bytes of one routed
expert per MoE layer exactly as stored: the routed expert tensors of a block
(``blk.N.ffn_*_exps.*``, stacked along the expert axis) hold E experts each, so one
expert is their stored bytes (for their quantization type) divided by E.
"""

from __future__ import annotations

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
        from gguf import GGUFReader
    except ImportError:
        raise MoecacheError("capturing a GGUF model needs the gguf extra: "
                            "pip install 'moecache[gguf]'") from None
    try:
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # gguf-py raises ValueError, struct/numpy errors, ... on bad bytes
        raise MoecacheError(f"{path}: not a readable GGUF file ({_reason(err)})") from None
    if data_end > path.stat().st_size:
        raise MoecacheError(f"{path}: truncated GGUF file (tensor data ends at byte {data_end}, "
                            f"the file has {path.stat().st_size})")
    fields = {name: _value(field) for name, field in reader.fields.items()}
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
        stored = int(tensor.n_bytes)
        if int(tensor.shape[-1]) != experts or stored % experts:
            raise MoecacheError(f"{path}: tensor {name} does not hold {experts} equal experts "
                                f"(shape {[int(x) for x in tensor.shape]}, {stored} bytes)")
        totals[int(match.group(1))] += stored // experts
        types.add(tensor.tensor_type.name)
    missing = [layer for layer, size in totals.items() if not size]
    if missing:
        raise MoecacheError(f"{path}: MoE block {missing[0]} has a router but no routed expert "
                            "tensors (blk.N.ffn_*_exps)")
    return [totals[layer] for layer in moe], sorted(types)


def _value(field):
    """A GGUF key's value as a Python scalar or string (arrays are not needed here)."""
    from gguf import GGUFValueType

    if not field.types or field.types[0] == GGUFValueType.ARRAY:
        return None
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    scalar = value[0].item()
    return int(scalar) if isinstance(scalar, (int, bool)) and not isinstance(scalar, bool) else scalar


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
