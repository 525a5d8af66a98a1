"""The evaluate command: one-line errors that write nothing, help with defaults, progress.

Each user mistake is checked through `main` (SystemExit 2, one `error:` line on stderr naming
the file and the fix, no report folder), and one through a real process for the traceback-free
exit. The inputs are small NB counts with three labelled classes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlasldm.evaluation.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("a", "b", "c")
N_GENES = 40
FAST = ["--n-top-genes", "30", "--n-pcs", "10", "--rf-trees", "5", "--known-bad-seeds", "0"]


def _cells(n_per_class: int, seed: int, shift: float = 0.0) -> ad.AnnData:
    """NB counts, a few marker genes per class; obs cell_type, var ENSG ids."""
    rng = np.random.default_rng(seed)
    base = np.exp(np.random.default_rng(123).uniform(-1, 2, size=N_GENES))
    rows, labels = [], []
    for i, c in enumerate(CLASSES):
        mu = base.copy()
        mu[i * 5 : i * 5 + 5] *= 6.0 + shift
        rows.append(rng.negative_binomial(5, 5 / (5 + mu), size=(n_per_class, N_GENES)))
        labels += [c] * n_per_class
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(N_GENES)])
    return ad.AnnData(np.concatenate(rows).astype(np.float32), obs=obs, var=var)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real test/train files, a generated file (seeds 0, 1) and its broken variants."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {name: root / f"{name}.h5ad" for name in ("test", "train", "gen")}
    _cells(30, 0).write_h5ad(paths["test"])
    _cells(60, 1).write_h5ad(paths["train"])
    gen = ad.concat([_cells(30, 10 + s, shift=5.0) for s in (0, 1)], index_unique="-")
    gen.obs["seed"] = np.repeat([0, 1], gen.n_obs // 2)
    gen.obs["interp_alpha"] = np.tile(np.linspace(0, 1, gen.n_obs // 2), 2)
    gen.write_h5ad(paths["gen"])
    variants = {
        "gen_no_label": gen[:, :].copy(),
        "gen_other_ids": gen.copy(),
        "gen_no_alpha": gen.copy(),
        "test_empty": ad.read_h5ad(paths["test"])[:0].copy(),
        "test_log": ad.read_h5ad(paths["test"]),
    }
    del variants["gen_no_label"].obs["cell_type"]
    variants["gen_other_ids"].var_names = [str(i) for i in range(N_GENES)]
    del variants["gen_no_alpha"].obs["interp_alpha"]
    variants["test_log"].X = np.log1p(variants["test_log"].X)
    for name, adata in variants.items():
        paths[name] = root / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    paths["not_h5ad"] = root / "not_h5ad.h5ad"
    paths["not_h5ad"].write_text("plain text, not HDF5")
    paths["copy"] = root / "copy"  # a training copy's folder: its Experiment is copy/experiment
    (paths["copy"] / "experiment").mkdir(parents=True)
    paths["run"] = root / "run"
    paths["run"].mkdir()
    (paths["run"] / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/nll": 3.0}) + "\n")
    return paths


def _real(files: dict[str, Path], test: str = "test") -> list[str]:
    return ["--real-test", str(files[test]), "--real-train", str(files["train"])]


# (case, argv after the real files (None: give them yourself), fragments of the message)
MISTAKES = [
    ("label key not in obs", ["--label-key", "celltype"], ["'celltype'", "test.h5ad", "cell_type"]),
    (
        "generated file lacks the label",
        ["--generated", "toy={gen_no_label}"],
        ["gen_no_label.h5ad", "'cell_type'", "seed", "interp_alpha"],
    ),
    ("missing file", ["--generated", "toy={missing}"], ["missing.h5ad", "does not exist"]),
    ("not an h5ad file", ["--generated", "toy={not_h5ad}"], ["not_h5ad.h5ad", "readable"]),
    ("not a SOMA folder", ["--generated", "toy={run}"], ["neither an .h5ad", "run"]),
    ("a copy, not its experiment", ["--generated", "toy={copy}"], ["give ", "copy/experiment"]),
    ("other gene ids", ["--generated", "toy={gen_other_ids}"], ["gen_other_ids.h5ad", "0, 1, 2"]),
    ("no cells at the seeds", ["--generated", "toy={gen}", "--seeds", "7"], ["seeds 7", "0, 1"]),
    ("spec without a name", ["--generated", "{gen}"], ["NAME=PATH"]),
    ("name twice", ["--generated", "a={gen}", "a={gen}"], ["'a' twice"]),
    ("reserved name", ["--generated", "real_floor={gen}"], ["'real_floor'", "taken"]),
    ("unknown --normalized", ["--generated", "a={gen}", "--normalized", "b"], ["b", "sets: a"]),
    ("trajectory without alpha", ["--trajectory", "t={gen_no_alpha}"], ["interp_alpha"]),
    ("run without loss", ["--training-run", "v={run}"], ["metrics.jsonl", "train/loss"]),
    ("too many PCs", ["--n-pcs", "45"], ["40 genes", "--n-pcs 45"]),
    ("out is a file", ["--out", "{gen}"], ["is a file"]),
    ("zero PCs", ["--n-pcs", "0"], ["--n-pcs", "at least 1"]),
    ("empty real file", None, ["test_empty.h5ad", "no cells"]),
    ("normalised real file", None, ["test_log.h5ad", "raw counts"]),
    ("one real file", None, ["--real-train"]),
    ("fixture and files", None, ["--fixture"]),
]
OWN_REAL = {
    "empty real file": lambda f: _real(f, "test_empty"),
    "normalised real file": lambda f: _real(f, "test_log"),
    "one real file": lambda f: ["--real-test", str(f["test"])],
    "fixture and files": lambda f: ["--fixture", "pbmc68k", *_real(f)],
}


@pytest.mark.parametrize(("case", "extra", "fragments"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_exit_2_and_nothing_written(
    files, tmp_path, capsys, case, extra, fragments
) -> None:
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "missing.h5ad")}
    out = tmp_path / "report"
    argv = OWN_REAL[case](files) if extra is None else _real(files)
    argv += ["--out", str(out), *FAST, *[a.format(**paths) for a in extra or []]]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = [
        line for line in capsys.readouterr().err.splitlines() if not line.startswith("evaluate:")
    ]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not out.exists()


def test_a_real_process_prints_no_traceback(files, tmp_path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, str(REPO / "launchers" / "evaluate.py"), *_real(files)]
    cmd += ["--label-key", "celltype", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if not line.startswith("evaluate:")]
    assert len(errors) == 1 and "'celltype'" in errors[0] and "cell_type" in errors[0]
    assert not out.exists()


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        shown = parser._get_formatter()._get_help_string(action)
        assert "%(default)" in shown or action.required, action.option_strings
    assert "(default: cell_type)" in text and "(default: 1000)" in text


def test_progress_counts_every_metric_block_and_curves_are_drawn(files, tmp_path, capsys) -> None:
    run = tmp_path / "vae"
    run.mkdir()
    lines = [{"step": s, "train/loss": 10.0 / s, "lr": 1e-3, "grad_norm": 1.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv = [*_real(files), "--generated", f"toy={files['gen']}", "--seeds", "0", "1", *FAST]
    main([*argv, "--out", str(tmp_path / "out"), "--training-run", f"vae={run}"])
    err = capsys.readouterr().err
    # floor (1 seed) + poisson_mean and gene_shuffled (1 seed each) + toy (2 seeds), Blocks A and B
    assert "evaluate: 10/10 metric blocks (100%)" in err, err
    for name in ("report.json", "mean_variance.png", "training_curves_vae.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
