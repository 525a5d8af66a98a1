"""Vectorised obs label codes and split hashes equal the per-cell Python definitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from data.reader import _present_values, dictionary_codes, encode_with_null, hashes_of
from data.split import hash_strings

labels = st.lists(st.one_of(st.none(), st.sampled_from(["B", "T", "NK", "mono", "é"])), max_size=60)


def as_column(values: list, dictionary: bool, chunks: int) -> pa.ChunkedArray:
    array = pa.array(values, type=pa.large_string())
    if dictionary:
        array = array.dictionary_encode()
    cut = len(values) // max(chunks, 1)
    parts = [array[i * cut : (i + 1) * cut] for i in range(chunks - 1)] + [
        array[(chunks - 1) * cut :]
    ]
    return pa.chunked_array(parts, type=array.type)


@settings(max_examples=60, deadline=None)
@given(
    labels,
    st.booleans(),
    st.integers(1, 3),
    st.lists(st.sampled_from(["B", "T", "x"]), unique=True),
)
def test_codes_and_hashes_match_python(values, dictionary, chunks, vocabulary):
    column = as_column(values, dictionary, chunks)
    index = {v: i for i, v in enumerate(vocabulary)}
    expected = [index.get(v, len(vocabulary)) for v in values]
    np.testing.assert_array_equal(encode_with_null(column, vocabulary), expected)
    assert _present_values(column) == sorted({v for v in values if v is not None})
    expected_hash = hash_strings(["" if v is None else v for v in values])
    np.testing.assert_array_equal(hashes_of(dictionary_codes(column)), expected_hash)


def test_unused_dictionary_entries_are_not_labels():
    column = pa.chunked_array([pa.DictionaryArray.from_arrays([1, 1, None], ["gone", "kept"])])
    assert _present_values(column) == ["kept"]
    np.testing.assert_array_equal(encode_with_null(column, ["kept"]), [0, 0, 1])
