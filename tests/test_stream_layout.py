"""The derived chunk length (data/stream_layout.py): a single rank keeps longer chunks than a
rank of many, and a state written under the earlier rule (256 chunks per epoch at W = 1 too)
still resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasldm.data import stream_layout
from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.data.synthetic import SyntheticSpec, var_frame, write_synthetic_experiment
from atlasldm.data.vocab import GeneVocab


def direct(**kw) -> DataConfig:
    return DataConfig(source="x", mode="direct", vocab_path="genes.tsv", **kw)


@pytest.mark.parametrize(
    ("cells", "world", "expected"),
    [
        (100_000, 1, 512),  # 195 chunks >= 128: the default C
        (100_000, 2, 128),  # 390 chunks per rank >= 256
        (500_000, 1, 512),
        (5_003, 1, 32),  # 156 chunks
        (5_003, 4, 4),  # 312 chunks per rank
    ],
)
def test_single_rank_needs_fewer_chunks(cells, world, expected) -> None:
    C = stream_layout.auto_chunk_cells(direct(), cells, world)
    assert expected == C
    least = stream_layout.MIN_SINGLE_RANK_CHUNKS if world == 1 else stream_layout.MIN_RANK_CHUNKS
    assert cells // C // world >= least and (C == 512 or cells // (2 * C) // world < least)


def test_set_or_copy_chunk_lengths_do_not_adapt() -> None:
    assert stream_layout.auto_chunk_cells(direct(chunk_cells=1024), 1000, 1) == 1024
    assert stream_layout.auto_chunk_cells(DataConfig(source="x"), 1000, 1) == 256


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("layout")
    spec = SyntheticSpec(cells=1500, genes=40, datasets=3, seed=2)
    uri = write_synthetic_experiment(root / "exp", spec)
    vocab = root / "genes.tsv"
    GeneVocab(list(var_frame(spec)["feature_id"]), [f"g{i}" for i in range(40)]).save(vocab)
    return uri, str(vocab)


def make(experiment) -> CellStream:
    uri, vocab = experiment
    cfg = DataConfig(
        source=uri,
        mode="direct",
        vocab_path=vocab,
        micro_batch=32,
        reader_threads=0,
        condition_columns=["dataset_id"],
    )
    return CellStream(cfg, split="all", rank=0, world_size=1)


def test_a_state_of_the_earlier_rule_resumes_exactly(experiment, monkeypatch) -> None:
    with monkeypatch.context() as m:  # the rule before: 256 chunks per epoch at W = 1 too
        m.setattr(stream_layout, "MIN_SINGLE_RANK_CHUNKS", stream_layout.MIN_RANK_CHUNKS)
        old = make(experiment)
        batches, states = [], []
        for batch in old:
            batches.append(batch)
            states.append(old.state_dict())
    assert states[0]["C"] == 4  # 1500 // 4 = 375 chunks
    selected = np.sort(np.concatenate([b.soma_joinid.numpy() for b in batches]))
    assert make(experiment).sampler.chunk_cells == 8  # now: 187 chunks >= 128
    for pos in (0, len(batches) // 2, len(batches) - 2):
        resumed = make(experiment)
        resumed.load_state_dict(states[pos])
        rest = list(resumed)
        assert len(rest) == len(batches) - pos - 1
        for x, y in zip(rest, batches[pos + 1 :], strict=True):
            for name in ("soma_joinid", "gene_ids", "counts", "cu_seqlens"):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
        # the next epoch uses the new C and still emits every cell once
        assert resumed.sampler.chunk_cells == 8
        ids = np.concatenate([b.soma_joinid.numpy() for b in resumed])
        assert np.array_equal(np.sort(ids), selected)
