"""What a ``moecache remoe finetune`` checkpoint holds besides the Hugging Face files:
``remoe.json`` (settings, base model, trained parameters, metrics).

Its presence marks a folder as a ReMoE checkpoint: ``moecache capture`` labels the
routing of such a folder ``remoe`` (:func:`router_label`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..trace_format import now_iso

META_NAME = "remoe.json"
FORMAT = "moecache-remoe"
FORMAT_VERSION = 1


def router_label(model_path: str | os.PathLike) -> str:
    """``"remoe"`` for a folder written by ``moecache remoe finetune``, else ``"baseline"``."""
    return "remoe" if (Path(model_path) / META_NAME).is_file() else "baseline"


def checkpoint_meta(model: Any, report: Any) -> dict[str, Any]:
    """The content of ``remoe.json`` for ``model`` fine-tuned as ``report``
    (a :class:`moecache.remoe.train.FinetuneReport`) says."""
    import torch
    import transformers

    config = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "router": "remoe",
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "interrupted": report.interrupted,
        "steps_done": report.steps,
        "settings": report.settings,
        "objective": "lm_weight*CE + kl_weight*KL(p_orig||p_new) + locality_weight*"
                     "(-log q(recent experts)); no load-balancing loss",
        "score_kind": report.score_kind,
        "router_parameters": report.router_parameters,
        "num_trainable": report.num_trainable,
        "eval": report.eval,
        "final": report.final,
        "notes": report.notes,
        "elapsed_s": report.elapsed_s,
        "saved_dtype": str(model.dtype).removeprefix("torch."),
        "moecache_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "date": now_iso(),
    }


def write_meta(folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``meta`` as the ``remoe.json`` of ``folder`` (a staging folder: the checkpoint
    is committed as a whole, see :func:`moecache.files.atomic_folder`)."""
    path = Path(folder) / META_NAME
    path.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return path
