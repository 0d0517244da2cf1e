"""Router tools after ReMoE: fine-tune only the routers of an MoE model for expert reuse.

>>> from moecache.remoe import finetune                                  # doctest: +SKIP
>>> report = finetune("path/to/model", "train.txt", "path/to/model-remoe")  # doctest: +SKIP
>>> report.reuse_before, report.reuse_after                              # doctest: +SKIP

``moecache remoe finetune MODEL --data FILE --out DIR`` is the command. Needs the
``capture`` extra (torch, transformers); importing this package imports neither: the
names below load on first use, and a missing torch is a one-line MoecacheError.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FinetuneReport": "train",
    "FinetuneSettings": "train",
    "finetune": "train",
    "finetune_model": "train",
    "locality_loss": "train",
    "measure_reuse": "train",
    "router_parameters": "train",
    "score_kind": "train",
    "Quality": "quality",
    "biased_routing": "rerouting",
    "Reference": "quality",
    "code_tasks": "quality",
    "evaluate_quality": "quality",
    "reference_outputs": "quality",
    "load_texts": "data",
    "pack_blocks": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        loaded = importlib.import_module(f".{module}", __name__)
    except ImportError as err:
        from ..capture.torch_env import TORCH_PACKAGES, missing_torch

        if err.name in TORCH_PACKAGES:
            raise missing_torch("remoe") from None
        raise
    value = getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
