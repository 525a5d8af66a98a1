"""Gene and label vocabularies: mapping, unknown-gene policy, errors, round trips, gene lists."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.data.vocab import (
    LIST_HEADERS,
    GeneVocab,
    encode_labels,
    load_labels,
    save_labels,
)


def _vocab() -> GeneVocab:
    return GeneVocab(["ENSG1", "ENSG2", "ENSG3"], ["A", "B", "C"])


def test_token_lookup_maps_index_plus_one():
    tokens, dropped = _vocab().token_lookup(["ENSG3", "ENSG1", "ENSG2"], unknown="error")
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [3, 1, 2]
    assert dropped == 0


def test_unknown_error_names_gene_and_fix():
    with pytest.raises(ValueError, match="ENSG_NEW") as err:
        _vocab().token_lookup(["ENSG1", "ENSG_NEW"], unknown="error")
    assert "unknown='drop'" in str(err.value)


def test_unknown_drop_returns_zero_token_and_count():
    tokens, dropped = _vocab().token_lookup(["X1", "ENSG2", "X2"], unknown="drop")
    assert tokens.tolist() == [0, 2, 0]
    assert dropped == 2


def test_duplicate_and_missing_ids_rejected():
    with pytest.raises(ValueError, match="duplicate.*ENSG1"):
        GeneVocab(["ENSG1", "ENSG1", "ENSG2"], ["A", "A", "B"])
    with pytest.raises(ValueError, match="empty or missing"):
        GeneVocab(["ENSG1", ""], ["A", "B"])
    with pytest.raises(ValueError, match="empty or missing"):
        GeneVocab(["ENSG1", None], ["A", "B"])


def test_save_load_round_trip_and_fingerprint(tmp_path):
    v = _vocab()
    v.save(tmp_path / "genes.tsv")
    header = (tmp_path / "genes.tsv").read_text().splitlines()[0]
    assert header == "token\tfeature_id\tfeature_name"
    w = GeneVocab.load(tmp_path / "genes.tsv")
    assert w.feature_ids == v.feature_ids and w.feature_names == v.feature_names
    assert w.fingerprint() == v.fingerprint() and len(w) == 3
    assert GeneVocab(["ENSG2", "ENSG1"], ["B", "A"]).fingerprint() != v.fingerprint()


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        GeneVocab.load(tmp_path / "nope.tsv")
    (tmp_path / "bad.tsv").write_text("gene\n1\tA\n")
    with pytest.raises(ValueError, match="corrupt"):
        GeneVocab.load(tmp_path / "bad.tsv")


def test_labels_round_trip_and_encode(tmp_path):
    labels = {"cell_type": ["B", "NK", "T"], "dataset_id": ["d0", "d1"]}
    save_labels(tmp_path / "labels.json", labels)
    assert load_labels(tmp_path / "labels.json") == labels
    codes = encode_labels(["T", "B", "T", "NK"], labels["cell_type"])
    assert codes.dtype == np.int32 and codes.tolist() == [2, 0, 2, 1]
    with pytest.raises(ValueError, match="Mono"):
        encode_labels(["T", "Mono"], labels["cell_type"])


# Gene ids as users write them: letters, digits, dots, dashes (no tabs, no leading '#').
GENE_IDS = st.lists(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_", min_size=1, max_size=12).filter(
        lambda x: x.lower() not in LIST_HEADERS
    ),
    min_size=1,
    max_size=30,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(
    ids=GENE_IDS,
    named=st.booleans(),
    header=st.sampled_from(["", "feature_id\n", "gene_id\tgene_name\n", "# genes\n"]),
    newline=st.sampled_from(["\n", "\r\n"]),
    blank=st.booleans(),
)
def test_plain_gene_list_reads_as_the_same_vocabulary(ids, named, header, newline, blank):
    names = [f"sym_{x}" for x in ids] if named else list(ids)
    rows = [f"{x}\t{n}" if named else x for x, n in zip(ids, names, strict=True)]
    text = header + newline.join(rows) + newline + (newline if blank else "")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "genes.txt"
        path.write_bytes(text.encode("utf-8"))
        vocab = GeneVocab.read(path)
    assert vocab == GeneVocab(ids, names)
    assert vocab.fingerprint() == GeneVocab(ids, ["x"] * len(ids)).fingerprint()  # ids only


def test_read_takes_genes_tsv_and_numbered_rows(tmp_path):
    v = _vocab()
    v.save(tmp_path / "genes.tsv")
    assert GeneVocab.read(tmp_path / "genes.tsv") == v
    assert (tmp_path / "genes.tsv").read_text() == v.tsv_text()
    body = "".join(v.tsv_text().splitlines(keepends=True)[1:])  # without the header
    (tmp_path / "numbered.tsv").write_text(body)
    assert GeneVocab.read(tmp_path / "numbered.tsv") == v


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt not found.*one gene id per line"):
        GeneVocab.read(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt holds no gene ids"):
        GeneVocab.read(tmp_path / "empty.txt")
    (tmp_path / "dup.txt").write_text("ENSG1\nENSG2\nENSG1\n")
    with pytest.raises(ValueError, match="dup.txt.*duplicate.*ENSG1"):
        GeneVocab.read(tmp_path / "dup.txt")
    (tmp_path / "bad.tsv").write_text("token\tfeature_id\tfeature_name\n1\tA\n")
    with pytest.raises(ValueError, match="corrupt"):  # our header, broken rows: not a plain list
        GeneVocab.read(tmp_path / "bad.tsv")
