"""Model FLOPs of a training micro-batch and model FLOPs utilisation (MFU) against a peak.

Model FLOPs are the analytic counts of `models/flops.py` for the trained network, forward plus
backward (3 x forward); recomputation and the frozen VAE encoder of stage 2 are not counted, as
is usual for MFU. Peaks are dense bf16/fp16 tensor-core figures of the device (TF32 for fp32
runs), from the vendors' data sheets; `logging.peak_tflops` overrides them (and enables MFU on
any device, the CPU included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atlasldm.data.batch import CsrBatch
from atlasldm.models.dit import DiTConfig
from atlasldm.models.flops import TRAIN_FACTOR, dit_forward_flops, vae_linear_form
from atlasldm.models.skip_mlp import SkipMLPConfig
from atlasldm.models.vae import VAEConfig

FlopsFn = Callable[[CsrBatch], float]

# Dense peak TFLOP/s per GPU: (bf16/fp16, tf32). Matched by substring of the device name.
PEAK_TFLOPS = {
    "H200": (989.0, 494.5),
    "H100": (989.0, 494.5),  # SXM; the PCIe card is lower: set logging.peak_tflops
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
}


def decoded_genes(cfg: VAEConfig, batch: CsrBatch) -> tuple[int, int]:
    """(genes decoded with backward, genes decoded forward only) per cell of a training step.

    The full decode runs every gene forward and backward. The sampled decode (`sampled_zeros`)
    runs the longest cell's expressed genes (the padded width) plus the k sampled ones, and its
    exact normaliser adds a forward-only pass over every gene.
    """
    G, k = cfg.num_genes, cfg.sampled_zeros
    if k <= 0:
        return G, 0
    lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    return longest + min(k, G), G if cfg.sampled_normaliser == "exact" else 0


def vae_flops_fn(cfg: VAEConfig) -> FlopsFn:
    """Return batch -> training FLOPs of the VAE (encode the expressed genes, decode)."""
    form = vae_linear_form(cfg, TRAIN_FACTOR)

    def flops(batch: CsrBatch) -> float:
        trained, forward_only = decoded_genes(cfg, batch)
        G = trained + forward_only / TRAIN_FACTOR  # a forward is 1/3 of a training pass
        per_cell = form["per_G"] * G + form["const"]
        per_step = form["step_per_G"] * G + form["step_const"]
        return form["per_S"] * batch.num_tokens + per_cell * batch.num_cells + per_step

    return flops


def denoiser_flops_fn(cfg: DiTConfig | SkipMLPConfig) -> FlopsFn:
    """Return batch -> training FLOPs of the DiT (skip MLP: its linear layers)."""
    if isinstance(cfg, DiTConfig):
        per_cell = TRAIN_FACTOR * dit_forward_flops(cfg).cell_total()
    else:
        n = cfg.num_latent_tokens * cfg.latent_dim
        dims = [n, *cfg.hidden_dims]
        down = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
        up = sum(a * b for a, b in zip(cfg.hidden_dims[1:], cfg.hidden_dims[:-1], strict=True))
        head = cfg.hidden_dims[0] * cfg.head_dim + cfg.head_dim * n
        h0, freq = cfg.hidden_dims[0], cfg.time_freq_dim or cfg.hidden_dims[0]
        # each layer adds a projection of the (B, h0) time embedding; then the timestep MLP
        emb = h0 * (sum(cfg.hidden_dims) + sum(cfg.hidden_dims[:-1])) + freq * h0 + h0 * h0
        per_cell = TRAIN_FACTOR * 2.0 * (down + up + head + emb)
    return lambda batch: per_cell * batch.num_cells


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> float | None:
    """Return the device's dense peak TFLOP/s for `dtype`, the override, or None if unknown."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return half if dtype in ("bf16", "fp16") else tf32
    return None


def throughput_metrics(flops: float, seconds: float, world: int, peak: float | None) -> dict:
    """Return perf/model_tflops (all ranks) and, with a known per-device peak, perf/mfu."""
    achieved = flops / max(seconds, 1e-9) / 1e12
    out = {"perf/model_tflops": achieved}
    if peak:
        out["perf/mfu"] = achieved / (peak * world)
    return out
