"""Where the routers of a Hugging Face MoE model are, and what they return.

Every MoE family of transformers 5.x that moecache captures has, in each MoE decoder
layer, a router module (``mlp.gate``; ``mlp.router`` for GPT-OSS; ``feed_forward.router``
for Jamba, ...) whose forward returns ``(router_logits, topk_weights, topk_indices)``:
the indices and weights the experts module then uses, after any grouping, correction
bias, top-K renormalisation and scaling. Hooking that output records exactly what the
model used, so the routers are found generically:

1. the decoder layers are the ``nn.ModuleList`` at ``model.model.layers`` (or the
   longest ``*.layers`` list whose length is ``config.num_hidden_layers``);
2. in each layer, the candidate routers are the submodules named ``gate`` or
   ``router`` that are not plain ``nn.Linear`` layers;
3. one probe forward over two tokens checks what each candidate returns: a tuple
   whose first three items are float scores (tokens, E), weights (tokens, K) and
   integer indices (tokens, K). Layers with such a router are the MoE layers.

Metadata that the trace needs (E, K, shared experts, bytes of one routed expert) is
read from the observed outputs, the config and the experts' parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MoecacheError
from .torch_env import input_device, text_config

ROUTER_NAMES = ("gate", "router")
# config attributes, in order of preference
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k")
_SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_SHARED_MODULES = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class RouterSite:
    """One MoE layer's router: model layer index, qualified module name, modules."""

    layer: int
    name: str
    module: nn.Module
    block: nn.Module  # the router's parent (the MoE block holding ``experts``)


@dataclass
class MoeModelInfo:
    """The MoE structure of a model, as observed by :func:`find_routers`."""

    sites: list[RouterSite]
    num_layers: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    expert_bytes: list[int] | None
    layers_path: str
    router_class: str
    notes: list[str] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[int]:
        return [site.layer for site in self.sites]

    @property
    def router_path(self) -> str:
        """Where the routers sit, e.g. ``model.layers.{i}.mlp.gate``."""
        site = self.sites[0]
        suffix = site.name[len(f"{self.layers_path}.{site.layer}"):]
        return f"{self.layers_path}.{{i}}{suffix}"


@dataclass
class RouterOutput:
    """A router's output flattened to rows: scores (N, E), weights (N, K), indices (N, K)."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


def parse_router_output(output: Any) -> RouterOutput | None:
    """The (scores, weights, indices) of a router's forward output, or None if it is not one.

    Accepts tuples of three or more items (extra items are ignored), tensors of any
    leading shape (flattened to rows), and weights given for all E experts (gathered
    at the indices).
    """
    if not isinstance(output, (tuple, list)) or len(output) < 3:
        return None
    logits, weights, indices = output[0], output[1], output[2]
    if not all(isinstance(t, torch.Tensor) for t in (logits, weights, indices)):
        return None
    if indices.dtype in (torch.bool,) or indices.is_floating_point() or indices.is_complex():
        return None
    if not (logits.is_floating_point() and weights.is_floating_point()) or indices.dim() < 1:
        return None
    top_k = indices.shape[-1]
    num_experts = logits.shape[-1] if logits.dim() else 0
    if top_k < 1 or num_experts < top_k:
        return None
    indices = indices.reshape(-1, top_k)
    rows = indices.shape[0]
    if logits.numel() != rows * num_experts:
        return None
    logits = logits.reshape(rows, num_experts)
    if weights.numel() == rows * top_k:
        weights = weights.reshape(rows, top_k)
    elif weights.numel() == rows * num_experts:
        weights = weights.reshape(rows, num_experts).gather(1, indices)
    else:
        return None
    return RouterOutput(logits, weights, indices)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a causal LM and its qualified name."""
    expected = getattr(text_config(getattr(model, "config", None)), "num_hidden_layers", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return "model.layers", layers
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module):
            if expected is not None and len(module) != expected:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise MoecacheError(f"{_arch(model)}: cannot find the decoder layers (no model.layers)")
    return best


def find_routers(model: nn.Module, *, probe_token: int = 0) -> MoeModelInfo:
    """Locate and validate the router of every MoE layer of ``model`` (one probe forward)."""
    layers_path, layers = find_decoder_layers(model)
    candidates: list[tuple[int, str, nn.Module, nn.Module]] = []
    expert_blocks: list[str] = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            parts = name.split(".")
            if parts[-1] == "experts":
                expert_blocks.append(f"{layers_path}.{index}.{name}")
            if parts[-1] not in ROUTER_NAMES or type(module) is nn.Linear:
                continue
            if "experts" in parts[:-1]:
                continue
            parent = layer.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else layer
            candidates.append((index, f"{layers_path}.{index}.{name}", module, parent))
    if not candidates:
        if expert_blocks:
            raise MoecacheError(f"{_arch(model)}: unsupported MoE layer: {expert_blocks[0]} has "
                                "no router module named 'gate' or 'router'")
        raise MoecacheError(f"{_arch(model)}: no MoE layers (no router module named "
                            f"'gate' or 'router' in {layers_path}): nothing to capture")

    outputs: dict[int, Any] = {}
    handles = []
    for number, (_, _, module, _) in enumerate(candidates):
        def hook(_module, _args, output, number=number):
            outputs.setdefault(number, output)
        handles.append(module.register_forward_hook(hook))
    device = input_device(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.full((1, 2), probe_token, dtype=torch.long, device=device),
                  use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    sites: list[RouterSite] = []
    shapes: set[tuple[int, int]] = set()
    rejected: list[str] = []
    for number, (index, name, module, parent) in enumerate(candidates):
        if sites and sites[-1].layer == index:
            continue  # one router per layer: the outermost valid candidate
        parsed = parse_router_output(outputs.get(number))
        if parsed is None:
            if number in outputs and _looks_like_router(module):
                rejected.append(f"{type(module).__name__} at {name} returns {_describe(outputs[number])}")
            continue
        shapes.add((parsed.logits.shape[1], parsed.indices.shape[1]))
        sites.append(RouterSite(index, name, module, parent))
    if not sites:
        if rejected:
            raise MoecacheError(f"{_arch(model)}: unsupported router: {rejected[0]} "
                                "(expected (router_logits, topk_weights, topk_indices))")
        if expert_blocks:
            raise MoecacheError(f"{_arch(model)}: unsupported MoE layer: no module beside "
                                f"{expert_blocks[0]} returns (router_logits, topk_weights, "
                                "topk_indices)")
        raise MoecacheError(f"{_arch(model)}: no MoE layers (no router module returns "
                            "(router_logits, topk_weights, topk_indices)): nothing to capture")
    if len(shapes) > 1:
        raise MoecacheError(f"{_arch(model)}: MoE layers differ in (num_experts, top_k): "
                            f"{sorted(shapes)}; a trace needs one E and K")
    num_experts, top_k = shapes.pop()
    info = MoeModelInfo(
        sites=sites,
        num_layers=len(layers),
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=count_shared_experts(model.config, sites[0].block),
        expert_bytes=None,
        layers_path=layers_path,
        router_class=type(sites[0].module).__name__,
    )
    if rejected:
        info.notes.append("ignored: " + "; ".join(rejected))
    _check_config(model, info)
    sizes = [routed_expert_bytes(site.block, num_experts) for site in sites]
    info.expert_bytes = None if any(s is None for s in sizes) else [int(s) for s in sizes]
    if info.expert_bytes is None:
        info.notes.append("expert_bytes unknown: no 'experts' module beside the router")
    return info


def routed_expert_bytes(block: nn.Module, num_experts: int) -> int | None:
    """Bytes of one routed expert's weights in ``block`` (the router's parent), as loaded.

    Experts stored as fused tensors with a leading expert dimension (``gate_up_proj``
    of shape (E, ...), biases, quantisation scales) are summed and divided by their
    number of experts; an ``nn.ModuleList`` of experts is averaged over its length.
    """
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    tensors = list(experts.parameters()) + list(experts.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    if isinstance(experts, nn.ModuleList):
        count = len(experts)
    else:
        count = getattr(experts, "num_experts", None)
        if not isinstance(count, int):
            leading = [t.shape[0] for t in tensors if t.dim() >= 2]
            count = max(leading) if leading else num_experts
    if not count or not total:
        return None
    return round(total / count)


def count_shared_experts(config: Any, block: nn.Module) -> int:
    """Shared (always active) experts per MoE layer, per the config; 1 if only a module says so."""
    config = text_config(config)
    for key in _SHARED_KEYS:
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    for name in _SHARED_MODULES:
        if isinstance(getattr(block, name, None), nn.Module):
            return 1
    return 0


def config_value(config: Any, keys: tuple[str, ...]) -> int | None:
    """The first integer config attribute among ``keys`` (text config of multimodal models)."""
    config = text_config(config)
    for key in keys:
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _check_config(model: nn.Module, info: MoeModelInfo) -> None:
    """Note (not fail) where the config disagrees with what the routers return."""
    top_k = config_value(model.config, _TOP_K_KEYS)
    if top_k is not None and top_k != info.top_k:
        info.notes.append(f"config top-k {top_k} != routers' K {info.top_k} (the routers win)")
    experts = config_value(model.config, _NUM_EXPERTS_KEYS)
    if experts is not None and experts != info.num_experts:
        info.notes.append(f"config num_experts {experts} != router width {info.num_experts}")


def _get(config: Any, key: str) -> Any:
    """``getattr(config, key, None)``, also for per-layer keys of heterogeneous configs."""
    try:
        return getattr(config, key, None)
    except (AttributeError, RuntimeError):  # AmbiguousGlobalPerLayerAttributeError
        return None


def _looks_like_router(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "router" in name or "gate" in name or hasattr(module, "top_k")


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor {tuple(output.shape)}"
    if isinstance(output, (tuple, list)):
        items = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                          if isinstance(t, torch.Tensor) else type(t).__name__ for t in output)
        return f"({items})"
    return type(output).__name__


def _arch(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return str(names[0])
