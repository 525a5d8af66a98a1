"""PNG figures of real vs evaluated cells: PCA/UMAP, gene statistics, mean-variance, paths.

Each set is drawn at its first seed. Every figure has a title and axis labels and no text under
10 pt (`FONT`); each drawing function returns its (closed) Figure, so tests can read what it
shows. Shape legend: N cells, G genes, P PCs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from atlasldm.evaluation.context import Context, EvalSet  # noqa: E402
from atlasldm.progress import Progress  # noqa: E402
from atlasldm.training_curves import FONT  # noqa: E402  (one font rule for every figure)

REAL_COLOR = "0.6"
DPI = 100
MV_COLUMNS = 3  # mean-variance panels per row


def _save(fig: plt.Figure, path: Path) -> plt.Figure:
    """Write `fig` to `path` and release it from pyplot; return it (still readable)."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig


def _first_seed(sets: dict) -> dict[str, EvalSet]:
    return {name: per_seed[min(per_seed)] for name, (_, per_seed) in sets.items()}


def _label_colors(labels: np.ndarray) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    return {c: cmap(i % 20) for i, c in enumerate(np.unique(labels))}


def _legend_handles(colors: dict[str, tuple]) -> list:
    return [plt.Line2D([], [], ls="", marker="o", color=col, label=c) for c, col in colors.items()]


@plt.rc_context(FONT)
def embedding_figure(
    real_labels: np.ndarray, panels: dict, path: Path, title: str, axis: str = "PC"
) -> plt.Figure:
    """Write a 2-row grid: row 1 coloured by source, row 2 by condition, one column per set.

    ``panels`` maps a set name to (real (M, 2), evaluated (N, 2), evaluated labels (N,));
    ``axis`` names the coordinates (``PC`` -> PC1, PC2). Returns the Figure.
    """
    names = list(panels)
    fig, axes = plt.subplots(2, len(names), figsize=(4.5 * len(names), 9), squeeze=False)
    all_labels = np.concatenate([real_labels] + [lab for *_, lab in panels.values()])
    colors = _label_colors(all_labels)
    for j, name in enumerate(names):
        real_xy, xy, labels = panels[name]
        top, bottom = axes[0, j], axes[1, j]
        top.scatter(*real_xy.T, s=4, c=REAL_COLOR, label="real test")
        top.scatter(*xy.T, s=4, c="tab:red", alpha=0.6, label=name)
        top.set_title(f"{name}: by source")
        top.legend(markerscale=3)
        both = np.concatenate([real_xy, xy])
        both_labels = np.concatenate([real_labels, labels])
        bottom.scatter(*both.T, s=4, c=[colors[c] for c in both_labels])
        bottom.set_title(f"{name} + real: by condition")
        for ax in (top, bottom):
            ax.set_xlabel(f"{axis}1")
            ax.set_ylabel(f"{axis}2")
    handles = _legend_handles(colors)
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    return _save(fig, path)


def umap_coordinates(real_pcs: np.ndarray, gen_pcs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return (N_real + N_gen, 2) joint UMAP coordinates via scanpy (needs umap-learn)."""
    import anndata as ad
    import scanpy as sc

    joint = ad.AnnData(np.concatenate([real_pcs, gen_pcs]).astype(np.float32))
    sc.pp.neighbors(joint, use_rep="X", n_neighbors=15, random_state=seed)
    sc.tl.umap(joint, random_state=seed)
    return joint.obsm["X_umap"]


GENE_STATS = {
    "mean": lambda x: x.mean(0),
    "variance": lambda x: x.var(0),
    "zero fraction": lambda x: (x == 0).mean(0),
}


@plt.rc_context(FONT)
def gene_stat_figure(real_log: np.ndarray, sets: dict[str, EvalSet], path: Path) -> plt.Figure:
    """Write per-gene mean, variance and zero-fraction scatters (real x, evaluated y).

    One row per statistic of log1p-CP10k, one column per set; the dashed line is y = x.
    """
    n_rows, n_cols = len(GENE_STATS), len(sets)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 11), squeeze=False)
    for i, (stat, fn) in enumerate(GENE_STATS.items()):
        ref = fn(real_log)
        for j, (name, es) in enumerate(sets.items()):
            ax, ours = axes[i, j], fn(es.log)
            ax.scatter(ref, ours, s=3)
            lim = [min(ref.min(), 0), max(ref.max(), ours.max())]
            ax.plot(lim, lim, "k--", lw=0.8)
            ax.set_title(f"{name}: {stat}")
            ax.set_xlabel(f"real test {stat}")
            ax.set_ylabel(f"{name} {stat}")
    fig.suptitle("per-gene statistics of log1p-CP10k, real test (x) vs each set (y)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


def mean_variance(log: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-gene mean and variance, each (G,), of CP10k values (expm1 of log1p-CP10k)."""
    cp10k = np.expm1(log)
    return cp10k.mean(0), cp10k.var(0)


@plt.rc_context(FONT)
def mean_variance_figure(real_log: np.ndarray, sets: dict[str, EvalSet], path: Path) -> plt.Figure:
    """Write per-gene variance against mean of CP10k, log-log: real test and each set.

    One panel per set (MV_COLUMNS per row), the real test cells in grey behind it. Genes with
    a zero mean or variance have no place on log axes and are left out of that set's points.
    """
    real_mean, real_var = mean_variance(real_log)
    cols = min(MV_COLUMNS, len(sets))
    rows = -(-len(sets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.4 * rows + 0.4), squeeze=False)
    for ax in axes.ravel()[len(sets) :]:
        fig.delaxes(ax)
    for ax, (name, es) in zip(axes.ravel(), sets.items(), strict=False):
        for label, (mean, var), color in (
            ("real test", (real_mean, real_var), REAL_COLOR),
            (name, mean_variance(es.log), "tab:red"),
        ):
            keep = (mean > 0) & (var > 0)
            ax.scatter(mean[keep], var[keep], s=4, c=color, alpha=0.7, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # labels on minor ticks overlap under one decade
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{name} vs real test")
        ax.set_xlabel("gene mean (CP10k)")
        ax.set_ylabel("gene variance (CP10k)")
        ax.legend(markerscale=3)
    fig.suptitle("mean-variance relation per gene, log-log")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (4.4 * rows + 0.4)))
    return _save(fig, path)


@plt.rc_context(FONT)
def trajectory_figure(ctx: Context, name: str, es: EvalSet, path: Path) -> plt.Figure:
    """Write a PCA plot of interpolated cells coloured by ``interp_alpha``, with the mean path."""
    pcs = ctx.rep.pcs(es.log)
    alphas = np.unique(es.interp_alpha)
    path_xy = np.stack([pcs[es.interp_alpha == a, :2].mean(0) for a in alphas])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.scatter(*ctx.test_pcs[:, :2].T, s=4, c=REAL_COLOR, label="real test")
    sc_ = ax.scatter(*pcs[:, :2].T, s=6, c=es.interp_alpha, cmap="viridis", label=name)
    ax.plot(*path_xy.T, "k-o", ms=3, lw=1.2, label="mean per α")
    fig.colorbar(sc_, ax=ax, label="interp_alpha")
    ax.set_title(f"trajectory {name} (reference PCA)")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def write_figures(ctx: Context, sets: dict, out_dir: str | Path, umap: bool = False) -> list[Path]:
    """Write pca.png, genes.png, mean_variance.png, optional umap.png and trajectory_<set>.png.

    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = _first_seed(sets)
    real_pcs, real_labels = ctx.test_pcs, ctx.test.labels
    pca = {n: (real_pcs[:, :2], ctx.rep.pcs(es.log)[:, :2], es.labels) for n, es in first.items()}
    written = [out / "pca.png", out / "genes.png", out / "mean_variance.png"]
    embedding_figure(real_labels, pca, written[0], "PCA of reference fit, PC1-PC2")
    gene_stat_figure(ctx.test.log, first, written[1])
    mean_variance_figure(ctx.test.log, first, written[2])
    if umap:
        written.append(out / "umap.png")
        umap_figure(ctx, first, written[-1])
    for n, es in first.items():
        if es.interp_alpha is not None:
            written.append(out / f"trajectory_{n}.png")
            trajectory_figure(ctx, n, es, written[-1])
    return written


def umap_figure(ctx: Context, first: dict[str, EvalSet], path: Path) -> plt.Figure:
    """Write one joint UMAP per set (reference PCs); real cells sit differently in each panel."""
    real_pcs, panels = ctx.test_pcs, {}
    with Progress("evaluate: UMAP panels", total=len(first), unit="panels") as progress:
        for n, es in first.items():
            xy = umap_coordinates(real_pcs, ctx.rep.pcs(es.log), ctx.config.seed)
            panels[n] = (xy[: len(real_pcs)], xy[len(real_pcs) :], es.labels)
            progress.update()
    title = "joint UMAP per set (reference PCs)"
    return embedding_figure(ctx.test.labels, panels, path, title, axis="UMAP")
