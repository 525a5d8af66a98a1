"""Figures: the training curves from metrics.jsonl, the evaluation figures, and their legibility.

The curve data must be what metrics.jsonl holds (steps merged, a resumed run's later record
winning, as `conftest.read_run_metrics` reads it); every figure must be a real PNG with a title,
axis labels and no text under 10 pt.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib.text
import numpy as np
import pandas as pd
import pytest
from conftest import read_run_metrics
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from atlasldm.evaluation.context import EvalConfig
from atlasldm.evaluation.figures import (
    embedding_figure,
    gene_stat_figure,
    mean_variance,
    mean_variance_figure,
    trajectory_figure,
    write_figures,
)
from atlasldm.evaluation.fixtures import carve_floor
from atlasldm.evaluation.protocol import make_set, prepare
from atlasldm.training_curves import CurveError, draw_curves, read_series, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PT = 10


def _write_metrics(run: Path, records: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _training_records() -> list[dict]:
    """Steps 1-6 with validation at 3 and 6, a skipped step 4, and a resume that redid 5-6."""
    rows = []
    for step in range(1, 7):
        if step == 4:
            rows.append({"step": 4, "skipped": True, "lr": 0.4, "grad_norm": float("nan")})
        else:
            rows.append(
                {"step": step, "train/loss": 10.0 - step, "lr": step / 10, "grad_norm": 2.0}
            )
        if step % 3 == 0:
            rows.append({"step": step, "val/nll": 5.0 - step / 3, "val/mse": 1.0 / step})
    rows += [{"step": s, "train/loss": 100.0 + s, "lr": 0.9, "grad_norm": 3.0} for s in (5, 6)]
    return rows


def assert_png(path: Path, min_px: int = 300, max_px: int = 6000) -> None:
    """A PNG that opens, of a size a page can show."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_px <= width <= max_px and min_px <= height <= max_px, (path, image.size)


def assert_legible(fig) -> None:
    """Every data axes has a title and axis labels; no visible text is under MIN_PT."""
    data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert data_axes
    for ax in data_axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax
    assert fig.get_suptitle() or all(ax.get_title() for ax in data_axes)
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]
    small = {t.get_text(): t.get_fontsize() for t in texts if t.get_fontsize() < MIN_PT}
    assert not small, small


def test_curves_hold_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    run = _write_metrics(tmp_path / "vae", _training_records())
    out = tmp_path / "curves.png"
    panels = training_curves(run, out)
    assert list(panels) == ["train/loss", "lr", "grad_norm", "val/mse", "val/nll"]
    merged = read_run_metrics(run)
    for key, (steps, values) in panels.items():
        expected = {s: r[key] for s, r in sorted(merged.items()) if key in r}
        assert steps.tolist() == list(expected), key
        np.testing.assert_array_equal(values, np.array(list(expected.values())), err_msg=key)
    assert panels["train/loss"][0].tolist() == [1, 2, 3, 5, 6]  # the skipped step has no loss
    assert panels["train/loss"][1][-1] == 106.0  # the resumed run's record of step 6
    assert_png(out)


def test_curve_figure_is_legible(tmp_path: Path) -> None:
    panels = read_series(_write_metrics(tmp_path / "dit", _training_records()))
    fig = draw_curves(panels, tmp_path / "c.png", "training curves: dit")
    assert_legible(fig)
    assert [ax.get_title() for ax in fig.axes][:3] == [
        "training loss",
        "learning rate",
        "gradient norm",
    ]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"step": 1, "val/nll": 2.0}\n', "train/loss"),
        ('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo', "line 2"),
        ('{"train/loss": 2.0}\n', "step"),
        (None, "does not exist"),
    ],
    ids=["no loss", "half a line", "no step", "missing"],
)
def test_curves_reject_a_file_that_is_not_a_run_history(tmp_path, content, fragment) -> None:
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CurveError) as err:
        training_curves(path, tmp_path / "c.png")
    message = str(err.value)
    assert "\n" not in message and fragment in message and str(path) in message
    assert not (tmp_path / "c.png").exists()


RECORD = st.fixed_dictionaries(
    {"step": st.integers(1, 8)},
    optional={
        "train/loss": st.floats(-1e3, 1e3),
        "lr": st.floats(0, 1),
        "val/acc": st.floats(0, 1),
        "perf/step_s": st.floats(0, 10),
    },
)


@settings(max_examples=60, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=25))
def test_series_are_the_last_value_of_each_step(tmp_path_factory, records) -> None:
    path = tmp_path_factory.mktemp("h") / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    last: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                last.setdefault(key, {})[r["step"]] = value
    if "train/loss" not in last:
        with pytest.raises(CurveError):
            read_series(path)
        return
    series = read_series(path)
    assert set(series) == set(last)
    for key, (steps, values) in series.items():
        assert steps.tolist() == sorted(last[key])
        assert values.tolist() == [last[key][s] for s in sorted(last[key])]


CLASSES = ("a", "b", "c")


def _cells(n_per_class: int, seed: int, shift: float = 0.0, n_genes: int = 40) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    base = np.exp(np.random.default_rng(123).uniform(-1, 2, size=n_genes))
    rows, labels = [], []
    for i, c in enumerate(CLASSES):
        mu = base.copy()
        mu[i * 5 : i * 5 + 5] *= 6.0 + shift
        rows.append(rng.negative_binomial(5, 5 / (5 + mu), size=(n_per_class, n_genes)))
        labels += [c] * n_per_class
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(n_genes)])
    return ad.AnnData(np.concatenate(rows).astype(np.float32), obs=obs, var=var)


@pytest.fixture(scope="module")
def fitted() -> tuple:
    """(ctx, sets, generated AnnData) for a small evaluation without Block A."""
    test, train = _cells(30, 0), _cells(60, 1)
    gen = _cells(30, 5, shift=10.0)
    gen.obs["interp_alpha"] = np.round(np.linspace(0, 1, gen.n_obs), 1)
    floor, ref = carve_floor(train.obs["cell_type"], test.obs["cell_type"])
    config = EvalConfig(n_top_genes=30, n_pcs=10, known_bad_seeds=(0,), block_a=False)
    ctx, sets = prepare(train[ref].copy(), test, train[floor].copy(), {"toy": gen}, config)
    return ctx, sets, gen


def test_report_figures_are_pngs(fitted, tmp_path: Path) -> None:
    ctx, sets, _ = fitted
    written = write_figures(ctx, sets, tmp_path)
    names = {p.name for p in written}
    assert {"pca.png", "genes.png", "mean_variance.png", "trajectory_toy.png"} <= names
    for path in written:
        assert_png(path)


def test_mean_variance_is_per_gene_cp10k_of_the_counts(fitted) -> None:
    ctx, sets, gen = fitted
    counts = np.asarray(gen.X, dtype=np.float64)
    cp10k = counts / counts.sum(1, keepdims=True) * 1e4
    mean, var = mean_variance(sets["toy"][1][0].log)
    np.testing.assert_allclose(mean, cp10k.mean(0), rtol=1e-9)
    np.testing.assert_allclose(var, cp10k.var(0), rtol=1e-9)


def test_every_evaluation_figure_is_legible(fitted, tmp_path: Path) -> None:
    ctx, sets, gen = fitted
    first = {name: per_seed[min(per_seed)] for name, (_, per_seed) in sets.items()}
    pcs = {
        n: (ctx.test_pcs[:, :2], ctx.rep.pcs(es.log)[:, :2], es.labels) for n, es in first.items()
    }
    figures = [
        embedding_figure(ctx.test.labels, pcs, tmp_path / "pca.png", "PCA"),
        gene_stat_figure(ctx.test.log, first, tmp_path / "genes.png"),
        mean_variance_figure(ctx.test.log, first, tmp_path / "mv.png"),
        trajectory_figure(ctx, "toy", make_set(gen, "cell_type"), tmp_path / "traj.png"),
    ]
    for fig in figures:
        assert_legible(fig)
    mv = figures[2]
    assert all(ax.get_xscale() == ax.get_yscale() == "log" for ax in mv.axes)
    # Each panel shows the real test cells and one set: two point clouds with a legend.
    assert all(len(ax.collections) == 2 and ax.get_legend() for ax in mv.axes)
