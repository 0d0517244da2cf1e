"""Prompt files for ``moecache capture``: plain text (one prompt a line) or JSONL."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoecacheError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_FIELDS = ("prompt", "text")


@dataclass(frozen=True)
class Prompts:
    """The prompts of one capture and where they came from (recorded in trace metadata)."""

    texts: list[str]
    source: str          # the file path, or "<list>" for prompts given in Python
    sha256: str          # of the file's bytes (of the JSON list for in-memory prompts)
    available: int       # prompts in the source, before ``limit``

    def __len__(self) -> int:
        return len(self.texts)


def load_prompts(
    prompts: str | os.PathLike | Sequence[str] | Prompts,
    *,
    limit: int | None = None,
) -> Prompts:
    """Read prompts from a file, or wrap a list of strings.

    A file whose name ends in ``.jsonl`` / ``.ndjson`` holds one JSON object a line with
    a string field ``prompt`` or ``text``; any other file holds one prompt a line. Blank
    lines are skipped in both. ``limit`` keeps the first ``limit`` prompts.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise MoecacheError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(prompts, Prompts):
        loaded = prompts
    elif isinstance(prompts, (str, os.PathLike)):
        loaded = _read_file(Path(prompts))
    else:
        texts = list(prompts)
        if not all(isinstance(p, str) for p in texts):
            raise MoecacheError("prompts must be a file path or a list of strings")
        texts = [p for p in texts if p.strip()]
        if not texts:
            raise MoecacheError("no prompts given (all empty)")
        digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
        loaded = Prompts(texts, "<list>", digest, len(texts))
    if limit is not None and limit < len(loaded.texts):
        loaded = Prompts(loaded.texts[:limit], loaded.source, loaded.sha256, loaded.available)
    return loaded


def read_utf8(path: Path, what: str) -> tuple[bytes, str]:
    """The bytes and text of the UTF-8 file ``path``, a ``what`` (named in errors)."""
    if not path.exists():
        raise MoecacheError(f"{path}: no such {what}")
    if path.is_dir():
        raise MoecacheError(f"{path}: is a folder, expected a {what}")
    raw = path.read_bytes()
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoecacheError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _read_file(path: Path) -> Prompts:
    raw, text = read_utf8(path, "prompts file")
    lines = text.splitlines()
    if path.suffix.lower() in JSONL_SUFFIXES:
        texts = [json_text(path, number, line, JSON_FIELDS)
                 for number, line in enumerate(lines, 1) if line.strip()]
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise MoecacheError(f"{path}: no prompts (the file is empty or blank)")
    return Prompts(texts, str(path), hashlib.sha256(raw).hexdigest(), len(texts))


def json_text(path: Path, number: int, line: str, fields: tuple[str, ...]) -> str:
    """The first string field of ``fields`` in JSONL line ``number`` of ``path``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MoecacheError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if isinstance(record, dict):
        for name in fields:
            value = record.get(name)
            if isinstance(value, str):
                return value
    wanted = " or ".join(repr(name) for name in fields)
    raise MoecacheError(f"{path}:{number}: expected an object with a string {wanted} field")
