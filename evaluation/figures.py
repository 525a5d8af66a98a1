"""PNG figures of real vs evaluated cells: PCA/UMAP, gene statistics, interpolation paths.

Each set is drawn at its first seed. Shape legend: N cells, G genes, P PCs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atlasldm.evaluation.context import Context, EvalSet  # noqa: E402

REAL_COLOR = "0.6"


def _first_seed(sets: dict) -> dict[str, EvalSet]:
    return {name: per_seed[min(per_seed)] for name, (_, per_seed) in sets.items()}


def _label_colors(labels: np.ndarray) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    return {c: cmap(i % 20) for i, c in enumerate(np.unique(labels))}


def embedding_figure(real_labels: np.ndarray, panels: dict, path: Path, title: str) -> None:
    """Write a 2-row grid: row 1 coloured by source, row 2 by condition, one column per set.

    ``panels`` maps a set name to (real (M, 2), evaluated (N, 2), evaluated labels (N,)).
    """
    names = list(panels)
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 8), squeeze=False)
    all_labels = np.concatenate([real_labels] + [lab for *_, lab in panels.values()])
    colors = _label_colors(all_labels)
    for j, name in enumerate(names):
        real_xy, xy, labels = panels[name]
        top, bottom = axes[0, j], axes[1, j]
        top.scatter(*real_xy.T, s=4, c=REAL_COLOR, label="real test")
        top.scatter(*xy.T, s=4, c="tab:red", alpha=0.6, label=name)
        top.set_title(f"{name}: by source")
        top.legend(fontsize=7, markerscale=3)
        both = np.concatenate([real_xy, xy])
        both_labels = np.concatenate([real_labels, labels])
        bottom.scatter(*both.T, s=4, c=[colors[c] for c in both_labels])
        bottom.set_title(f"{name} + real: by condition")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=col, label=c) for c, col in colors.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def umap_coordinates(real_pcs: np.ndarray, gen_pcs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Return (N_real + N_gen, 2) joint UMAP coordinates via scanpy (needs umap-learn)."""
    import anndata as ad
    import scanpy as sc

    joint = ad.AnnData(np.concatenate([real_pcs, gen_pcs]).astype(np.float32))
    sc.pp.neighbors(joint, use_rep="X", n_neighbors=15, random_state=seed)
    sc.tl.umap(joint, random_state=seed)
    return joint.obsm["X_umap"]


def gene_stat_figure(real_log: np.ndarray, sets: dict[str, EvalSet], path: Path) -> None:
    """Write per-gene mean, variance and zero-fraction scatters (real x, evaluated y)."""
    stats = {
        "mean": lambda x: x.mean(0),
        "variance": lambda x: x.var(0),
        "zero fraction": lambda x: (x == 0).mean(0),
    }
    fig, axes = plt.subplots(len(stats), len(sets), figsize=(3.5 * len(sets), 10), squeeze=False)
    for i, (stat, fn) in enumerate(stats.items()):
        ref = fn(real_log)
        for j, (name, es) in enumerate(sets.items()):
            ax = axes[i, j]
            ax.scatter(ref, fn(es.log), s=3)
            lim = [min(ref.min(), 0), max(ref.max(), fn(es.log).max())]
            ax.plot(lim, lim, "k--", lw=0.8)
            ax.set_xlabel(f"real {stat}")
            ax.set_ylabel(f"{name} {stat}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def trajectory_figure(ctx: Context, name: str, es: EvalSet, path: Path) -> None:
    """Write a PCA plot of interpolated cells coloured by ``interp_alpha``, with the mean path."""
    pcs = ctx.rep.pcs(es.log)
    alphas = np.unique(es.interp_alpha)
    path_xy = np.stack([pcs[es.interp_alpha == a, :2].mean(0) for a in alphas])
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*ctx.test_pcs[:, :2].T, s=4, c=REAL_COLOR, label="real test")
    sc_ = ax.scatter(*pcs[:, :2].T, s=6, c=es.interp_alpha, cmap="viridis", label=name)
    ax.plot(*path_xy.T, "k-o", ms=3, lw=1.2, label="mean per α")
    fig.colorbar(sc_, ax=ax, label="interp_alpha")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_figures(ctx: Context, sets: dict, out_dir: str | Path, umap: bool = False) -> list[Path]:
    """Write pca.png, genes.png, optional umap.png and trajectory_<set>.png; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = _first_seed(sets)
    real_pcs, real_labels = ctx.test_pcs, ctx.test.labels
    pca = {n: (real_pcs[:, :2], ctx.rep.pcs(es.log)[:, :2], es.labels) for n, es in first.items()}
    written = [out / "pca.png", out / "genes.png"]
    embedding_figure(real_labels, pca, written[0], "PCA of reference fit, PC1-PC2")
    gene_stat_figure(ctx.test.log, first, written[1])
    if umap:
        panels = {}
        for n, es in first.items():
            # One joint embedding per panel, so real cells sit differently in each panel.
            xy = umap_coordinates(real_pcs, ctx.rep.pcs(es.log), ctx.config.seed)
            panels[n] = (xy[: len(real_pcs)], xy[len(real_pcs) :], es.labels)
        written.append(out / "umap.png")
        embedding_figure(real_labels, panels, written[-1], "joint UMAP per set (reference PCs)")
    for n, es in first.items():
        if es.interp_alpha is not None:
            written.append(out / f"trajectory_{n}.png")
            trajectory_figure(ctx, n, es, written[-1])
    return written
