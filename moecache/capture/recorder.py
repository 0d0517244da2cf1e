"""Forward hooks that record, per model forward, the experts every token was routed to.

The hooks only keep references to the router's output tensors; nothing leaves the
device per layer. After a model forward, :meth:`RoutingRecorder.take` stacks the
layers on the device (ids as int16, weights as float32, optional scores as float16)
and starts ONE asynchronous device-to-host copy of the step; the caller reads it
back (:meth:`PendingStep.wait`) a step later, when the copy is long done, so capture
adds no synchronisation of its own to generation. On CPU the copy is immediate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import MoecacheError
from .routers import RouterSite, parse_router_output

_FP16_MAX = 65504.0


class PendingStep:
    """Host copies of one step's tensors, possibly still in flight from the device."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        cuda = next((t.device for t in tensors.values() if t.is_cuda), None)
        self._event = None
        if cuda is not None:
            # D2H with non_blocking=True lands in pinned memory; the event says when.
            self._host = {k: t.to("cpu", non_blocking=True) for k, t in tensors.items()}
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(cuda))
        else:
            self._host = {k: t.detach().to("cpu") for k, t in tensors.items()}

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())

    def wait(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {k: t.numpy() for k, t in self._host.items()}


class RoutingRecorder:
    """Hooks on the routers of ``sites``; use as a context manager (hooks removed on exit)."""

    def __init__(self, sites: Sequence[RouterSite], *, with_logits: bool = False):
        self.sites = list(sites)
        self.with_logits = with_logits
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.reset()

    # -- hooks ------------------------------------------------------------------------
    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for number, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_hook(self._hook(number)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, number: int):
        site = self.sites[number]

        def hook(_module, _args, output):
            parsed = parse_router_output(output)
            if parsed is None:
                raise MoecacheError(f"router {site.name} returned an unexpected output")
            logits = None
            if self.with_logits:
                logits = parsed.logits.detach().float().clamp(-_FP16_MAX, _FP16_MAX).half()
            self._outputs[number] = (parsed.indices.detach(), parsed.weights.detach(), logits)
            self._calls[number] += 1

        return hook

    # -- steps ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget what the routers returned so far (call before each model forward)."""
        self._outputs: list[tuple | None] = [None] * len(self.sites)
        self._calls = [0] * len(self.sites)

    def take(self, extras: Mapping[str, torch.Tensor] | None = None) -> PendingStep:
        """The routing of the forward that just ran, as a :class:`PendingStep`.

        Its arrays are ``experts`` (N, L, K) int16 and ``weights`` (N, L, K) float32,
        K sorted by descending weight (the router's rank order; routers that pick the
        top-K unsorted get this canonical order), ``logits`` (N, L, E) float16 when
        recording scores, plus the given ``extras``. N counts the forward's token rows
        in the model's flattening order (batch-major), padding included.
        """
        for number, calls in enumerate(self._calls):
            if calls != 1:
                what = "did not run" if calls == 0 else f"ran {calls} times"
                raise MoecacheError(f"router {self.sites[number].name} {what} in one model forward")
        device = self._outputs[0][0].device
        indices = torch.stack([o[0].to(device, non_blocking=True) for o in self._outputs], dim=1)
        weights = torch.stack([o[1].to(device, non_blocking=True).float() for o in self._outputs],
                              dim=1)
        weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
        tensors = {"experts": indices.gather(-1, order).to(torch.int16), "weights": weights}
        if self.with_logits:
            tensors["logits"] = torch.stack(
                [o[2].to(device, non_blocking=True) for o in self._outputs], dim=1)
        if extras:
            tensors.update(extras)
        self.reset()
        return PendingStep(tensors)
