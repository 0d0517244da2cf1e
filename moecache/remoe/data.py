"""Training text for router fine-tuning: read documents, tokenize, pack into blocks.

Formats (chosen by the file name, like prompt files of ``moecache capture``):

- ``*.jsonl`` / ``*.ndjson``: one JSON object a line; each non-blank line is one
  document, taken from its string field ``text`` (or ``content``, or ``prompt``).
- anything else: UTF-8 plain text; documents are separated by one or more blank
  lines, so a file of one document a line separated by blank lines, a file of
  paragraphs or a single long text all work. Lines inside a document keep their
  newlines (hard-wrapped prose is not cut into documents at every line).

Packing: each document is tokenized with the tokenizer's own special tokens (a BOS
where the tokenizer adds one) and followed by EOS when the tokenizer has one; the
documents are concatenated in file order and cut into blocks of ``seq_len`` tokens,
the standard causal-LM packing. Blocks therefore cross document boundaries, which is
harmless for a router objective: in serving, the expert cache also carries over from
one request to the next. Tokenization stops once ``max_blocks`` full blocks exist
(enough for every optimisation step without repetition), so a large corpus costs
only what is used. A text shorter than one block gives a single shorter block.

Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..capture.prompts import json_text, read_utf8
from ..errors import MoecacheError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_FIELDS = ("text", "content", "prompt")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def load_texts(data: str | os.PathLike | Sequence[str]) -> list[str]:
    """The documents of a data file (see the module docstring), or of a list of strings.

    Raises :class:`MoecacheError` (one line) for a missing file, a folder, bytes that
    are not UTF-8, invalid JSONL, or data without any non-blank document.
    """
    if not isinstance(data, (str, os.PathLike)):
        texts = list(data)
        if not all(isinstance(t, str) for t in texts):
            raise MoecacheError("training data must be a file path or a list of strings")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise MoecacheError("no training text given (all documents are empty)")
        return texts
    path = Path(data)
    _, text = read_utf8(path, "data file")
    if path.suffix.lower() in JSONL_SUFFIXES:
        texts = [json_text(path, number, line, JSON_FIELDS)
                 for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        texts = [doc.strip("\n") for doc in _BLANK_LINES.split(text)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoecacheError(f"{path}: no training text (the file is empty or blank)")
    return texts


def pack_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int, *,
                max_blocks: int | None = None, source: str = "training data") -> np.ndarray:
    """Token blocks (n, seq_len) int64 packed from ``texts`` (see the module docstring).

    ``max_blocks`` stops tokenizing once that many full blocks exist. Fewer tokens than
    ``seq_len`` give one block of all of them (at least 2 are needed: one prediction).
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise MoecacheError(f"--seq-len must be an integer >= 2, got {seq_len!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, int) else None
    want = None if max_blocks is None else max_blocks * seq_len
    chunks: list[list[int]] = []
    total = 0
    for text in texts:
        ids = [int(i) for i in tokenizer(text, verbose=False)["input_ids"]]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        chunks.append(ids)
        total += len(ids)
        if want is not None and total >= want:
            break
    stream = np.fromiter((i for chunk in chunks for i in chunk), dtype=np.int64, count=total)
    if len(stream) < 2:
        raise MoecacheError(f"{source}: too little text ({len(stream)} token"
                            f"{'' if len(stream) == 1 else 's'}; at least 2 are needed)")
    if len(stream) < seq_len:
        return stream[None, :]
    count = len(stream) // seq_len
    if max_blocks is not None:
        count = min(count, max_blocks)
    return stream[:count * seq_len].reshape(count, seq_len)


def token_blocks(values: Any, vocab: int | None = None, owner: str = "model") -> np.ndarray:
    """Token ids given as an array (NumPy, a torch tensor, nested lists) as blocks (n, T)
    int64: one row is one block; integers only (a float is never cast), T >= 2, and, given
    ``vocab`` (of the ``owner``: the model or its tokenizer), every id in [0, vocab).
    Anything else is one MoecacheError."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    blocks = np.asarray(values)
    if blocks.ndim == 1:
        blocks = blocks[None, :]
    if blocks.ndim != 2 or blocks.shape[1] < 2 or not len(blocks) or blocks.dtype.kind not in "iu":
        raise MoecacheError(f"token blocks must be integers of shape (n, T>=2), got {blocks.dtype} "
                            f"{blocks.shape}")
    if vocab is not None and (blocks.min() < 0 or blocks.max() >= vocab):
        bad = int(blocks.min() if blocks.min() < 0 else blocks.max())
        raise MoecacheError(f"token id {bad} is beyond the {owner}'s range 0..{vocab - 1}")
    return np.ascontiguousarray(blocks, dtype=np.int64)
