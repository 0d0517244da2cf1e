"""Inference-time alternatives to ReMoE, run in the model: routing biased toward recent or
resident experts, with the model computing on the experts it picked.

:func:`moecache.reroute` emulates these offline from a trace's router scores, so it
cannot say what they cost in quality; here the bias acts inside the forward pass. Each
MoE layer's router output is replaced: over each sequence of the batch, token by token,
``bias`` is added to the scores of the favoured experts (``recent``: those the new
routing used in the same layer within the previous ``window`` tokens; ``cache``: those
resident in a per-layer LRU cache of ``capacity`` experts fed with the new routing) and
the top K become the routing (:func:`moecache.reroute.route_sequence`); their gate
weights are their softmax probabilities scaled to the original weights' sum
(:func:`moecache.reroute.rerouted_weights`). Every later layer sees the outputs of the
experts actually used. Softmax routers only (a sigmoid router's scores mean something
else): others are refused.

>>> with biased_routing(model, mode="recent", bias=2.0):   # doctest: +SKIP
...     quality = evaluate_quality(model, blocks, reference)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..capture.routers import parse_router_output
from ..errors import MoecacheError
from ..reroute import check_bias, rerouted_weights, route_sequence
from .train import find_model_routers, score_kind


@contextlib.contextmanager
def biased_routing(model: nn.Module, *, mode: str = "recent", bias: float = 1.0, window: int = 1,
                   capacity: int | None = None) -> Iterator[None]:
    """Within the block, every forward of ``model`` over token blocks (``input_ids`` of shape
    (B, T)) routes each block with the bias (module docstring), from its first token: for
    teacher-forced forwards, not a decode that feeds one token at a time. The hooks are
    removed on leaving the block."""
    info = find_model_routers(model, None)
    check_bias(mode, bias, window, capacity, info.top_k)
    shape: list[int] = []  # (B, T) of the forward under way

    def note_shape(_module: nn.Module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise MoecacheError("biased routing: the model must be called with input_ids of shape (B, T)")
        shape[:] = ids.shape

    def rerouted(module: nn.Module, _args, output):
        route = parse_router_output(output)
        if route is None or not shape or route.indices.shape[0] != shape[0] * shape[1]:
            raise MoecacheError(f"biased routing: {type(module).__name__} gave an unexpected output")
        if output[1].numel() != route.indices.numel():
            raise MoecacheError(f"biased routing: {type(module).__name__} gives weights for every expert, "
                                "not for the K it picks")
        if score_kind(route, module) != "softmax":
            raise MoecacheError(f"biased routing: {type(module).__name__} is not a softmax router")
        logits = route.logits.detach().float()
        rows = logits.cpu().numpy().reshape(shape[0], shape[1], -1)
        new = np.concatenate([route_sequence(row, info.top_k, mode=mode, bias=bias, window=window,
                                             capacity=capacity) for row in rows])
        total = route.weights.detach().float().sum(-1, keepdim=True).cpu().numpy()
        weights = rerouted_weights(torch.softmax(logits, -1).cpu().numpy(), new, total)
        indices = torch.as_tensor(new.astype(np.int64), device=route.indices.device).to(output[2].dtype)
        out_weights = torch.as_tensor(weights, device=route.weights.device).to(output[1].dtype)
        return (output[0], out_weights.reshape(output[1].shape), indices.reshape(output[2].shape),
                *output[3:])

    handles = [model.register_forward_pre_hook(note_shape, with_kwargs=True)]
    try:
        handles += [site.module.register_forward_hook(rerouted) for site in info.sites]
        yield
    finally:
        for handle in handles:
            handle.remove()
