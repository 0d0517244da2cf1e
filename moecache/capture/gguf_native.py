"""A compiled prefilter in front of the Python ``cb_eval`` callback of :mod:`.gguf_tap`.

llama.cpp's scheduler asks the callback about every graph node, several hundred per
decode; through ctypes each ask costs a microsecond or two of Python, a few percent of
a small model's decode time. This C function answers the asks itself (no, unless the
node's name starts with ``ffn_moe_weights``) and forwards only those nodes, and the
computed-tensor calls, to the Python callback: about one Python call per MoE layer.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``)
into moecache's cache folder (``$XDG_CACHE_HOME/moecache``, else ``~/.cache/moecache``);
without a compiler the Python callback sees every node (same routing, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = r"""
#include <stdbool.h>
#include <string.h>

typedef bool (*eval_callback)(void * tensor, bool ask, void * user_data);

static const char wanted[] = "ffn_moe_weights";

/* user_data: the Python callback to forward to */
bool moecache_filter(void * tensor, bool ask, void * user_data) {
    if (ask && strncmp((const char *) tensor + NAME_OFFSET, wanted, sizeof wanted - 1) != 0) {
        return false;
    }
    return ((eval_callback) user_data)(tensor, ask, NULL);
}
"""

_LOADED: dict[str, ctypes.CDLL] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moecache"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _library(name_offset: int) -> ctypes.CDLL | None:
    """The compiled filter (built once, then loaded from the cache), or None."""
    source_text = f"#define NAME_OFFSET {int(name_offset)}\n{_SOURCE}"
    digest = hashlib.sha256(source_text.encode()).hexdigest()[:16]
    if digest in _LOADED:
        return _LOADED[digest]
    target = _cache_dir() / f"gguf_filter-{digest}-{sys.platform}.so"
    if not target.is_file():
        compiler = _compiler()
        if compiler is None:
            return None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                source = Path(folder) / "filter.c"
                source.write_text(source_text)
                built = Path(folder) / "filter.so"
                done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o",
                                       str(built)], capture_output=True)
                if done.returncode:
                    return None
                os.replace(built, target)  # atomic: a concurrent build writes the same bytes
        except OSError:
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    _LOADED[digest] = lib
    return lib


def prefiltered(name_offset: int, callback_type):
    """A ``callback_type`` function pointer that, given a Python callback of that type as
    its user data, forwards it only the asks about ``ffn_moe_weights*`` nodes (and every
    computed-tensor call); None when the filter cannot be built here. ``name_offset``:
    where a ggml_tensor's name starts."""
    lib = _library(name_offset)
    return None if lib is None else ctypes.cast(lib.moecache_filter, callback_type)
