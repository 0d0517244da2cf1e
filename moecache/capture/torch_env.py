"""The torch side shared by capture and remoe: the import guard, dtypes, devices, seeding
and model loading.

Importing this module imports neither torch nor transformers (``import moecache.capture``
and ``import moecache.remoe`` stay light); each function imports them when called, and a
missing package is a one-line :class:`MoecacheError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import MoecacheError
from ..files import first_line
from ..units import check_seed

TORCH_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors")
"""What the ``capture`` extra installs; an ImportError naming one of them means it is missing."""
DTYPES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
"""Accepted ``--dtype`` spellings -> torch dtype name (``auto``: the checkpoint's own)."""


def missing_torch(what: str) -> MoecacheError:
    """The one-line error for ``what`` (``"capture"``, ``"remoe"``) without the capture extra."""
    return MoecacheError(f"{what} needs PyTorch and transformers: pip install 'moecache[capture]'")


def require_torch(what: str = "capture") -> Any:
    """The torch module, or :func:`missing_torch`'s error."""
    try:
        import torch
    except ImportError:
        raise missing_torch(what) from None
    return torch


def dtype_name(dtype: Any, flag: str = "--dtype", allowed: Iterable[str] | None = None) -> str:
    """The canonical name (``float16``, ``auto``, ...) of a dtype spelling or torch dtype;
    a one-line error naming ``flag`` if it is unknown or its canonical name is not ``allowed``."""
    name = DTYPES.get(str(dtype).removeprefix("torch."))
    if name is None or (allowed is not None and name not in allowed):
        choices = DTYPES if allowed is None else allowed
        raise MoecacheError(f"{flag} must be one of {', '.join(choices)}, got {dtype!r}")
    return name


def torch_dtype(dtype: Any) -> Any:
    """The torch dtype of a spelling ``dtype_name`` accepts (``"auto"`` stays ``"auto"``)."""
    name = dtype_name(dtype)
    return name if name == "auto" else getattr(require_torch(), name)


def resolve_device(device: str) -> Any:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device."""
    torch = require_torch()
    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MoecacheError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoecacheError(f"--device {device}: no CUDA device is available")
    return resolved


def input_device(model: Any) -> Any:
    """The device the model's input ids go to: its input embeddings' (else its first parameter's)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.device
    return next(model.parameters()).device


def text_config(config: Any) -> Any:
    """The text model's part of a transformers config (multimodal configs nest it), or None."""
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def seed_torch(seed: int) -> None:
    """Seed torch's generators (CPU and every device) with a checked ``seed``."""
    require_torch().manual_seed(check_seed(seed))


def load_model(model_path: str | os.PathLike, *, device: str = "auto",
               dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder or the local Hugging Face cache, never the hub."""
    require_torch()
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_type = torch_dtype(dtype)
    target = resolve_device(device)
    source = str(model_path)
    kwargs: dict[str, Any] = {"dtype": torch_type, "local_files_only": True}
    if target.type == "cuda":
        kwargs["device_map"] = str(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
            # transformers builds an empty tokenizer when the folder has no tokenizer files
            raise MoecacheError(f"{source}: the tokenizer is missing (its vocabulary holds only special "
                                "tokens): copy the model's tokenizer files (tokenizer.json, ...) into it")
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except MoecacheError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # missing, truncated, corrupt
        where = "" if Path(source).exists() else " (not a local folder nor in the local HF cache)"
        raise MoecacheError(f"{source}: cannot load model{where}: {first_line(err)}") from None
    if target.type != "cuda":
        model.to(target)
    model.eval()
    return model, tokenizer
