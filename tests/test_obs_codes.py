"""Obs read in chunks into compact codes equals the per-cell Python definitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.data.obs_codes import (
    dictionary_codes,
    hashes_of,
    present_sorted,
    read_obs,
    recode_lookup,
)
from atlasldm.data.split import hash_strings

label = st.one_of(st.none(), st.sampled_from(["B", "T", "NK", "mono", "é"]))


def recode(coded: tuple[np.ndarray, list], vocabulary: list) -> np.ndarray:
    """Codes into `vocabulary` as the selection maps them: one lookup per value, then a gather."""
    codes, values = coded
    return recode_lookup(values, vocabulary)[codes]


def tables(joinids: list[int], labels: list, dictionary: bool, chunks: int) -> list[pa.Table]:
    """The obs as `chunks` Arrow tables, in the given (possibly unsorted) joinid order."""
    array = pa.array(labels, type=pa.large_string())
    if dictionary:
        array = array.dictionary_encode()
    table = pa.table(
        {
            "soma_joinid": pa.array(joinids, pa.int64()),
            "cell_type": array,
            "nnz": pa.array([j % 7 for j in joinids], pa.int64()),
        }
    )
    cut = -(-len(joinids) // chunks) if joinids else 1
    return [table.slice(i, cut) for i in range(0, max(len(joinids), 1), cut)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(label, max_size=60),
    st.booleans(),
    st.integers(1, 4),
    st.lists(st.sampled_from(["B", "T", "x"]), unique=True),
    st.randoms(use_true_random=False),
)
def test_read_obs_matches_python(labels, dictionary, chunks, vocabulary, rnd):
    joinids = list(range(100, 100 + len(labels)))
    shuffled = list(zip(joinids, labels, strict=True))
    rnd.shuffle(shuffled)  # chunks may come back out of joinid order
    obs = read_obs(
        tables([j for j, _ in shuffled], [v for _, v in shuffled], dictionary, chunks),
        ["cell_type"],
        with_nnz=True,
    )
    np.testing.assert_array_equal(obs.joinids, joinids)
    np.testing.assert_array_equal(obs.nnz, [j % 7 for j in joinids])
    index = {v: i for i, v in enumerate(vocabulary)}
    coded = obs.coded["cell_type"]
    np.testing.assert_array_equal(
        recode(coded, vocabulary), [index.get(v, len(index)) for v in labels]
    )
    assert present_sorted(coded) == sorted({v for v in labels if v is not None})
    expected_hash = hash_strings(["" if v is None else v for v in labels])
    np.testing.assert_array_equal(hashes_of(coded), expected_hash)


def test_unused_dictionary_entries_are_not_labels():
    column = pa.chunked_array([pa.DictionaryArray.from_arrays([1, 1, None], ["gone", "kept"])])
    coded = dictionary_codes(column)
    assert present_sorted(coded) == ["kept"]
    np.testing.assert_array_equal(recode(coded, ["kept"]), [0, 0, 1])
