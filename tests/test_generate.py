"""Generation from exports: plans, guidance checks, reproducibility, writers and clear errors.

The exports are small random-weight models written with the real export writer and the side
files the training stages write, so no check needs a trained model.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasldm.generation import api, cli
from atlasldm.generation.vocabulary import ConditionError
from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.pretrained import ExportError, export_digest
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.export import write_export

REPO = Path(__file__).resolve().parent.parent
G, M, D = 30, 4, 8
CELL_TYPES = ["B", "Mono", "T"]
DONORS = ["d1", "d2"]
EULER_4 = ["--sampler", "euler", "--steps", "4"]  # a few fixed steps: cheap and deterministic
LIBSIZE = {"all": {"mean": 6.0, "std": 0.3, "n": 600}}
LIBSIZE["cell_type"] = {
    c: {"mean": 5.0 + i, "std": 0.1, "n": 200} for i, c in enumerate(CELL_TYPES)
}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-zero weights everywhere (zero-initialised output layers would hide bugs)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _genes_tsv() -> str:
    rows = [f"{i + 1}\tENSG{i:05d}\tGENE{i}" for i in range(G)]
    return "token\tfeature_id\tfeature_name\n" + "\n".join(rows) + "\n"


def write_vae(folder: Path, seed: int = 0) -> Path:
    cfg = VAEConfig(
        num_genes=G,
        embed_dim=16,
        num_layers=1,
        num_heads=2,
        num_cross_heads=2,
        num_latent_tokens=M,
        latent_dim=D,
    )
    extra = {
        "genes.tsv": _genes_tsv(),
        "labels.json": json.dumps({"cell_type": CELL_TYPES, "donor_id": DONORS}),
        "libsize.json": json.dumps({"log_library_size": LIBSIZE}),
        "provenance.json": json.dumps({"stage": "vae"}),
    }
    write_export(folder, _perturbed(VAE(cfg), seed).state_dict(), asdict(cfg), extra)
    return folder


def write_dit(folder: Path, vae: Path, columns=("cell_type",), scheme="independent") -> Path:
    vocab = {"cell_type": CELL_TYPES, "donor_id": DONORS}
    sizes = [len(vocab[c]) for c in columns]
    cfg = DiTConfig(
        num_latent_tokens=M,
        latent_dim=D,
        embed_dim=32,
        num_layers=2,
        num_heads=2,
        vocab_sizes=sizes,
        cfg_dropout_scheme=scheme,
    )
    conditions = {
        "columns": list(columns),
        "vocabularies": {c: vocab[c] for c in columns},
        "null_indices": {c: len(vocab[c]) for c in columns},
        "dropout": {"scheme": scheme, "prob": 0.2},
    }
    extra = {
        "conditions.json": json.dumps(conditions),
        "latent_stats.json": json.dumps({"mean": 0.1, "std": 0.9, "cells": 10}),
        "genes.tsv": (vae / "genes.tsv").read_text(),
        # As the DiT stage records it (train.frozen_vae): the VAE path as given, and its digest.
        "provenance.json": json.dumps(
            {"stage": "dit", "vae_export": str(vae), "vae_export_digest": export_digest(vae)}
        ),
    }
    model_cfg = {"denoiser": "dit", **asdict(cfg)}
    write_export(folder, _perturbed(DiT(cfg), 1).state_dict(), model_cfg, extra)
    return folder


def write_classifier(folder: Path, vae: Path, stats=None) -> Path:
    cfg = ClassifierConfig(
        num_latent_tokens=M,
        latent_dim=D,
        num_classes=len(CELL_TYPES),
        hidden_dims=[32, 16],
        time_freq_dim=16,
    )
    extra = {
        "conditions.json": json.dumps({"attribute": "cell_type", "values": CELL_TYPES}),
        "latent_stats.json": json.dumps(stats or {"mean": 0.1, "std": 0.9, "cells": 10}),
        "provenance.json": json.dumps(
            {"stage": "classifier", "vae_export_digest": export_digest(vae)}
        ),
    }
    net = _perturbed(NoisyLatentClassifier(cfg), 2)
    write_export(folder, net.state_dict(), asdict(cfg), extra)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    vae = write_vae(root / "vae")
    return {
        "vae": vae,
        "dit": write_dit(root / "dit", vae),
        "classifier": write_classifier(root / "clf", vae),
        "other_vae": write_vae(root / "other_vae", seed=5),
    }


def _reference(n_per_type=(7, 5, 3)) -> ad.AnnData:
    rng = np.random.default_rng(0)
    labels = np.repeat(CELL_TYPES, n_per_type)
    X = sp.csr_matrix(rng.poisson(3.0, (len(labels), G)).astype(np.float32))
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(G)])
    return ad.AnnData(X=X, obs=obs, var=var)


def settings(adata: ad.AnnData) -> dict:
    """uns["generation"]: a dict (a JSON string in outputs of earlier versions)."""
    value = adata.uns["generation"]
    return json.loads(value) if isinstance(value, str) else dict(value)


def _gen(exports, tmp_path, *extra, name="out.h5ad", dit=True) -> ad.AnnData:
    args = ["--vae", str(exports["vae"]), "--out", str(tmp_path / name), *EULER_4, *extra]
    if dit:
        args += ["--denoiser", str(exports["dit"])]
    return ad.read_h5ad(cli.run(args))


def test_match_reproduces_conditions_and_library_sizes(exports, tmp_path) -> None:
    ref = _reference()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    out = _gen(exports, tmp_path, "--match", str(tmp_path / "ref.h5ad"), "--seeds", "0", "1")
    assert out.n_obs == 2 * ref.n_obs
    for s in (0, 1):
        part = out[out.obs["seed"] == s]
        assert list(part.obs["cell_type"].astype(str)) == list(ref.obs["cell_type"])
        np.testing.assert_array_equal(part.obs["library_size"], np.asarray(ref.X.sum(1)).ravel())
    assert np.array_equal(out.X.data, np.round(out.X.data)) and out.X.data.min() > 0
    assert list(out.var_names) == list(ref.var_names)
    assert out.obsm["latent"].shape == (out.n_obs, M * D)
    assert out.layers["means"].shape == out.shape
    # μ = softmax · ℓ: the means of a cell sum to its library size.
    np.testing.assert_allclose(out.layers["means"].sum(1), out.obs["library_size"], rtol=1e-4)


def test_same_seed_same_cells_other_seed_other_cells(exports, tmp_path) -> None:
    args = ("--condition", "cell_type=T", "--n-cells", "6")
    a = _gen(exports, tmp_path, *args, name="a.h5ad")
    b = _gen(exports, tmp_path, *args, name="b.h5ad")
    c = _gen(exports, tmp_path, *args, "--seeds", "1", name="c.h5ad")
    assert (a.X != b.X).nnz == 0 and np.array_equal(a.obsm["latent"], b.obsm["latent"])
    assert not np.allclose(a.obsm["latent"], c.obsm["latent"])


def test_batch_size_does_not_change_the_output_of_a_batch_aligned_plan(exports, tmp_path) -> None:
    # Batches are seeded by their index, so equal batches give equal cells; a different batch
    # layout gives different (but equally distributed) cells. Here: batch 4 over 8 cells.
    args = ("--condition", "cell_type=B", "--n-cells", "8", "--batch-size", "4")
    a = _gen(exports, tmp_path, *args, name="a.h5ad")
    half = shlex.split("--condition cell_type=B --n-cells 4 --batch-size 4")
    b = _gen(exports, tmp_path, *half, name="b.h5ad")
    np.testing.assert_array_equal(a.obsm["latent"][:4], b.obsm["latent"])


def test_grid_library_sizes_follow_the_condition_statistics(exports, tmp_path) -> None:
    out = _gen(exports, tmp_path, "--condition", "cell_type=*", "--n-cells", "200")
    for i, c in enumerate(CELL_TYPES):
        lib = out.obs.loc[out.obs["cell_type"] == c, "library_size"].to_numpy()
        assert len(lib) == 200
        assert abs(np.log(lib).mean() - (5.0 + i)) < 0.05  # statistics of that cell type


def test_classifier_guidance_raises_the_target_class_probability(exports, tmp_path) -> None:
    # The classifier's own p(target | z) at t = 1 must rise with the guidance scale.
    from atlasldm.models.pretrained import load_classifier

    clf = load_classifier(exports["classifier"])
    shares = []
    for scale in ("0", "10"):
        request = f"--condition cell_type=Mono --n-cells 64 --classifier-scale cell_type={scale}"
        guided = [
            "--classifier",
            str(exports["classifier"]),
            "--steps",
            "20",
            *shlex.split(request),
        ]
        out = _gen(exports, tmp_path, *guided, name=f"g{scale}.h5ad")
        z = torch.from_numpy(out.obsm["latent"]).reshape(-1, M, D)
        x = (z - 0.1) / 0.9  # the classifier sees standardised latents
        with torch.no_grad():
            p = torch.softmax(clf(x, torch.ones(len(x))), -1)[:, CELL_TYPES.index("Mono")]
        shares.append(float(p.mean()))
    assert shares[1] > shares[0] + 0.05


def test_interpolation_endpoints_equal_conditional_generation(exports, tmp_path) -> None:
    request = "--interpolate cell_type=B:T --interp-steps 3 --n-cells 5 --interp-method cfg"
    traj = _gen(exports, tmp_path, *shlex.split(request), name="t.h5ad")
    assert sorted(set(traj.obs["interp_alpha"])) == [0.0, 0.5, 1.0]
    assert traj.n_obs == 15 and set(traj.obs["interp_from"]) == {"B"}
    start = _gen(exports, tmp_path, "--condition", "cell_type=B", "--n-cells", "5", name="b.h5ad")
    # α = 0 is v(B) and joint CFG with weight 1 is v(∅) + (v(B) − v(∅)): the same ODE.
    np.testing.assert_allclose(traj.obsm["latent"][:5], start.obsm["latent"], atol=1e-4)
    assert not np.allclose(traj.obsm["latent"][10:], start.obsm["latent"], atol=1e-2)


def test_vae_prior_samples_standard_normal_latents(exports, tmp_path) -> None:
    out = _gen(exports, tmp_path, "--condition", "cell_type=B", "--n-cells", "256", dit=False)
    z = out.obsm["latent"]
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05
    assert settings(out)["library_size"] == "statistics"  # recorded in uns


def test_soma_output_equals_h5ad_output(exports, tmp_path) -> None:
    import tiledbsoma

    from atlasldm.evaluation.cli import read_cells

    args = ("--condition", "cell_type=*", "--n-cells", "3", "--batch-size", "4")
    h5 = _gen(exports, tmp_path, *args)
    _gen_soma = ["--vae", str(exports["vae"]), "--denoiser", str(exports["dit"])]
    _gen_soma += [*EULER_4, "--out", str(tmp_path / "soma"), *args]
    cli.run(_gen_soma)
    back = read_cells(tmp_path / "soma")  # what the evaluation reads
    assert list(back.obs_names) == list(h5.obs_names)
    assert list(back.var_names) == list(h5.var_names)
    assert (sp.csr_matrix(back.X) != h5.X).nnz == 0
    assert list(back.obs["cell_type"]) == list(h5.obs["cell_type"].astype(str))
    with tiledbsoma.Experiment.open(str(tmp_path / "soma")) as exp:
        latent = exp.ms["RNA"].obsm["latent"].read().to_numpy()
        means = exp.ms["RNA"].X["means"].read().to_numpy()
    np.testing.assert_array_equal(latent, h5.obsm["latent"])
    np.testing.assert_array_equal(means, h5.layers["means"])
    assert not (tmp_path / ".soma.tmp").exists()


def test_large_h5ad_means_are_refused_before_any_work() -> None:
    from atlasldm.generation.cli import check_h5ad_size

    check_h5ad_size("soma", 10**6, 36_000, means=True)  # streamed: fine
    check_h5ad_size("h5ad", 10**6, 36_000, means=False)  # no dense layer: fine
    with pytest.raises(ConditionError, match="--format soma"):
        check_h5ad_size("h5ad", 10**6, 36_000, means=True)


def test_two_processes_write_what_one_process_writes(exports, tmp_path) -> None:
    request = ["--condition", "cell_type=*", "--n-cells", "5", "--batch-size", "4"]
    one = _gen(exports, tmp_path, *request, name="one.h5ad")
    args = ["--vae", str(exports["vae"]), "--denoiser", str(exports["dit"])]
    args += [*EULER_4, *request, "--out", str(tmp_path / "two.h5ad")]
    launcher = [sys.executable, *shlex.split("-m torch.distributed.run --nproc_per_node 2")]
    cmd = [*launcher, str(REPO / "launchers" / "generate.py"), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = ad.read_h5ad(tmp_path / "two.h5ad")
    assert list(two.obs_names) == list(one.obs_names)
    assert (two.X != one.X).nnz == 0
    # torchrun runs one BLAS thread per process: float sums may differ in the last bits.
    np.testing.assert_allclose(two.obsm["latent"], one.obsm["latent"], rtol=0, atol=1e-5)
    assert not list(tmp_path.glob(".two.h5ad*"))  # the per-rank shares are gone


def test_a_crash_leaves_no_output(exports, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    real_decode = api.decode

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(api, "decode", failing)
    with pytest.raises(OSError):
        _gen(exports, tmp_path, "--condition", "cell_type=*", "--n-cells", "4", "--batch-size", "4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--condition", "cell_type=Neuron"), "unknown value 'Neuron' for condition 'cell_type'"),
        (("--condition", "tissue=blood"), "unknown condition attribute 'tissue'"),
        (("--condition", "donor_id=d1"), "on no network"),
        (("--condition", "cell_type=B", "--cfg-weight", "donor_id=2"), "drop the weight"),
        (("--condition", "cell_type=B", "--classifier-scale", "cell_type=2"), "no classifier"),
        (("--condition", "cell_type"), "expects ATTR=VALUE"),
        (("--interpolate", "cell_type=B"), "expects ATTR=A:B"),
        (("--library-size", "reference"), "add --match"),
    ],
)
def test_bad_requests_name_the_problem(exports, tmp_path, extra, message) -> None:
    with pytest.raises(ConditionError, match=message):
        _gen(exports, tmp_path, *extra)
    assert list(tmp_path.iterdir()) == []


def test_denoiser_of_another_vae_is_refused(exports, tmp_path) -> None:
    args = ["--vae", str(exports["other_vae"]), "--denoiser", str(exports["dit"])]
    args += ["--condition", "cell_type=B", "--out", str(tmp_path / "x.h5ad")]
    with pytest.raises(ExportError, match="trained on another VAE export"):
        cli.run(args)


def test_classifier_with_other_latent_scaling_is_refused(exports, tmp_path) -> None:
    clf = write_classifier(tmp_path / "clf", exports["vae"], {"mean": 0.0, "std": 2.0, "cells": 1})
    with pytest.raises(ExportError, match="standardises latents"):
        _gen(exports, tmp_path, "--classifier", str(clf), "--condition", "cell_type=B")


def test_command_line_error_is_one_line(exports, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "launchers" / "generate.py"), "--vae", str(exports["vae"])]
    cmd += ["--condition", "cell_type=Neuron", "--out", str(tmp_path / "x.h5ad")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith("error: unknown value 'Neuron'")
    assert not (tmp_path / "x.h5ad").exists()


def _main_error(args: list[str], capsys) -> str:
    """Run the command's main; return its one-line error (exit code 2 asserted)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_swapped_vae_and_denoiser_are_named(exports, tmp_path, capsys) -> None:
    out = tmp_path / "x.h5ad"
    swapped = ["--vae", str(exports["dit"]), "--denoiser", str(exports["vae"])]
    err = _main_error([*swapped, "--condition", "cell_type=B", "--out", str(out)], capsys)
    assert "--vae and --denoiser are swapped" in err
    assert f"pass --vae {exports['vae']} --denoiser {exports['dit']}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--vae", "dit"), "--vae {dit} is a dit export, not a VAE export; pass it as --denoiser"),
        (("--vae", "vae", "--denoiser", "classifier"), "pass it as --classifier"),
        (("--vae", "vae", "--classifier", "dit"), "is a dit export, not a classifier export"),
        (("--vae", "missing"), "export folder {missing} does not exist"),
        (("--vae", "vae", "--match", "missing"), "--match {missing} does not exist"),
        (("--vae", "vae", "--n-cells", "0"), "--n-cells must be >= 1"),
        (("--vae", "vae", "--batch-size", "0"), "--batch-size must be >= 1"),
        (("--vae", "vae", "--seeds"), "expected at least one argument"),
        (("--vae", "vae", "--steps", "x"), "invalid int value: 'x'"),
        (("--vae", "vae", "--device", "gpu"), "--device gpu is not a device"),
        (("--vae", "vae", "--match", "text"), "--match {text} cannot be read as .h5ad"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(exports, tmp_path, capsys, flags, message) -> None:
    (tmp_path / "notes.txt").write_text("not an h5ad")
    folders = {k: str(v) for k, v in exports.items()}
    folders.update(missing=str(tmp_path / "nope"), text=str(tmp_path / "notes.txt"))
    args = [folders.get(f, f) for f in flags]
    out = tmp_path / "out"
    err = _main_error([*args, "--condition", "cell_type=B", "--out", str(out / "x.h5ad")], capsys)
    assert message.format(**folders) in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "fmt", "message"),
    [
        ("folder", "h5ad", "is a folder; pass a file name ending in .h5ad"),
        ("file.h5ad", "soma", "is a file and a SOMA output is a folder"),
        ("file.h5ad/x.h5ad", "auto", "cannot write under"),
    ],
)
def test_an_out_that_cannot_take_the_format_is_refused(
    exports, tmp_path, capsys, out, fmt, message
):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.h5ad").write_text("old")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--vae", str(exports["vae"]), "--out", str(tmp_path / out), "--format", fmt]
    assert message in _main_error(args, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file.h5ad").read_text() == "old"


def test_the_vae_is_found_from_the_denoiser_export(exports, tmp_path) -> None:
    request = ["--condition", "cell_type=T", "--n-cells", "4", *EULER_4]
    dit = ["--denoiser", str(exports["dit"])]
    given = cli.run(
        ["--vae", str(exports["vae"]), *dit, *request, "--out", str(tmp_path / "a.h5ad")]
    )
    found = cli.run([*dit, *request, "--out", str(tmp_path / "b.h5ad")])
    a, b = ad.read_h5ad(given), ad.read_h5ad(found)
    assert (a.X != b.X).nnz == 0 and settings(b)["vae"] == str(exports["vae"])


def test_every_option_has_help_that_shows_its_default() -> None:
    parser = cli.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help"
        shown = parser._get_formatter()._expand_help(action)  # what --help prints for it
        assert f"(default: {action.default})" in shown or "%(default)" in action.help, shown
    text = " ".join(parser.format_help().split())  # --help, unwrapped
    assert text.count("(default: ") == len(parser._actions) - 1  # once per option, no repeats


def test_trajectory_from_real_cells_starts_near_their_latents(exports, tmp_path) -> None:
    # Started at t = 0.95 from encoded cells of A, the ODE moves the latents only a little;
    # started from noise it lands far from them.
    import torch

    from atlasldm.generation.encode import encode_cells
    from atlasldm.models.pretrained import load_vae

    ref = _reference((6, 0, 0))  # six cells of type B
    ref.write_h5ad(tmp_path / "src.h5ad")
    traj = shlex.split(
        "--interpolate cell_type=B:T --interp-steps 2 --n-cells 6 --interp-method cfg"
    )
    start = ["--interp-source", str(tmp_path / "src.h5ad"), "--t-start", "0.95"]
    near = _gen(exports, tmp_path, *traj, *start, name="near.h5ad")
    far = _gen(exports, tmp_path, *traj, name="far.h5ad")
    genes = pd.read_csv(exports["vae"] / "genes.tsv", sep="\t", dtype=str)
    z = encode_cells(load_vae(exports["vae"]), ref, genes, torch.device("cpu")).flatten(1).numpy()
    gap_near = np.abs(near.obsm["latent"][:6] - z).mean()
    gap_far = np.abs(far.obsm["latent"][:6] - z).mean()
    assert gap_near < 0.3 * gap_far


def test_attributes_left_out_of_the_request_stay_unconditioned(exports, tmp_path) -> None:
    # A denoiser conditioned on cell type and donor, asked for cell types only: the donor is
    # null in every evaluation, which equals the same request with donor weight left out.
    two = write_dit(tmp_path / "dit2", exports["vae"], columns=("cell_type", "donor_id"))
    args = ["--vae", str(exports["vae"]), "--denoiser", str(two)]
    args += shlex.split("--sampler euler --steps 3 --condition cell_type=* --n-cells 5")
    out = ad.read_h5ad(cli.run([*args, "--out", str(tmp_path / "a.h5ad")]))
    assert out.n_obs == 15 and "donor_id" not in out.obs
    donor = ["--condition", "donor_id=d1", "--out", str(tmp_path / "b.h5ad")]
    both = ad.read_h5ad(cli.run([*args, *donor]))
    assert not np.allclose(both.obsm["latent"], out.obsm["latent"])  # the donor does matter
