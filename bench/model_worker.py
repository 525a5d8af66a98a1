"""One measurement of the model benchmark, run by :mod:`atlasldm.bench.model` in a fresh process.

``python -m atlasldm.bench.model_worker SPEC_JSON``

Shape legend (docs/model.md, 'Notation'):
    B   cells        S   expressed genes per cell        G   decoded genes
    M   latent tokens        D   latent width per token

``main([spec_json])`` runs the task named in the spec and prints one JSON line. Timing uses
``time.perf_counter`` around the timed steps after the warm-up steps. Memory: freed heap is
trimmed and the kernel's peak-RSS mark (VmHWM) reset to the current RSS (Linux
``/proc/self/clear_refs`` = 5) right before the measured steps; the figure is the peak after them
minus the RSS at the reset, i.e. what the steps allocate (activations, gradients, transient
buffers), not the interpreter, torch or the weights. ``peak_reset`` says whether the reset worked
(without it the figure hides anything below the import-time peak). The decoder scan runs with a
fixed glibc mmap threshold (set by the parent) so freed buffers leave the RSS at once.
Synthetic cells have exactly S distinct random genes with counts 1..19, so the packed and padded
layouts hold the same tokens.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from atlasldm.data.heap import release_freed_heap
from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.vae import VAE, VAEConfig

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0}  # docs/model.md, 'Training recipes'


def peak_rss_mb() -> float:
    """Peak resident set of this process image in MiB (VmHWM; ru_maxrss without /proc).

    ``ru_maxrss`` also covers the pre-exec image of a forked child (here: a copy of the parent's
    RSS) and cannot be reset, so VmHWM, the same kernel mark for the current image, is read.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024.0  # kB -> MiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> tuple[float, bool]:
    """Trim freed heap, reset the peak mark to the current RSS; return (RSS MiB, was reset)."""
    gc.collect()
    release_freed_heap()  # the baseline is live memory, not freed heap pages
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM := current RSS
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, True
    except OSError:
        return peak_rss_mb(), False


def synthetic_cells(cells: int, genes: int, vocab: int, seed: int = 0) -> CellBatch:
    """Packed batch of ``cells`` cells with ``genes`` distinct tokens in 1..vocab each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(vocab, generator=g)[:genes] + 1 for _ in range(cells)])
    counts = torch.randint(1, 20, (cells * genes,), generator=g).float()  # (T,)
    cu = torch.arange(cells + 1, dtype=torch.int32) * genes  # (B+1,)
    return CellBatch.from_packed(ids, counts, cu)


def timed_steps(step: Callable[[], None], warmup: int, steps: int, cells: int) -> dict:
    """Warm-up then timed steps: cells/s, s/step and two peak-RSS growths.

    ``first_step_mb``: growth over the warm-up, from the end of setup (one-time runtime
    initialisation and the AdamW state included). ``peak_rss_delta_mb``: growth over the timed
    steps from the RSS after the warm-up (activations, gradients, transient buffers).
    """
    base, was_reset = reset_peak_rss()
    for _ in range(warmup):
        step()
    first = peak_rss_mb() - base if warmup else None
    base, _ = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "cells_per_s": cells * steps / elapsed,
        "s_per_step": elapsed / steps,
        "cpu_s_per_step": cpu / steps,  # process CPU time: steadier than wall on a shared host
        "peak_rss_delta_mb": peak_rss_mb() - base,
        "first_step_mb": first,
        "peak_reset": was_reset,
    }


def train_vae(spec: dict) -> dict:
    """VAE forward + backward + AdamW at B = train_cells, S = train_expressed, G = train_genes."""
    cfg, b = VAEConfig(**spec["vae"]), spec["bench"]
    torch.manual_seed(0)
    vae = VAE(cfg).train()
    batch = synthetic_cells(b["train_cells"], b["train_expressed"], cfg.num_genes)
    genes = min(b["train_genes"] or cfg.num_genes, cfg.num_genes)
    gene_ids = torch.arange(1, genes + 1) if genes < cfg.num_genes else None  # (G,) or all
    opt = torch.optim.AdamW(vae.parameters(), **ADAMW)

    seeds = iter(range(10**6))  # a fresh gene sample per step under sampled_zeros

    def step() -> None:
        gen = torch.Generator().manual_seed(next(seeds))
        vae.loss(batch, gene_ids, gen).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = timed_steps(step, b["warmup"], b["steps"], b["train_cells"])
    decoded = genes if not cfg.sampled_zeros else b["train_expressed"] + cfg.sampled_zeros
    ckpt = vae.checkpoints_decode(batch.num_cells * min(decoded, genes), torch.device("cpu"))
    return res | {"G": genes, "checkpointed": ckpt}


def train_dit(spec: dict) -> dict:
    """DiT flow-matching step (condition dropout, forward, backward, AdamW) at B = dit_cells."""
    cfg, b = DiTConfig(**spec["dit"]), spec["bench"]
    torch.manual_seed(0)
    dit = DiT(cfg).train()
    B = b["dit_cells"]
    z = F.layer_norm(torch.randn(B, cfg.num_latent_tokens, cfg.latent_dim), (cfg.latent_dim,))
    labels = torch.stack([torch.randint(0, v, (B,)) for v in cfg.vocab_sizes], dim=1)  # (B, A)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(dit.parameters(), **ADAMW)

    def step() -> None:
        flow_loss(dit, z, dit.drop_labels(labels, gen), gen).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, b["warmup"], b["steps"], B)


def encoder_scan(spec: dict) -> dict:
    """Encode forward time per cell, packed (varlen) vs padded to max_genes, for each S."""
    b = spec["bench"]
    vocab = max(spec["vae"]["num_genes"], max(b["enc_genes"]))  # room for S distinct genes
    cfg = VAEConfig(**(spec["vae"] | {"num_genes": vocab}))
    torch.manual_seed(0)
    vae, B, reps = VAE(cfg).eval(), b["enc_cells"], b["enc_reps"]
    rows = []
    for S in b["enc_genes"]:
        packed = synthetic_cells(B, S, vocab)
        padded = packed.padded(max(b["max_genes"], S))  # (B, max_genes) with mask
        row: dict = {"S": S, "padded_len": int(padded.gene_ids.shape[1])}
        for name, batch in (("packed", packed), ("padded", padded)):
            times = []
            with torch.no_grad():
                vae.encode(batch)  # warm-up
                for _ in range(reps):
                    start = time.perf_counter()
                    vae.encode(batch)
                    times.append(time.perf_counter() - start)
            # best of reps: the machine is shared, the minimum is the least disturbed run
            row[f"{name}_ms_per_cell"] = 1e3 * min(times) / B
            row[f"{name}_ms_per_cell_median"] = 1e3 * sorted(times)[len(times) // 2] / B
        row["ratio"] = row["padded_ms_per_cell"] / row["packed_ms_per_cell"]
        rows.append(row)
    return {"rows": rows, "vocab": vocab}


def decoder_memory(spec: dict) -> dict:
    """Loss forward + backward over G genes (vocabulary = G), chunked+checkpointed or not."""
    b, G, chunked = spec["bench"], spec["genes"], spec["mode"] == "chunked"
    cfg = dataclasses.replace(
        VAEConfig(**spec["vae"]),
        num_genes=G,
        decode_chunk=b["dec_chunk"] if chunked else G,
        checkpoint_decode=chunked,
    )
    torch.manual_seed(0)
    vae = VAE(cfg).train()
    S = min(b["train_expressed"], G // 2)
    batch = synthetic_cells(b["dec_cells"], S, G)
    warm = torch.arange(1, min(G, 256) + 1)  # (256,) genes: a cheap warm-up of the runtime
    step_genes = [warm, None]  # warm-up on a few genes, then the measured step on all G

    def step() -> None:
        vae.loss(batch, step_genes.pop(0)).total.backward()
        vae.zero_grad(set_to_none=True)  # gradients are part of every measured step

    res = timed_steps(step, 1, 1, b["dec_cells"])
    res.pop("first_step_mb")  # the warm-up decoded 256 genes only
    return res | {"S": S, "decode_chunk": cfg.decode_chunk}


TASKS = {
    "train_vae": train_vae,
    "train_dit": train_dit,
    "encoder": encoder_scan,
    "decoder": decoder_memory,
}


def main(argv: Sequence[str]) -> int:
    """Run the task of the JSON spec in ``argv[0]``; print its result as one JSON line."""
    torch.set_num_threads(1)  # one thread per process: stable figures on a shared host
    spec = json.loads(argv[0])
    print(json.dumps(TASKS[spec["task"]](spec) | {"threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
