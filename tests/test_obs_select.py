"""The range-by-range selection fold equals selecting after reading the whole obs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.data.obs_select import ObsFold, fold_obs, joinid_dtype
from atlasldm.data.split import hash_int_keys, hash_strings, split_mask

label = st.one_of(st.none(), st.sampled_from(["B", "T", "NK", "mono", "é"]))
donor = st.sampled_from(["d1", "d2", "d3", "d4"])


def range_tables(cells: list[tuple], per_range: int, rnd) -> list[pa.Table]:
    """Tables of consecutive joinid ranges, each internally shuffled, dictionary or plain."""
    tables = []
    for lo in range(0, len(cells), per_range):
        part = cells[lo : lo + per_range]
        rnd.shuffle(part)
        kind = pa.large_string()
        cell_type = pa.array([c[1] for c in part], kind)
        if rnd.random() < 0.5:
            cell_type = cell_type.dictionary_encode()
        tables.append(
            pa.table(
                {
                    "soma_joinid": pa.array([c[0] for c in part], pa.int64()),
                    "cell_type": cell_type,
                    "donor": pa.array([c[2] for c in part], kind),
                    "nnz": pa.array([c[3] for c in part], pa.int64()),
                }
            )
        )
    return tables


def reference(cells, min_genes, split, key, seed, fraction, labels_given):
    """Read everything, then select: the definition the fold must reproduce."""
    cells = sorted(cells)
    ids = np.array([c[0] for c in cells], np.int64)
    keys = hash_int_keys(ids) if key is None else hash_strings([c[2] for c in cells])
    mask = np.array([c[3] >= min_genes for c in cells], bool)
    mask &= split_mask(keys, seed, fraction, split)
    labels = (
        labels_given
        if labels_given is not None
        else sorted({c[1] for c in cells if c[1] is not None})
    )
    index = {v: i for i, v in enumerate(labels)}
    codes = [index.get(c[1], len(labels)) for c, m in zip(cells, mask, strict=True) if m]
    nnz = sum(c[3] for c, m in zip(cells, mask, strict=True) if m)
    return ids[mask], codes, labels, nnz


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(label, donor, st.integers(0, 9)), max_size=80),
    st.integers(1, 30),
    st.integers(0, 6),
    st.sampled_from(["train", "val", "all"]),
    st.sampled_from([None, "donor"]),
    st.one_of(st.none(), st.lists(st.sampled_from(["B", "T", "x"]), unique=True)),
    st.randoms(use_true_random=False),
)
def test_fold_equals_select_after_read(rows, per_range, min_genes, split, key, given, rnd):
    gaps = np.cumsum([1 + rnd.randrange(3) for _ in rows]) + 10  # sparse, ascending joinids
    cells = [(int(j), t, d, n) for j, (t, d, n) in zip(gaps, rows, strict=True)]
    seed, fraction = 7, 0.4

    def keep(ids, nnz, hashes):
        mask = nnz >= min_genes
        key_hashes = hash_int_keys(ids) if hashes is None else hashes
        return mask & split_mask(key_hashes, seed, fraction, split)

    upper = int(gaps[-1]) + 1 if len(cells) else 0
    fold = ObsFold(upper, upper, ["cell_type"], key)
    labels = None if given is None else {"cell_type": given}
    got = fold_obs(range_tables(list(cells), per_range, rnd), fold, keep, labels)
    ids, codes, names, nnz = reference(cells, min_genes, split, key, seed, fraction, given)
    np.testing.assert_array_equal(got.joinids, ids)
    np.testing.assert_array_equal(got.codes[:, 0], codes)
    assert got.labels == {"cell_type": names}
    assert got.nnz_sum == nnz and got.nnz_known == bool(cells)  # no range read: unknown
    assert got.joinids.dtype == np.uint32 and got.codes.dtype == np.int16


def test_joinids_beyond_32_bits_are_kept_exactly():
    big = np.array([2**32 - 1, 2**32, 2**40 + 3], np.int64)
    assert joinid_dtype(2**32) == np.uint32 and joinid_dtype(2**32 + 1) == np.int64
    table = pa.table({"soma_joinid": pa.array(big[::-1]), "nnz": pa.array([5, 5, 5])})
    fold = ObsFold(len(big), int(big[-1]) + 1, [], None)
    got = fold_obs([table], fold, lambda ids, *_: np.ones(len(ids), bool), None)
    np.testing.assert_array_equal(got.joinids, big)
    assert got.joinids.dtype == np.int64 and got.nnz_sum == 15
