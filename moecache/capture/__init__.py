"""Capture the routing of MoE models into moecache traces: Hugging Face checkpoints
(PyTorch) or GGUF files (llama.cpp).

>>> from moecache.capture import capture                       # doctest: +SKIP
>>> capture("path/to/model", "prompts.txt", "traces/m.parquet") # doctest: +SKIP
>>> capture("model-Q4_K_M.gguf", "prompts.txt")                 # doctest: +SKIP

Needs the ``capture`` extra (torch, transformers) or, for GGUF, the ``gguf`` extra
(llama-cpp-python, gguf); importing this package imports none of them.
"""

from .driver import capture, capture_model, default_out, encode_prompts
from .gguf_capture import capture_gguf
from .gguf_file import GGUFInfo, read_gguf
from .prompts import Prompts, load_prompts
from .torch_env import load_model

__all__ = [
    "GGUFInfo",
    "Prompts",
    "capture",
    "capture_gguf",
    "capture_model",
    "default_out",
    "encode_prompts",
    "load_model",
    "load_prompts",
    "read_gguf",
]
