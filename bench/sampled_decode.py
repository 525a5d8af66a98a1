"""Sampled-decode trade-off: held-out full-gene NB NLL and step CPU time, full vs k sampled genes.

``python launchers/bench_sampled_decode.py [--corpus synthetic|pbmc|both] [--quick] [k=v ...]``

Every variant trains the reference VAE from the same initial weights on the same cells in the same
order (same seeds), with the training recipe's AdamW and warmup-stable-decay schedule, for the
same number of steps, so the same number of cells is seen. Then every variant is scored with the
full decode (all G genes, eval mode) on the same held-out cells: NB NLL per gene, averaged over
cells. Variants: ``full`` (the default decode), and ``sampled_zeros = k`` with each normaliser
(docs/sampled_decode.md). Each variant runs in a fresh process with one thread; the step cost is
process CPU-seconds per training step (wall beside it). The last printed line is one JSON object.

Corpora: ``synthetic``, a negative-binomial corpus of 20,000 genes (data/synthetic.py), and
``pbmc``, the built-in pbmc68k data (765 genes: a k at or above 765 decodes every gene, so it
equals ``full`` and is skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from atlasldm.bench.model import WORKER_ENV
from atlasldm.models.batch import CellBatch
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.config import OptimConfig
from atlasldm.train.optim import lr_at


@dataclass
class TradeoffSettings:
    """What to train and score; ``key=value`` on the command line overrides these."""

    genes: int = 20000  # G of the synthetic corpus
    train_cells: int = 4096  # cells the training batches are drawn from
    test_cells: int = 512  # held-out cells scored with the full decode
    batch: int = 32  # cells per training step
    steps: int = 120  # training steps (cells seen = steps x batch)
    ks: list[int] = field(default_factory=lambda: [512, 2048, 4096])  # k, estimated normaliser
    exact_ks: list[int] = field(default_factory=lambda: [2048])  # k, exact normaliser
    seed: int = 0  # initial weights, batch order, gene samples
    eval_batch: int = 64  # cells per scoring batch


def corpus_csr(name: str, s: TradeoffSettings) -> sp.csr_matrix:
    """Counts (cells x genes) of the corpus: train cells first, then the held-out cells."""
    if name == "pbmc":
        from atlasldm.data.pbmc import pbmc68k_counts

        X = pbmc68k_counts().X.tocsr()
        order = np.random.default_rng(s.seed).permutation(X.shape[0])
        return X[order]
    from atlasldm.data.synthetic import SyntheticSpec, generate_anndata

    spec = SyntheticSpec(cells=s.train_cells + s.test_cells, genes=s.genes, seed=s.seed)
    return generate_anndata(spec).X.tocsr()


def split_sizes(X: sp.csr_matrix, s: TradeoffSettings) -> tuple[int, int]:
    """(train, test) cell counts: the settings', shrunk to fit a small corpus (test last)."""
    test = min(s.test_cells, X.shape[0] // 4)
    return min(s.train_cells, X.shape[0] - test), test


def cell_batch(X: sp.csr_matrix, rows: np.ndarray) -> CellBatch:
    """Packed CellBatch of the given rows (gene tokens are column + 1)."""
    sub = X[rows]
    return CellBatch.from_packed(
        torch.from_numpy(sub.indices.astype(np.int64) + 1),
        torch.from_numpy(sub.data.astype(np.float32)),
        torch.from_numpy(sub.indptr.astype(np.int64)),
    )


def train(vae: VAE, X: sp.csr_matrix, n_train: int, s: TradeoffSettings) -> dict:
    """Train for s.steps steps; return CPU and wall seconds per step (first step excluded)."""
    opt_cfg = OptimConfig()
    opt = torch.optim.AdamW(vae.parameters(), lr=opt_cfg.lr, betas=opt_cfg.betas)
    order = np.random.default_rng(s.seed).permutation(np.arange(n_train).repeat(s.steps))
    cpu, wall = [], []
    for step in range(s.steps):
        rows = np.sort(order[step * s.batch : (step + 1) * s.batch] % n_train)
        batch = cell_batch(X, rows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, opt_cfg, s.steps)
        c0, w0 = time.process_time(), time.perf_counter()
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        vae.loss(batch, generator=gen).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    timed = slice(1, None) if s.steps > 1 else slice(None)
    return {
        "cpu_s_per_step": float(np.mean(cpu[timed])),
        "wall_s_per_step": float(np.mean(wall[timed])),
    }


@torch.no_grad()
def held_out_nll_per_gene(
    vae: VAE, X: sp.csr_matrix, rows: np.ndarray, s: TradeoffSettings
) -> float:
    """Full-decode NB NLL per gene, mean over the held-out cells (eval mode)."""
    vae.eval()
    total = 0.0
    for start in range(0, rows.size, s.eval_batch):
        part = rows[start : start + s.eval_batch]
        total += float(vae.loss(cell_batch(X, part)).nll) * part.size
    return total / rows.size / vae.config.num_genes


def run_variant(spec: dict) -> dict:
    """One variant in this process: build, train, score."""
    torch.set_num_threads(1)
    s = TradeoffSettings(**spec["settings"])
    X = sp.load_npz(spec["corpus"]).tocsr()
    n_train, n_test = split_sizes(X, s)
    torch.manual_seed(s.seed)
    vae = VAE(VAEConfig(num_genes=X.shape[1], **spec["model"])).train()
    timing = train(vae, X, n_train, s)
    test_rows = np.arange(X.shape[0] - n_test, X.shape[0])
    nll = held_out_nll_per_gene(vae, X, test_rows, s)
    return timing | {"held_out_nll_per_gene": nll, "cells_seen": s.steps * s.batch}


def variants(G: int, s: TradeoffSettings) -> list[tuple[str, dict]]:
    """(name, VAEConfig fields) of every variant: full, then each k below G and normaliser."""
    out = [("full", {})]
    for norm, ks in (("estimated", s.ks), ("exact", s.exact_ks)):
        for k in ks:
            if k < G:  # k >= G decodes every gene: the full decode again
                out.append((f"k={k} {norm}", {"sampled_zeros": k, "sampled_normaliser": norm}))
    return out


def run_worker(spec: dict) -> dict:
    """Run one variant in a fresh single-threaded interpreter; its last line is the result."""
    cmd = [sys.executable, "-m", __name__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | WORKER_ENV)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def cached_corpus(name: str, s: TradeoffSettings, cache: Path) -> Path:
    """Write the corpus once per (name, size, seed) as a .npz; reuse it afterwards."""
    size = f"g{s.genes}_n{s.train_cells + s.test_cells}" if name == "synthetic" else "pbmc68k"
    path = cache / f"{name}_{size}_seed{s.seed}.npz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        sp.save_npz(tmp, corpus_csr(name, s))
        tmp.replace(path)  # atomic: a killed run leaves no half corpus behind
    return path


def run_corpus(name: str, s: TradeoffSettings, cache: Path) -> dict:
    """Every variant on one corpus, with ratios against the full decode of the same run."""
    path = cached_corpus(name, s, cache)
    X = sp.load_npz(path)
    n_train, n_test = split_sizes(X, s)
    nnz = np.diff(X.tocsr().indptr)
    info = {"genes": X.shape[1], "train_cells": n_train, "test_cells": n_test}
    info["mean_expressed"] = float(nnz.mean())
    rows = {}
    for label, model in variants(X.shape[1], s):
        spec = {"corpus": str(path), "settings": dataclasses.asdict(s), "model": model}
        print(f"[{name}] {label} ...", flush=True)
        rows[label] = run_worker(spec)
    add_ratios(rows)
    return {"corpus": info, "rows": rows}


def add_ratios(rows: dict) -> None:
    """Speed-up (full CPU-s / variant CPU-s) and NLL change (%) against the full decode."""
    full = rows.get("full", {})
    for row in rows.values():
        if "error" in row or "error" in full:
            continue
        row["speedup_vs_full"] = full["cpu_s_per_step"] / row["cpu_s_per_step"]
        base = full["held_out_nll_per_gene"]
        row["nll_change_pct"] = 100.0 * (row["held_out_nll_per_gene"] - base) / base


def print_table(name: str, res: dict, s: TradeoffSettings) -> None:
    """One corpus: a row per variant."""
    c = res["corpus"]
    print(
        f"== {name}: G={c['genes']}, {c['mean_expressed']:.0f} expressed genes per cell, "
        f"B={s.batch}, {s.steps} steps ({s.steps * s.batch} cells seen), "
        f"{c['test_cells']} held-out cells =="
    )
    print("| variant | CPU s/step | wall s/step | speed-up | held-out NLL/gene | vs full |")
    print("|---|---|---|---|---|---|")
    for label, r in res["rows"].items():
        if "error" in r:
            print(f"| {label} | FAILED ({r['error']}) | | | | |")
            continue
        print(
            f"| {label} | {r['cpu_s_per_step']:.3f} | {r['wall_s_per_step']:.3f} | "
            f"{r.get('speedup_vs_full', float('nan')):.2f}x | "
            f"{r['held_out_nll_per_gene']:.5f} | {r.get('nll_change_pct', float('nan')):+.2f}% |"
        )


QUICK = {"genes": 300, "train_cells": 96, "test_cells": 32, "batch": 8, "steps": 3}
QUICK |= {"ks": [32], "exact_ks": [32]}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, TradeoffSettings]:
    """The command line: corpus choice, --quick, cache folder and settings overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=["synthetic", "pbmc", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="tiny corpus and 3 steps (harness test)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/atlasldm/bench")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TradeoffSettings fields")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in FIELDS:
            p.error(f"override {item!r}: expected FIELD=VALUE with FIELD one of {FIELDS}")
        values[key] = override_value(key, raw)
    return args, TradeoffSettings(**values)


FIELDS = list(TradeoffSettings.__dataclass_fields__)


def override_value(key: str, raw: str) -> int | list:
    """A settings value from text: comma lists of ints for ks and exact_ks, else an int."""
    if key in ("ks", "exact_ks"):
        return [int(v) for v in raw.split(",") if v]
    return int(raw)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the corpora's variants, print their tables and the JSON line."""
    args, s = parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(json.loads(args.worker))))
        return 0
    corpora = ["synthetic", "pbmc"] if args.corpus == "both" else [args.corpus]
    out = {"settings": dataclasses.asdict(s), "torch": torch.__version__, "corpora": {}}
    out["loadavg_start"] = list(os.getloadavg())
    for name in corpora:
        out["corpora"][name] = run_corpus(name, s, args.cache_dir)
        print_table(name, out["corpora"][name], s)
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
