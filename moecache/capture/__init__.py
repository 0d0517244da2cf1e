"""Capture the routing of Hugging Face MoE models into moecache traces.

>>> from moecache.capture import capture                       # doctest: +SKIP
>>> capture("path/to/model", "prompts.txt", "traces/m.parquet") # doctest: +SKIP

Needs the ``capture`` extra (torch, transformers); importing this package does not
import them.
"""

from .driver import capture, capture_model, default_out, encode_prompts
from .prompts import Prompts, load_prompts
from .torch_env import load_model

__all__ = [
    "Prompts",
    "capture",
    "capture_model",
    "default_out",
    "encode_prompts",
    "load_model",
    "load_prompts",
]
