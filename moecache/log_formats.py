"""Readers for routing logs that third-party tools write as arrays, not rows.

Each reader turns one file into the same dictionary of NumPy arrays an ``.npz`` log
holds (see :mod:`moecache.importer`): ``experts`` (tokens, layers, K) integer ids,
and optionally ``weights`` (same shape), ``logits`` (tokens, layers, E) router scores,
``seq``/``step``/``token_id`` (one per token), ``layers`` (the model layer id of each
axis-1 entry) and ``num_experts`` (a 0-d integer array, when the format records E).
The importer validates and writes what a reader returns; readers only check what
their own format promises and raise :class:`MoecacheError` naming the file.

:data:`READERS` maps a format name to its reader; :func:`sniff` names the format of a
file from its suffix or leading bytes, or returns None for the importer's own formats.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Reader = Callable[[Path, str], dict[str, np.ndarray]]

READERS: dict[str, Reader] = {}


def sniff(path: Path) -> str | None:
    """The name of the array format of ``path`` in :data:`READERS`, or None."""
    return None
