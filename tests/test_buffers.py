"""moecache.buffers: arrays mapped up front are zeros, writeable, freed with the array, and
loads and step sets built in them equal those built in NumPy's own arrays."""

import gc
import mmap

import numpy as np
import pytest

import moecache as mc
import moecache.buffers as buffers
from moecache.buffers import mapped_zeros


def _memory(array):
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


@pytest.mark.skipif(not hasattr(mmap, "MAP_POPULATE"), reason="Linux only")
def test_large_arrays_are_mapped_zeros(monkeypatch):
    small = mapped_zeros((3, 4), np.int16)
    assert not isinstance(_memory(small), mmap.mmap) and not small.any()
    monkeypatch.setattr(buffers, "POPULATE_ABOVE", 0)
    big = mapped_zeros((1000, 3), np.int64)
    assert isinstance(_memory(big), mmap.mmap) and big.shape == (1000, 3) and big.dtype == np.int64
    assert not big.any() and big.flags.writeable and big.flags.c_contiguous
    big[:] = 7
    assert int(big.sum()) == 7 * 3000
    assert mapped_zeros(0, np.int32).shape == (0,)

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    mapping = mmap.mmap
    monkeypatch.setattr(mmap, "mmap", refused)  # a mapping refused (a memory limit): NumPy's array
    fallback = mapped_zeros((10, 2), np.int16)
    assert fallback.shape == (10, 2) and not fallback.any() and not isinstance(_memory(fallback), mapping)


def test_loads_and_step_sets_in_mapped_arrays_are_the_same(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    mc.synth(layers=3, experts=16, top_k=2, tokens=400, sequences=2, prompt_len=5, seed=4).save(path)
    plain = mc.Trace.load(path)
    expected = mc.replay(plain, "lru", 12, "global").to_dict()
    monkeypatch.setattr(buffers, "POPULATE_ABOVE", 0)
    mapped = mc.Trace.load(path)
    np.testing.assert_array_equal(mapped.experts, plain.experts)
    req, ref = mc.Requests.from_trace(mapped), mc.Requests.from_trace(plain)
    np.testing.assert_array_equal(req.ids, ref.ids)
    np.testing.assert_array_equal(req.offsets, ref.offsets)
    assert mc.replay(mapped, "lru", 12, "global").to_dict() == expected
    del mapped, req
    gc.collect()  # the mappings go with their arrays (a closed mmap would crash a later read)
    assert mc.replay(plain, "lru", 12, "global").to_dict() == expected
