"""The ``cb_eval`` tap of :mod:`.gguf_tap`, compiled: the same reads without Python.

llama.cpp's scheduler asks the callback about every graph node, several hundred per
decode; through ctypes each call costs a microsecond or two of Python, and reading the
tensors of each MoE layer tens more, a large share of a small model's decode time. This
C function does what :class:`.gguf_tap.MoeTap`'s Python callback does (answer the asks,
learn each layer's last weights variant, read the weights and, through their sources,
the ids) into arrays that :class:`.gguf_tap.MoeTap` owns and reads once per decode.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``)
into moecache's cache folder (``$XDG_CACHE_HOME/moecache``, else ``~/.cache/moecache``);
without a compiler the Python callback does the work (same routing, slower; tested to
record the same).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = r"""
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

/* NAME_OFFSET, SRC_OFFSET: where a ggml_tensor's name and src[] start (set by moecache) */
#define NE(t) ((const int64_t *) ((const char *) (t) + 16))
#define NB(t) ((const size_t *) ((const char *) (t) + 48))
#define TYPE(t) (*(const int *) (t))
#define NAME(t) ((const char *) (t) + NAME_OFFSET)
#define SRC(t, i) (((void * const *) ((const char *) (t) + SRC_OFFSET))[i])

typedef void (*tensor_get_fn)(const void * tensor, void * data, size_t offset, size_t size);
typedef size_t (*nbytes_fn)(const void * tensor);

struct tap {
    tensor_get_fn get;
    nbytes_fn nbytes;
    int32_t top_k, columns, capacity, max_layer;
    const int32_t * column;   /* block index -> MoE column, -1 for other blocks */
    int32_t * ids;            /* [columns][capacity][top_k] */
    float * weights;          /* [columns][capacity][top_k] */
    int32_t * count;          /* rows per column since the last take */
    int32_t * start;          /* first row of the current ubatch, per column */
    int8_t * last;            /* variant last seen per column (learning) */
    int8_t * final;           /* variant to ask for per column, -1 until learned */
    int32_t error;            /* 0, or what went wrong (see gguf_native.py) */
    int32_t error_layer;
    uint8_t * scratch;
    size_t scratch_size;
};

static const char base[] = "ffn_moe_weights";
static const char * const variants[] = {"", "_softmax", "_norm", "_scaled"};

/* variant number and block index of a weights tensor name, or -1 */
static int parse(const char * name, int * layer) {
    if (strncmp(name, base, sizeof base - 1) != 0) return -1;
    name += sizeof base - 1;
    for (int v = 3; v >= 0; v--) {
        size_t n = strlen(variants[v]);
        if (strncmp(name, variants[v], n) == 0 && name[n] == '-') {
            const char * digits = name + n + 1;
            char * end;
            long value = strtol(digits, &end, 10);
            if (end == digits || *end != '\0') return -1;
            *layer = (int) value;
            return v;
        }
    }
    return -1;
}

static bool fail(struct tap * tp, int code, int layer) {
    if (!tp->error) { tp->error = code; tp->error_layer = layer; }
    return false;
}

/* copy a (tokens, K) strided view into rows [row, row + tokens) of out */
static int copy_rows(struct tap * tp, const void * t, int type, size_t item, void * out,
                     int row) {
    const int64_t * ne = NE(t);
    const size_t * nb = NB(t);
    int64_t tokens;
    size_t k_stride, t_stride;
    if (TYPE(t) != type) return 1;
    if (ne[0] == 1 && ne[1] == tp->top_k) { k_stride = nb[1]; tokens = ne[2]; t_stride = nb[2]; }
    else if (ne[0] == tp->top_k) { k_stride = nb[0]; tokens = ne[1]; t_stride = nb[1]; }
    else return 1;
    if (row + tokens > tp->capacity) return 3;
    size_t size = tp->nbytes(t);
    if (size > tp->scratch_size) {
        uint8_t * grown = realloc(tp->scratch, size);
        if (!grown) return 3;
        tp->scratch = grown;
        tp->scratch_size = size;
    }
    tp->get(t, tp->scratch, 0, size);
    char * dst = (char *) out + (size_t) row * tp->top_k * item;
    for (int64_t i = 0; i < tokens; i++)
        for (int k = 0; k < tp->top_k; k++)
            memcpy(dst + ((size_t) i * tp->top_k + k) * item,
                   tp->scratch + i * t_stride + k * k_stride, item);
    return 0;
}

void moecache_tap_release(struct tap * tp) {
    free(tp->scratch);
    tp->scratch = NULL;
    tp->scratch_size = 0;
}

bool moecache_tap(void * t, bool ask, void * user_data) {
    struct tap * tp = user_data;
    int layer;
    int v = parse(NAME(t), &layer);
    if (v < 0) return false;
    int col = (layer >= 0 && layer <= tp->max_layer) ? tp->column[layer] : -1;
    if (ask) return col >= 0 ? (tp->final[col] < 0 || tp->final[col] == v) : true;
    if (col < 0) return fail(tp, 4, layer);
    if (v == 0 || tp->final[col] >= 0) tp->start[col] = tp->count[col];
    int row = tp->start[col];
    size_t plane = (size_t) col * tp->capacity * tp->top_k;
    int status = copy_rows(tp, t, 0, sizeof(float), tp->weights + plane, row);
    if (status) return fail(tp, status, layer);
    /* the ids: ffn_moe_weights (reached through first sources) is get_rows(probs, topk) */
    char gathered[64];
    snprintf(gathered, sizeof gathered, "%s-%d", base, layer);
    const void * node = t;
    for (int hop = 0; node && hop < 8 && strcmp(NAME(node), gathered) != 0; hop++)
        node = SRC(node, 0);
    const void * ids = (node && strcmp(NAME(node), gathered) == 0) ? SRC(node, 1) : NULL;
    if (!ids || strncmp(NAME(ids), "ffn_moe_topk-", 13) != 0) return fail(tp, 2, layer);
    status = copy_rows(tp, ids, 26, sizeof(int32_t), tp->ids + plane, row);
    if (status) return fail(tp, status, layer);
    const int64_t * ne = NE(t);
    tp->count[col] = row + (int32_t) (ne[0] == 1 ? ne[2] : ne[1]);
    tp->last[col] = (int8_t) v;
    return true;
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


def _library(name_offset: int, src_offset: int) -> ctypes.CDLL | None:
    """The compiled tap (built once, then loaded from the cache), or None."""
    source_text = (f"#define NAME_OFFSET {int(name_offset)}\n"
                   f"#define SRC_OFFSET {int(src_offset)}\n{_SOURCE}")
    digest = hashlib.sha256(source_text.encode()).hexdigest()[:16]
    if digest in _LOADED:
        return _LOADED[digest]
    target = _cache_dir() / f"gguf_tap-{digest}-{sys.platform}-{platform.machine()}.so"
    if not target.is_file():
        compiler = _compiler()
        if compiler is None:
            return None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as folder:
                source = Path(folder) / "tap.c"
                source.write_text(source_text)
                built = Path(folder) / "tap.so"
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


ERRORS = {
    1: "is not a (K, tokens) tensor of the expected type",
    2: "does not lead to ffn_moe_weights(probs, ffn_moe_topk)",
    3: "holds more tokens than the decode",
    4: "names no MoE layer of the file's routers",
}


class TapState(ctypes.Structure):
    """``struct tap`` of the C source: where the compiled tap writes what it reads."""

    _fields_ = [("get", ctypes.c_void_p), ("nbytes", ctypes.c_void_p),
                ("top_k", ctypes.c_int32), ("columns", ctypes.c_int32),
                ("capacity", ctypes.c_int32), ("max_layer", ctypes.c_int32),
                ("column", ctypes.c_void_p), ("ids", ctypes.c_void_p),
                ("weights", ctypes.c_void_p), ("count", ctypes.c_void_p),
                ("start", ctypes.c_void_p), ("last", ctypes.c_void_p),
                ("final", ctypes.c_void_p), ("error", ctypes.c_int32),
                ("error_layer", ctypes.c_int32), ("scratch", ctypes.c_void_p),
                ("scratch_size", ctypes.c_size_t)]


def compiled_tap(name_offset: int, src_offset: int, callback_type):
    """(the compiled tap as a ``callback_type`` function pointer, whose user data is a
    :class:`TapState`; its release function for the state's scratch memory), or None
    when it cannot be built here."""
    lib = _library(name_offset, src_offset)
    if lib is None:
        return None
    lib.moecache_tap_release.restype = None
    lib.moecache_tap_release.argtypes = [ctypes.c_void_p]
    return ctypes.cast(lib.moecache_tap, callback_type), lib.moecache_tap_release
