"""The Python API: `atlasldm.load_pretrained`, `CellGenerator.generate` (the command's output,
through the same code) and `.encode` (in batches of bounded size)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_generate import EULER_4, D, G, M, write_classifier, write_dit, write_vae

import atlasldm
from atlasldm.generation import cli
from atlasldm.generation.api import CellGenerator, load_pretrained
from atlasldm.generation.encode import encode_cells, row_blocks
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.models.pretrained import ExportError

SAMPLER = {"sampler": "euler", "steps": 4}  # EULER_4 as API options


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A run tree as training leaves it: runs/vae/export, runs/dit/export, runs/clf/export."""
    root = tmp_path_factory.mktemp("runs")
    vae = write_vae(root / "vae" / "export")
    dit = write_dit(root / "dit" / "export", vae)
    return {"root": root, "vae": vae, "dit": dit, "clf": write_classifier(root / "clf", vae)}


def _same_anndata(a: ad.AnnData, b: ad.AnnData) -> None:
    assert (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert a.layers.keys() == b.layers.keys() and a.obsm.keys() == b.obsm.keys()
    for key in a.layers:
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    np.testing.assert_array_equal(a.obsm["latent"], b.obsm["latent"])
    assert a.uns.keys() == b.uns.keys()


def test_generate_equals_the_command_at_the_same_seed(runs, tmp_path) -> None:
    gen = atlasldm.load_pretrained(runs["dit"])  # the VAE from the export's own reference
    assert gen.exports.vae_folder == runs["vae"]
    adata = gen.generate({"cell_type": ["B", "T"]}, n_cells=5, cfg_weight=2.0, seed=3, **SAMPLER)
    args = ["--denoiser", str(runs["dit"]), "--condition", "cell_type=B"]
    args += ["--condition", "cell_type=T", "--n-cells", "5", "--cfg-weight", "cell_type=2"]
    args += ["--seeds", "3", *EULER_4, "--out", str(tmp_path / "cli.h5ad")]
    from_cli = ad.read_h5ad(cli.run(args))
    _same_anndata(adata, from_cli)  # same format: what the command writes, read back
    assert list(adata.obs["cell_type"]) == ["B"] * 5 + ["T"] * 5
    other = gen.generate({"cell_type": ["B", "T"]}, n_cells=5, cfg_weight=2.0, seed=4, **SAMPLER)
    assert not np.array_equal(other.obsm["latent"], adata.obsm["latent"])


def test_request_forms_mean_the_same(runs) -> None:
    gen = load_pretrained(runs["dit"], vae=runs["vae"])
    a = gen.generate({"cell_type": "*"}, n_cells=2, cfg_weight={"cell_type": 1.5}, **SAMPLER)
    b = gen.generate(["cell_type=*"], n_cells=2, cfg_weight=1.5, seed=[0], **SAMPLER)
    assert (a.X != b.X).nnz == 0 and list(a.obs["cell_type"]) == list(b.obs["cell_type"])
    assert set(a.obs["cell_type"]) == set(gen.conditions["cell_type"])


def test_match_and_interpolation_take_anndata_or_paths(runs, tmp_path) -> None:
    gen = load_pretrained(runs["dit"])
    ref = ad.AnnData(
        X=sp.csr_matrix(np.full((4, G), 2.0, dtype=np.float32)),
        obs=pd.DataFrame({"cell_type": ["B", "B", "T", "Mono"]}, index=list("abcd")),
        var=pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(G)]),
    )
    ref.write_h5ad(tmp_path / "ref.h5ad")
    in_memory = gen.generate(match=ref, seed=[0, 1], **SAMPLER)
    from_path = gen.generate(match=str(tmp_path / "ref.h5ad"), seed=[0, 1], **SAMPLER)
    assert (in_memory.X != from_path.X).nnz == 0 and in_memory.n_obs == 8
    traj = gen.generate(interpolate="cell_type=B:T", interp_steps=3, n_cells=2, **SAMPLER)
    assert sorted(set(traj.obs["interp_alpha"])) == [0.0, 0.5, 1.0]


def test_the_vae_alone_samples_its_prior(runs) -> None:
    gen = load_pretrained(runs["vae"])
    assert gen.exports.denoiser is None and "VAE prior" in repr(gen)
    adata = gen.generate(n_cells=64, seed=0)
    assert adata.n_obs == 64 and abs(float(adata.obsm["latent"].std()) - 1.0) < 0.2


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda g: g.generate({"cell_type": "Neuron"}), ConditionError, "unknown value 'Neuron'"),
        (lambda g: g.generate(n_cells=0), ConditionError, "--n-cells must be >= 1"),
        (lambda g: g.generate(seed=[]), ConditionError, "at least one seed"),
        (lambda g: g.generate(n_cell=5), TypeError, r"unknown options \['n_cell'\]"),
        (lambda g: g.generate(classifier_scale=2.0), ConditionError, "no network"),
        (lambda g: g.generate(match="nope.h5ad"), ConditionError, "--match nope.h5ad does not"),
    ],
)
def test_bad_requests_raise_before_any_work(runs, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(load_pretrained(runs["dit"]))


def test_a_classifier_export_is_no_generator(runs) -> None:
    with pytest.raises(ExportError, match="pass it as classifiers="):
        load_pretrained(runs["clf"])
    gen = load_pretrained(runs["dit"], classifiers=[runs["clf"]])
    assert set(gen.exports.classifiers) == {"cell_type"}


def test_a_moved_run_tree_loads_and_a_replaced_vae_is_refused(runs, tmp_path) -> None:
    moved = tmp_path / "copy"
    shutil.copytree(runs["root"], moved)
    gen = load_pretrained(moved / "dit" / "export")
    assert gen.exports.vae_folder == moved / "vae" / "export"
    write_vae(moved / "vae" / "export", seed=9)  # re-exported VAE: another digest
    with pytest.raises(ExportError) as caught:
        load_pretrained(moved / "dit" / "export")
    text = str(caught.value)
    assert str(moved / "dit" / "export") in text and str(moved / "vae" / "export") in text


def _counts(n: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(rng.poisson(1.5, (n, G)).astype(np.float32))
    return ad.AnnData(X=X, var=pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(G)]))


def test_encode_runs_in_bounded_batches_and_equals_one_shot(runs, tmp_path, monkeypatch):
    gen = load_pretrained(runs["vae"])
    adata = _counts(2_500)
    one_shot = encode_cells(gen.exports.vae, adata, gen.exports.genes, gen.device, adata.n_obs)
    sizes = []
    real_encode = gen.exports.vae.encode

    def counting(batch):
        sizes.append(batch.num_cells)
        return real_encode(batch)

    monkeypatch.setattr(gen.exports.vae, "encode", counting)
    z = gen.encode(adata, batch_size=1_000)
    assert sizes == [1_000, 1_000, 500]  # three calls, none larger than a batch
    assert z.shape == (2_500, M, D) and z.dtype == np.float32
    # Each cell is encoded on its own; a batch changes only float summation order.
    np.testing.assert_allclose(z, one_shot.numpy(), rtol=0, atol=1e-5)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")  # X stays on disk
    sizes.clear()
    np.testing.assert_array_equal(gen.encode(backed, batch_size=1_000), z)
    assert sizes == [1_000, 1_000, 500]


def test_encode_reads_a_layer_and_refuses_unknown_genes(runs) -> None:
    gen = load_pretrained(runs["vae"])
    adata = _counts(10)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)  # X normalised away
    np.testing.assert_array_equal(gen.encode(adata, layer="counts"), gen.encode(_counts(10)))
    stranger = ad.AnnData(X=sp.csr_matrix((3, 2), dtype=np.float32))
    stranger.var_names = ["XYZ1", "XYZ2"]
    with pytest.raises(ConditionError, match="not in the VAE vocabulary"):
        gen.encode(stranger)


@given(n=st.integers(0, 5_000), batch=st.integers(1, 2_000))
def test_row_blocks_cover_every_row_once_in_bounded_blocks(n: int, batch: int) -> None:
    blocks = row_blocks(n, batch)
    covered = [i for lo, hi in blocks for i in range(lo, hi)]
    assert covered == list(range(n))
    assert all(0 < hi - lo <= batch for lo, hi in blocks)
    assert len(blocks) == -(-n // batch)


def test_import_atlasldm_is_light_and_load_pretrained_lazy() -> None:
    code = (
        "import sys, atlasldm; heavy = {'torch', 'anndata'} & set(sys.modules); "
        "f = atlasldm.load_pretrained; print(sorted(heavy), f.__module__, "
        "'load_pretrained' in dir(atlasldm))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "atlasldm.generation.api", "True"]
    with pytest.raises(AttributeError, match="no attribute 'load_pretrainedd'"):
        atlasldm.load_pretrainedd  # noqa: B018


def test_cell_generator_moves_every_network_to_its_device(runs) -> None:
    gen = CellGenerator(load_pretrained(runs["dit"]).exports, "cpu")
    nets = [gen.exports.vae, gen.exports.denoiser.net]
    assert all(p.device == torch.device("cpu") for n in nets for p in n.parameters())
    assert json.loads(json.dumps(gen.conditions)) == {"cell_type": ["B", "Mono", "T"]}
