"""The model benchmark's printed summary (the JSON line with every figure is printed by
:mod:`atlasldm.bench.model`)."""

from __future__ import annotations

from atlasldm.bench.model_presets import BenchSettings
from atlasldm.models.vae import VAEConfig

MEMORY_METHOD = (
    "peak RSS (VmHWM) over the timed steps minus RSS before them, after malloc_trim and a "
    "peak-mark reset (/proc/self/clear_refs); one fresh subprocess per measurement"
)


def format_train(res: dict) -> str:
    """One training-step measurement: throughput, step time, memory, achieved rate."""
    if "error" in res:
        return f"FAILED ({res['error']})"
    first = res["first_step_mb"]
    return (
        f"{res['cells_per_s']:.2f} cells/s, {res['s_per_step']:.3f} s/step "
        f"({res['cpu_s_per_step']:.3f} CPU s), "
        f"peak RSS +{res['peak_rss_delta_mb']:.0f} MB"
        + (f" (warm-up step +{first:.0f} MB)" if first is not None else "")
        + f", ≈{res['achieved_gflops']:.1f} GFLOP/s (analytic FLOPs / time)"
    )


def report(preset: str, vae: VAEConfig, res: dict) -> None:
    """Print parameter counts and analytic FLOPs (the JSON line follows separately)."""
    p, f = res["params"], res["flops"]
    print(f"== parameters ({preset}) ==")
    print(
        f"VAE total {p['vae_total']:,} (gene table {p['vae_gene_table']:,}, θ table "
        f"{p['vae_theta_table']:,}, transformer + heads {p['vae_transformer_and_heads']:,})"
    )
    print(f"DiT {p['dit']:,}; skip-MLP {p['skip_mlp']:,}")
    lin = f["vae_train_per_cell_linear"]
    print("== analytic FLOPs (matmuls only, 2·m·n·k; training = 3 x forward) ==")
    print(
        f"VAE train FLOPs per cell = {lin['per_S']:.4g}·S + {lin['per_G']:.4g}·G + "
        f"{lin['const']:.4g}   (S expressed genes encoded, G genes decoded)"
    )
    print(
        f"  + per micro-batch (hoisted gene queries, inducing points): "
        f"{lin['step_per_G']:.4g}·G + {lin['step_const']:.4g}"
    )
    print(f"  + checkpointed decode recompute (hardware FLOPs): {f['vae_recompute_per_G']:.4g}·G")
    for S, v in f["vae_train_per_cell_at_G_vocab"].items():
        print(
            f"  S={S}, G={vae.num_genes}: {v['per_cell'] / 1e9:.3f} GFLOP/cell "
            f"(encoder {100 * v['encoder_share']:.1f}%)"
        )
    dit_mflop = f["dit_train_per_cell"] / 1e6
    print(f"DiT train FLOPs per cell = {dit_mflop:.1f} MFLOP (independent of S, G; z is given)")


def report_encoder(vae: VAEConfig, bench: BenchSettings, enc: dict) -> None:
    """Print the encoder scan: packed versus padded forward time per cell, for each S."""
    print(
        f"== encoder forward per cell (no grad, best of {bench.enc_reps}), B={bench.enc_cells}: "
        f"packed varlen (CPU reference path) vs padded to {bench.max_genes} =="
    )
    if "error" in enc:
        print(f"FAILED ({enc['error']})")
    elif enc["vocab"] != vae.num_genes:
        print(f"(scan model built with a {enc['vocab']}-gene vocabulary to hold S distinct genes)")
    for r in enc.get("rows", []):
        print(
            f"S={r['S']:>6}: packed {r['packed_ms_per_cell']:.3f} ms, padded "
            f"{r['padded_ms_per_cell']:.3f} ms, padded/packed {r['ratio']:.2f} "
            f"(analytic FLOPs: {r['analytic_packed_flops'] / 1e6:.1f} vs "
            f"{r['analytic_padded_flops'] / 1e6:.1f} MFLOP/cell, {r['analytic_ratio']:.2f})"
        )


def format_decoder_row(row: dict) -> str:
    """One G of the decoder scan: memory growth and step time of both modes, and their ratio."""
    parts = []
    for mode in ("chunked", "unchunked"):
        x = row[mode]
        parts.append(
            f"{mode} FAILED ({x['error']})"
            if "error" in x
            else f"{mode} +{x['peak_rss_delta_mb']:.0f} MB ({x['s_per_step']:.2f} s)"
        )
    ratio = row["unchunked_over_chunked"]
    return (
        f"G={row['G']:>6}: "
        + ", ".join(parts)
        + (f", unchunked/chunked {ratio:.2f}" if ratio else "")
    )


def report_measurements(vae: VAEConfig, bench: BenchSettings, res: dict) -> None:
    """Print the subprocess measurements: training steps, encoder scan, decoder scan."""
    m, threads = res["measured"], res["env"]["threads"]
    print(f"== measured on CPU ({threads} threads, fwd + bwd + AdamW; memory: {MEMORY_METHOD}) ==")
    G = min(bench.train_genes or vae.num_genes, vae.num_genes)
    print(
        f"VAE B={bench.train_cells} S={bench.train_expressed} G={G}: {format_train(m['train_vae'])}"
    )
    print(f"DiT B={bench.dit_cells}: {format_train(m['train_dit'])}")
    report_encoder(vae, bench, m["encoder"])
    print(
        f"== decoder fwd + bwd of the loss, B={bench.dec_cells}: peak RSS growth, chunked "
        f"({bench.dec_chunk}, checkpointed) vs unchunked =="
    )
    for row in m["decoder"]:
        print(format_decoder_row(row))
    report_comparison(m["decode_comparison"])


def report_comparison(rows: list[dict]) -> None:
    """Print the decode comparison: a markdown table, CPU-s per step and ratio to today's."""
    print("== VAE training step: today's decode vs the new defaults and sampled decode ==")
    print("| G | S | B | variant | CPU s/step | wall s/step | checkpointed | today / this |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for label, r in row["variants"].items():
            head = f"| {row['G']:,} | {row['S']} | {row['B']} | {label} |"
            if "error" in r:
                print(f"{head} FAILED ({r['error']}) | | | |")
                continue
            print(
                f"{head} {r['cpu_s_per_step']:.3f} | {r['s_per_step']:.3f} | "
                f"{'yes' if r['checkpointed'] else 'no'} | {r.get('today_over_this', 0):.2f}x |"
            )
