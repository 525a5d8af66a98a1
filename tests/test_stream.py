"""CellStream on real training copies and a Census-layout experiment (small, CPU, no timing)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasldm.data.config import DataConfig
from atlasldm.data.split import hash_int_keys, hash_strings, val_mask
from atlasldm.data.stream import CellStream
from atlasldm.data.synthetic import SyntheticSpec, var_frame, write_synthetic_experiment
from atlasldm.data.vocab import GeneVocab

C, K, B = 32, 3, 24  # awkward on 3,000 cells: 93 full chunks + 24 rows, K*C/B = 4 per round


def make(copy: Path, W: int = 1, r: int = 0, split: str = "all", **kw) -> CellStream:
    base = dict(
        source=str(copy),
        micro_batch=B,
        chunk_cells=C,
        chunks_per_rank_round=K,
        reader_threads=0,
        condition_columns=["cell_type", "dataset_id"],
    )
    base.update(kw)
    return CellStream(DataConfig(**base), split=split, rank=r, world_size=W)


def ids(batches) -> np.ndarray:
    return np.concatenate([b.soma_joinid.numpy() for b in batches])


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("soma_joinid", "gene_ids", "counts", "cu_seqlens", "library_size"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.fixture(scope="module")
def copy_x(small_synthetic_copy: Path) -> sp.csr_matrix:
    """The copy's whole X as scipy CSR (reference reader)."""
    with tiledbsoma.Experiment.open(str(small_synthetic_copy / "experiment")) as exp:
        tbl = exp.ms["RNA"].X["raw"].read().tables().concat()
        n, g = exp.ms["RNA"].X["raw"].shape
    rows, cols = tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy()
    return sp.csr_matrix((tbl["soma_data"].to_numpy(), (rows, cols)), shape=(n, g))


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_exactly_once_disjoint_equal_counts(small_synthetic_copy, W, threads):
    per_rank = [list(make(small_synthetic_copy, W, r, reader_threads=threads)) for r in range(W)]
    assert len({len(x) for x in per_rank}) == 1
    assert len(per_rank[0]) == len(make(small_synthetic_copy, W, 0))
    union = np.concatenate([ids(x) for x in per_rank])
    assert len(union) == 3000 and np.array_equal(np.sort(union), np.arange(3000))


def test_batch_content_matches_copy(small_synthetic_copy, copy_x):
    side = small_synthetic_copy / "side"
    library = np.load(side / "library_size.npy")
    codes = np.stack([np.load(side / f"codes_{c}.npy") for c in ("cell_type", "dataset_id")], 1)
    for batch in list(make(small_synthetic_copy, 2, 1))[:6]:
        rows = batch.soma_joinid.numpy()
        ref = copy_x[rows]
        np.testing.assert_array_equal(batch.cu_seqlens.numpy(), ref.indptr)
        np.testing.assert_array_equal(batch.gene_ids.numpy(), ref.indices + 1)
        np.testing.assert_array_equal(batch.counts.numpy(), ref.data)
        np.testing.assert_array_equal(batch.library_size.numpy(), library[rows])
        np.testing.assert_array_equal(batch.conditions.numpy(), codes[rows])
        assert batch.condition_names == ("cell_type", "dataset_id")


def test_orders_differ_by_epoch_and_seed(small_synthetic_copy):
    s = make(small_synthetic_copy, 2, 0)
    epoch0, epoch1 = ids(list(s)), ids(list(s))  # iteration advances the epoch
    again = ids(list(make(small_synthetic_copy, 2, 0)))
    other = ids(list(make(small_synthetic_copy, 2, 0, seed=1)))
    assert np.array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, other)
    assert len(np.intersect1d(epoch0, epoch1)) < 0.75 * len(epoch0)


def test_every_rank_sees_all_datasets_every_epoch(small_synthetic_copy):
    for r in range(2):
        s = make(small_synthetic_copy, 2, r)
        for epoch in range(2):
            s.set_epoch(epoch)
            datasets = np.unique(np.concatenate([b.conditions[:, 1].numpy() for b in s]))
            assert len(datasets) == 5


def run_epochs(s: CellStream, until_epoch: int):
    """Return (batches, state after each batch) until the end of `until_epoch`."""
    batches, states = [], []
    while s.state_dict()["epoch"] <= until_epoch:
        for batch in s:
            batches.append(batch)
            states.append(s.state_dict())
    return batches, states


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_is_exact_at_any_position(small_synthetic_copy, rank):
    full, states = run_epochs(make(small_synthetic_copy, 2, rank, reader_threads=2), 1)
    per_epoch = len(full) // 2
    # start, mid-round, round boundary, last batch, epoch boundary, mid next epoch
    for pos in [0, 5, 8, per_epoch - 2, per_epoch - 1, per_epoch + 3]:
        resumed = make(small_synthetic_copy, 2, rank, reader_threads=0)
        resumed.load_state_dict(states[pos])
        rest, _ = run_epochs(resumed, 1)
        same_batches(rest, full[pos + 1 :])


def test_state_is_rank_identical(small_synthetic_copy):
    streams = [make(small_synthetic_copy, 3, r) for r in range(3)]
    iters = [iter(s) for s in streams]
    for _ in range(6):
        [next(it) for it in iters]
    states = [s.state_dict() for s in streams]
    assert states[0] == states[1] == states[2]
    assert states[0]["batch_in_epoch"] == 6 and states[0]["round"] == 1


@pytest.mark.parametrize(("old_w", "new_w", "stop"), [(2, 3, 7), (3, 2, 10), (2, 3, 60)])
def test_elastic_resume_loses_no_cell(small_synthetic_copy, old_w, new_w, stop):
    old = [make(small_synthetic_copy, old_w, r) for r in range(old_w)]
    consumed = []
    for s in old:
        it = iter(s)
        consumed += [next(it) for _ in range(stop)]
    state = old[0].state_dict()
    new = [make(small_synthetic_copy, new_w, r) for r in range(new_w)]
    rest = []
    for s in new:
        s.load_state_dict(state)
        rest.append(list(s))
    assert len({len(x) for x in rest}) == 1
    seen = np.concatenate([ids(consumed), *[ids(x) for x in rest]])
    assert np.array_equal(np.unique(seen), np.arange(3000)), "a cell of the epoch was lost"
    replayed = new[0].metrics()["replayed_cells"]
    assert replayed == len(seen) - 3000 and replayed <= old_w * K * C


def test_max_genes_keeps_library_and_is_deterministic(small_synthetic_copy):
    nnz = np.load(small_synthetic_copy / "side" / "nnz.npy")
    library = np.load(small_synthetic_copy / "side" / "library_size.npy")
    cap = int(np.median(nnz))
    s = make(small_synthetic_copy, 1, 0, max_genes=cap)
    kept = []
    for _ in range(2):
        genes = {}
        for b in s:
            cu = b.cu_seqlens.numpy()
            assert np.diff(cu).max() <= cap
            np.testing.assert_array_equal(b.library_size.numpy(), library[b.soma_joinid.numpy()])
            for i, j in enumerate(b.soma_joinid.tolist()):
                genes[j] = tuple(b.gene_ids[cu[i] : cu[i + 1]].tolist())
        kept.append(genes)
    assert kept[0] == kept[1]
    assert s.metrics()["truncated_cells"] == 2 * int((nnz > cap).sum()) > 0
    other_rank = {}
    for b in make(small_synthetic_copy, 2, 1, max_genes=cap):
        cu = b.cu_seqlens.numpy()
        for i, j in enumerate(b.soma_joinid.tolist()):
            other_rank[j] = tuple(b.gene_ids[cu[i] : cu[i + 1]].tolist())
    assert all(kept[0][j] == g for j, g in other_rank.items())


def test_min_genes_filters_once(small_synthetic_copy):
    nnz = np.load(small_synthetic_copy / "side" / "nnz.npy")
    threshold = int(np.percentile(nnz, 30))
    per_rank = [list(make(small_synthetic_copy, 2, r, min_genes=threshold)) for r in range(2)]
    union = np.concatenate([ids(x) for x in per_rank])
    assert np.array_equal(np.sort(union), np.flatnonzero(nnz >= threshold))


def test_split_disjoint_stable_across_world_sizes(small_synthetic_copy):
    source = np.load(small_synthetic_copy / "side" / "source_joinid.npy")
    expected_val = np.flatnonzero(val_mask(hash_int_keys(source), 0, 0.2))
    val_w1 = np.sort(ids(list(make(small_synthetic_copy, 1, 0, "val", val_fraction=0.2))))
    val_w2 = np.sort(
        np.concatenate(
            [ids(list(make(small_synthetic_copy, 2, r, "val", val_fraction=0.2))) for r in range(2)]
        )
    )
    train = ids(list(make(small_synthetic_copy, 1, 0, "train", val_fraction=0.2)))
    assert np.array_equal(val_w1, expected_val) and np.array_equal(val_w2, expected_val)
    assert len(np.intersect1d(train, val_w1)) == 0 and len(train) + len(val_w1) == 3000
    assert abs(len(val_w1) / 3000 - 0.2) < 0.03


def test_iter_eval_covers_once(small_synthetic_copy):
    per_rank = [list(make(small_synthetic_copy, 3, r).iter_eval()) for r in range(3)]
    assert len({len(x) for x in per_rank}) == 1
    assert np.array_equal(np.concatenate([ids(x) for x in per_rank]), np.arange(3000))


def test_rank_from_environment(small_synthetic_copy, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("RANK", raising=False)
    cfg = DataConfig(
        source=str(small_synthetic_copy), chunk_cells=C, chunks_per_rank_round=K, micro_batch=B
    )
    with pytest.raises(RuntimeError, match="RANK is not set"):
        CellStream(cfg)
    monkeypatch.setenv("RANK", "0")
    s = CellStream(cfg)
    assert (s.rank, s.world_size) == (0, 2)  # RANK wins, LOCAL_RANK=1 is ignored


def test_refuses_incomplete_copy_and_foreign_state(small_synthetic_copy, tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        make(tmp_path)
    state = make(small_synthetic_copy, 1, 0, min_genes=5).state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        make(small_synthetic_copy).load_state_dict(state)
    other = dict(make(small_synthetic_copy).state_dict(), fingerprint="0" * 64)
    with pytest.raises(ValueError, match="other data"):
        make(small_synthetic_copy).load_state_dict(other)


def test_dataloader_passthrough(small_synthetic_copy):
    direct = list(make(small_synthetic_copy, 2, 0))
    loader = torch.utils.data.DataLoader(make(small_synthetic_copy, 2, 0), batch_size=None)
    same_batches(list(loader), direct)
    workers = torch.utils.data.DataLoader(
        make(small_synthetic_copy), batch_size=None, num_workers=1
    )
    with pytest.raises(RuntimeError, match="num_workers=0"):
        list(workers)


# --- direct mode on a Census-layout experiment -------------------------------------------


@pytest.fixture(scope="module")
def census_like(tmp_path_factory) -> tuple[str, Path, sp.csr_matrix]:
    """(experiment URI, genes.tsv covering 50 of its 60 genes + 5 foreign ones, X as CSR)."""
    root = tmp_path_factory.mktemp("direct")
    spec = SyntheticSpec(cells=1500, genes=60, datasets=3, seed=1)
    uri = write_synthetic_experiment(root / "exp", spec)
    var = var_frame(spec)
    feature_ids = [*var["feature_id"][:50][::-1], *[f"ENSGFAKE{i}" for i in range(5)]]
    vocab_path = root / "genes.tsv"
    GeneVocab(feature_ids, [f"g{i}" for i in range(55)]).save(vocab_path)
    with tiledbsoma.Experiment.open(uri) as exp:
        tbl = exp.ms["RNA"].X["raw"].read().tables().concat()
    x = sp.csr_matrix(
        (tbl["soma_data"].to_numpy(), (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy())),
        shape=(1500, 60),
    )
    return uri, vocab_path, x


def _direct_base(census_like) -> dict:
    uri, vocab_path, _ = census_like
    return dict(
        source=uri,
        mode="direct",
        vocab_path=str(vocab_path),
        micro_batch=32,
        chunks_per_rank_round=2,
        reader_threads=2,
        condition_columns=["dataset_id"],
    )


def make_direct(census_like, W=1, r=0, **kw) -> CellStream:
    return CellStream(DataConfig(**{**_direct_base(census_like), **kw}), rank=r, world_size=W)


def test_direct_unknown_genes_error_names_gene(census_like):
    with pytest.raises(ValueError, match="ENSG00000000050.*unknown_genes=drop"):
        make_direct(census_like)


@pytest.mark.parametrize("chunk", [64, 256])  # one point query per job; one slice per chunk
def test_direct_drop_counts_and_keeps_library(census_like, chunk):
    _, _, x = census_like
    with tiledbsoma.Experiment.open(census_like[0]) as exp:
        primary = exp.obs.read(value_filter="is_primary_data == True", column_names=["soma_joinid"])
        primary = np.sort(primary.concat()["soma_joinid"].to_numpy())
    primary = primary[np.diff(x.indptr)[primary] >= 1]  # min_genes=1 via obs nnz
    kw = dict(unknown_genes="drop", obs_filter="is_primary_data == True", chunk_cells=chunk)
    per_rank = [list(make_direct(census_like, 2, r, **kw)) for r in range(2)]
    assert len({len(p) for p in per_rank}) == 1
    assert np.array_equal(np.sort(np.concatenate([ids(p) for p in per_rank])), primary)
    token_of_var = np.zeros(60, dtype=np.int64)
    token_of_var[:50] = 50 - np.arange(50)  # the vocabulary lists var genes 0..49 in reverse
    for batch in per_rank[1][:5]:
        rows = batch.soma_joinid.numpy()
        ref = x[rows]
        np.testing.assert_allclose(batch.library_size.numpy(), np.asarray(ref.sum(1)).ravel())
        cu = batch.cu_seqlens.numpy()
        for i in range(len(rows)):
            cells = ref[i]
            keep = cells.indices < 50
            got = dict(
                zip(
                    batch.gene_ids[cu[i] : cu[i + 1]].tolist(),
                    batch.counts[cu[i] : cu[i + 1]].tolist(),
                    strict=True,
                )
            )
            want = dict(
                zip(
                    token_of_var[cells.indices[keep]].tolist(),
                    cells.data[keep].tolist(),
                    strict=True,
                )
            )
            assert got == want
    metrics = make_direct(census_like, 1, 0, **kw).metrics()
    assert metrics["dropped_unknown_genes"] == 10
    s = make_direct(census_like, 1, 0, **kw)
    list(s)
    assert s.metrics()["dropped_unknown_nnz"] == x[primary][:, 50:].nnz > 0


@pytest.mark.parametrize("chunk", [64, 256])
def test_direct_resume_is_exact(census_like, chunk):
    kw = dict(unknown_genes="drop", obs_filter="is_primary_data == True", chunk_cells=chunk)
    full, states = run_epochs(make_direct(census_like, 2, 1, **kw), 1)
    for pos in [0, 3, len(full) // 2 - 1, len(full) - 2]:
        resumed = make_direct(census_like, 2, 1, reader_threads=0, **kw)
        resumed.load_state_dict(states[pos])
        rest, _ = run_epochs(resumed, 1)
        same_batches(rest, full[pos + 1 :])


def test_each_epoch_after_the_first_starts_with_a_round_read_ahead(small_synthetic_copy):
    """The next epoch's first round is read during the last rounds; the batches are the same."""
    ahead = make(small_synthetic_copy, 2, 1, reader_threads=2)
    got, _ = run_epochs(ahead, 2)
    want, _ = run_epochs(make(small_synthetic_copy, 2, 1, reader_threads=0), 2)
    same_batches(got, want)
    assert ahead.metrics()["rounds_read_ahead"] == 2  # epochs 1 and 2
    ahead.close()


@pytest.mark.parametrize("move", ["set_epoch", "load_state_dict"])
def test_a_round_read_ahead_for_another_position_is_not_used(small_synthetic_copy, move):
    stream = make(small_synthetic_copy, reader_threads=2)
    reference = make(small_synthetic_copy, reader_threads=0)
    list(stream)  # epoch 0 ends; epoch 1's first round is read ahead
    if move == "set_epoch":
        stream.set_epoch(5)
        reference.set_epoch(5)
    else:
        list(reference)
        it = iter(reference)
        for _ in range(3):
            next(it)
        stream.load_state_dict(reference.state_dict())  # epoch 1, batch 3
    same_batches(list(stream), list(reference))
    assert stream.metrics()["rounds_read_ahead"] == 0
    stream.close()


def test_close_stops_reader_threads(small_synthetic_copy):
    """close() returns after the running reads: nothing keeps using the CPU behind it."""
    stream = make(small_synthetic_copy, reader_threads=2, prefetch_rounds=2)
    next(iter(stream))
    stream.close()
    names = ("soma-read", "round-prepare", "batch-gather")
    assert not [t.name for t in threading.enumerate() if t.name.startswith(names)]


# --- every shape: tails, W > N, micro_batch 1 ------------------------------------------------


def epoch_per_rank(make_rank, W: int) -> list[list]:
    per_rank = [list(make_rank(r)) for r in range(W)]
    assert len({len(x) for x in per_rank}) == 1, "ranks take different step counts"
    for batches in per_rank:
        for batch in batches:  # empty tail batches are well-formed
            assert batch.conditions.shape == (batch.num_cells, len(batch.condition_names))
            assert batch.library_size.shape == (batch.num_cells,)
    return per_rank


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    W=st.integers(1, 12),
    b=st.sampled_from([1, 3, 50]),
    val_fraction=st.sampled_from([0.002, 0.01, 0.2]),
    drop_last=st.booleans(),
)
def test_any_shape_every_rank_survives_copy(small_synthetic_copy, W, b, val_fraction, drop_last):
    """Tiny validation selections give W > N and empty batches: no crash, no lost cell."""
    kw = dict(micro_batch=b, chunk_cells=0, chunks_per_rank_round=0, val_fraction=val_fraction)
    kw["drop_last"] = drop_last
    per_rank = epoch_per_rank(lambda r: make(small_synthetic_copy, W, r, "val", **kw), W)
    seen = np.concatenate([ids(x) for x in per_rank if x] + [np.zeros(0, np.int64)])
    source = np.load(small_synthetic_copy / "side" / "source_joinid.npy")
    expected = np.flatnonzero(val_mask(hash_int_keys(source), 0, val_fraction))
    assert len(np.unique(seen)) == len(seen)
    if drop_last:
        assert len(expected) - len(seen) < W * b
    else:
        assert np.array_equal(np.sort(seen), expected)


def test_reported_empty_tail_direct_mode(tmp_path):
    """5,003 cells, C=125, K=10, b=50, W=4 crashed rank 3 on a 0-row reshape."""
    spec = SyntheticSpec(cells=5003, genes=40, datasets=4, seed=2)
    uri = write_synthetic_experiment(tmp_path / "exp", spec)
    var = var_frame(spec)
    GeneVocab(list(var["feature_id"]), list(var["feature_name"])).save(tmp_path / "genes.tsv")
    cfg = dict(
        source=uri,
        mode="direct",
        vocab_path=str(tmp_path / "genes.tsv"),
        micro_batch=50,
        chunk_cells=125,
        chunks_per_rank_round=10,
        reader_threads=1,
        condition_columns=["dataset_id"],
    )
    for b in (50, 1):
        kw = {**cfg, "micro_batch": b}
        per_rank = epoch_per_rank(lambda r, kw=kw: CellStream(DataConfig(**kw), "all", r, 4), 4)
        seen = np.concatenate([ids(x) for x in per_rank])
        selected = CellStream(DataConfig(**kw), "all", 0, 4).source.joinids  # min_genes=1
        assert len(selected) > 4800 and np.array_equal(np.sort(seen), np.sort(selected))
        if b == 1:  # an odd tail over 4 ranks leaves some rank an empty last batch
            assert min(batch.num_cells for x in per_rank for batch in x) == 0


@pytest.mark.parametrize("split_key", ["soma_joinid", "donor_id"])
def test_direct_selection_equals_whole_obs_definition(census_like, split_key):
    """The range-by-range selection keeps exactly the cells a whole-obs read would keep."""
    uri, flt = census_like[0], "is_primary_data == True"
    with tiledbsoma.Experiment.open(uri) as exp:
        obs = exp.obs.read(value_filter=flt).concat().to_pandas().sort_values("soma_joinid")
    ids, nnz = obs["soma_joinid"].to_numpy(), obs["nnz"].to_numpy()
    min_genes = int(np.median(nnz))  # drops about half
    keys = hash_int_keys(ids) if split_key == "soma_joinid" else hash_strings(obs[split_key])
    kw = dict(
        unknown_genes="drop",
        obs_filter=flt,
        min_genes=min_genes,
        val_fraction=0.3,
        split_key=split_key,
    )
    is_val = val_mask(keys, 0, 0.3)
    for split, in_split in (("train", ~is_val), ("val", is_val)):
        source = CellStream(DataConfig(**{**_direct_base(census_like), **kw}), split, 0, 1).source
        np.testing.assert_array_equal(source.ids(slice(None)), ids[(nnz >= min_genes) & in_split])
        # labels come from the whole query, before min_genes and the split
        assert source.labels["dataset_id"] == sorted(set(obs["dataset_id"]))


def test_fingerprint_does_not_depend_on_the_joinid_dtype(census_like):
    stream = make_direct(census_like, unknown_genes="drop")
    assert stream.source.joinids.dtype == np.uint32  # compact: 4 B per selected cell
    compact = stream._fingerprint()
    stream.source.joinids = stream.source.joinids.astype(np.int64)
    assert stream._fingerprint() == compact


def _reader_loops(stats) -> int:
    """Sum of TileDB's Reader loop counters in tiledbsoma_stats_as_py() output."""
    if isinstance(stats, dict):
        return sum(
            v if k.endswith("Reader.loop_num") and isinstance(v, int) else _reader_loops(v)
            for k, v in stats.items()
        )
    return sum(_reader_loops(x) for x in stats) if isinstance(stats, list) else 0


def test_tiledb_statistics_are_cleared_every_round_unless_kept(census_like):
    """TileDB keeps per-query statistics that grew a rank's memory with every batch."""
    loops = {}
    tiledbsoma.tiledbsoma_stats_enable()  # makes what the stream clears visible
    try:
        for keep in (True, False):
            tiledbsoma.tiledbsoma_stats_reset()
            stream = make_direct(
                census_like, unknown_genes="drop", chunk_cells=64, keep_tiledb_stats=keep
            )
            assert len(list(stream)) > 8  # many rounds
            loops[keep] = _reader_loops(tiledbsoma.tiledbsoma_stats_as_py())
    finally:
        tiledbsoma.tiledbsoma_stats_reset()
        tiledbsoma.tiledbsoma_stats_disable()
    assert loops[True] > 4 * max(loops[False], 1)
