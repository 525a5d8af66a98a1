"""Positional .npy reads equal numpy's own indexing, for any ids (order, repeats, gaps)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.data.npy_reads import TAKE_GAP, NpyFile


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3 * TAKE_GAP),
    st.sampled_from(["int32", "float32", "int64", "uint16"]),
    st.data(),
)
def test_take_and_read_match_numpy(tmp_path_factory, n, dtype, data):
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    values = (np.arange(n) * 7 % 1000).astype(dtype)
    np.save(path, values)
    npy = NpyFile(path)
    ids = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=50)), dtype=np.int64)
    np.testing.assert_array_equal(npy.take(ids), values[ids])
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    np.testing.assert_array_equal(npy.read(lo, hi), values[lo:hi])
    np.testing.assert_array_equal(np.asarray(npy), values)
    npy.close()
