"""One row of the bf16 MFU benchmark (:mod:`atlasldm.bench.gpu_mfu`), run in a fresh process.

``python -m atlasldm.bench.gpu_mfu_row SPEC_JSON`` builds the row's VAE or DiT on its device,
runs ``warmup`` steps, one calibration step, then as many timed steps as fill ``seconds``
(AdamW, forward and backward under ``torch.autocast(bfloat16)``), and prints one JSON line: the
mean and median step time (CUDA events on a GPU, perf_counter on CPU), process CPU-seconds per
step, the peak allocated GPU memory, the last loss and whether the VAE's decode was
checkpointed; or ``{"error": ...}`` when the row failed. Synthetic cells as in
:mod:`atlasldm.bench.model_worker`: S distinct random genes per cell, counts 1..19.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from atlasldm.bench.model_worker import ADAMW, synthetic_cells
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.vae import VAE, VAEConfig

MIN_STEPS, MAX_STEPS = 2, 200  # timed steps per row


def decoded_genes(cfg: VAEConfig, expressed: int) -> int:
    """Genes a VAE training step decodes per cell: all G, or S + k under ``sampled_zeros``."""
    k = min(getattr(cfg, "sampled_zeros", 0), cfg.num_genes)
    return cfg.num_genes if k == 0 else expressed + k


def autocast(device: torch.device, enabled: bool = True):
    """The bf16 autocast of a training step on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def vae_loss_fn(cfg: VAEConfig, sizes: tuple[int, int], device: torch.device):
    """(model, loss closure) of a VAE step on synthetic cells of S distinct genes each."""
    torch.manual_seed(0)
    model = VAE(cfg).to(device).train()
    batch = synthetic_cells(sizes[0], sizes[1], cfg.num_genes).to(device)
    return model, lambda: model.loss(batch).total


def dit_loss_fn(cfg: DiTConfig, cells: int, device: torch.device):
    """(model, loss closure) of a DiT flow-matching step with condition dropout."""
    torch.manual_seed(0)
    model = DiT(cfg).to(device).train()
    M, D = cfg.num_latent_tokens, cfg.latent_dim
    z = F.layer_norm(torch.randn(cells, M, D, device=device), (D,))  # (B, M, D)
    gen = torch.Generator(device=device).manual_seed(0)
    if not cfg.vocab_sizes:  # unconditional
        return model, lambda: flow_loss(model, z, None, gen)
    labels = torch.stack([torch.randint(0, v, (cells,)) for v in cfg.vocab_sizes], dim=1)
    labels = labels.to(device)  # (B, A)
    return model, lambda: flow_loss(model, z, model.drop_labels(labels, gen), gen)


def decode_checkpointed(model, spec: dict, device: torch.device) -> bool | None:
    """Whether the VAE's training decode recomputes in backward (None where it cannot say)."""
    if spec["model"] != "vae" or not hasattr(model, "checkpoints_decode"):
        return None
    rows = spec["cells"] * decoded_genes(model.config, spec["expressed"])
    with autocast(device):
        return bool(model.checkpoints_decode(rows, device))


class StepClock:
    """Marks between steps: CUDA events on a GPU (no sync in the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        """Record the current point of the device's timeline."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        """Seconds between consecutive marks (waits for the device first)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_count(estimate_s: float, seconds: float, lo: int = MIN_STEPS, hi: int = MAX_STEPS) -> int:
    """Timed steps that fill ``seconds`` at ``estimate_s`` per step, within [lo, hi]."""
    if estimate_s <= 0:
        return hi
    return max(lo, min(hi, math.ceil(seconds / estimate_s)))


def timed_steps(step: Callable[[], torch.Tensor], device: torch.device, spec: dict) -> dict:
    """Warm-up, one calibration step, then timed steps filling ``spec['seconds']``."""
    for _ in range(spec["warmup"]):
        step()
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    steps = step_count(time.perf_counter() - start, spec["seconds"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, cpu0 = StepClock(device), time.process_time()
    for _ in range(steps):
        clock.mark()
        loss = step()
    clock.mark()
    intervals = clock.intervals_s()
    cpu_s = time.process_time() - cpu0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "steps": steps,
        "step_s": sum(intervals) / steps,
        "step_ms_median": 1e3 * sorted(intervals)[steps // 2],
        "cpu_s_per_step": cpu_s / steps,
        "peak_mem_gb": peak,
        "loss": float(loss),
    }


def measure_row(spec: dict) -> dict:
    """Build the row's model on its device and time bf16-autocast training steps (AdamW)."""
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # docs/threads.md: 1 thread per process for stable figures
    if spec["model"] == "vae":
        cfg = VAEConfig(**spec["config"])
        model, loss_fn = vae_loss_fn(cfg, (spec["cells"], spec["expressed"]), device)
    else:
        cfg = DiTConfig(**spec["config"])
        model, loss_fn = dit_loss_fn(cfg, spec["cells"], device)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)

    def step() -> torch.Tensor:
        with autocast(device):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    out = timed_steps(step, device, spec)
    return out | {"decode_checkpointed": decode_checkpointed(model, spec, device)}


def row_main(spec_json: str) -> int:
    """Worker entry: measure one row, print it as one JSON line (an ``error`` if it failed)."""
    try:
        print(json.dumps(measure_row(json.loads(spec_json))))
        return 0
    except Exception as exc:  # any failure is this row's result, not a crash
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(json.dumps({"error": f"{type(exc).__name__}: {message}"}))
        return 1


if __name__ == "__main__":
    sys.exit(row_main(sys.argv[1]))
