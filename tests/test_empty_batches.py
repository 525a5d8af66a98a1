"""Empty (B = 0) micro-batches at an epoch tail, and cell-weighted gradients across ranks.

A rank whose micro-batch has no cells runs the stage loss on a one-cell stand-in with weight 0
(ZeRO-3 gathers and gradient hooks stay in lockstep), and every rank's loss is weighted by its
cells, so a ragged tail step is the step one rank would take on the union of the batches.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_run_metrics
from torch import nn

from atlasldm.data.batch import CsrBatch
from atlasldm.data.config import DataConfig
from atlasldm.data.sampler import LockstepSampler
from atlasldm.data.stream import CellStream
from atlasldm.models.classifier import ClassifierConfig, NoisyLatentClassifier
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.batches import cell_batch, stand_in_batch
from atlasldm.train.classifier_stage import make_classifier_loss
from atlasldm.train.config import BatchConfig, PrecisionConfig, RunConfig, TrainConfig
from atlasldm.train.dit_stage import make_flow_loss
from atlasldm.train.latents import LatentSource, lookup
from atlasldm.train.stage import Stage
from atlasldm.train.step import cell_weight, one_step
from atlasldm.train.step_metrics import log_step
from atlasldm.train.training_run import TrainingRun
from atlasldm.train.vae_stage import vae_loss

REPO = Path(__file__).resolve().parents[1]
GENES = 20
NAMES = ("cell_type",)


def _batch(cells: int, seed: int = 0) -> CsrBatch:
    """A random CsrBatch of `cells` cells (0 allowed) with 3 expressed genes each."""
    rng = np.random.default_rng(seed)
    ids = [rng.choice(np.arange(1, GENES), 3, replace=False) for _ in range(cells)]
    counts = rng.integers(1, 6, size=3 * cells)
    return CsrBatch.from_numpy(
        np.concatenate([np.zeros(0), *ids]),
        counts,
        np.arange(cells + 1) * 3,
        np.full(cells, 50.0),
        np.zeros((cells, 1)),
        NAMES,
        np.arange(cells),
    )


def _vae() -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(
        num_genes=GENES,
        embed_dim=16,
        num_layers=1,
        num_heads=2,
        num_cross_heads=2,
        num_latent_tokens=4,
        latent_dim=4,
    )
    return VAE(cfg)


class _Engine:
    """The engine calls of `one_step` on a plain module, one rank, accumulating like DeepSpeed
    (minus its 1/accum loss factor): `grads` holds the gradients summed over a step."""

    def __init__(self, module: nn.Module, accum: int) -> None:
        self.module, self.accum, self.micro = module, accum, 0
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
        self.device = torch.device("cpu")
        self.grads: dict[str, torch.Tensor | None] = {}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            self.grads = {
                n: None if p.grad is None else p.grad.clone()
                for n, p in self.module.named_parameters()
            }
            self.module.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> None:
        return None


def _step(batches: list[CsrBatch]) -> tuple[TrainingRun, dict, bool]:
    """One loop step of the tiny VAE over `batches` (one micro-batch each); (run, metrics of
    this rank, skipped). `run.engine.grads` holds the step's gradients."""
    cfg = TrainConfig(
        run=RunConfig(max_steps=10),
        batch=BatchConfig(global_cells=4 * len(batches), micro_cells=4),
        precision=PrecisionConfig(dtype="fp32"),
    )
    engine = _Engine(_vae(), accum=len(batches))
    stage = Stage(
        name="vae", model=engine.module, loss_fn=vae_loss, train_stream=None, export_fn=None
    )
    training = TrainingRun(engine, stage, cfg, Path("unused"))
    torch.manual_seed(1)  # the VAE's reparameterisation noise
    local, skipped = one_step(training, iter(batches))
    return training, local, skipped


def _logged(training: TrainingRun, local: dict, tmp_path: Path) -> dict:
    """What `log_step` writes to metrics.jsonl for the step metrics `local` (one rank)."""
    training.run_dir = tmp_path
    training.state.step += 1  # as the loop counts the step before logging it
    log_step(training, dict(local), None)
    return json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_cell_weight_is_exactly_one_for_equal_batches():
    assert cell_weight(7, 14.0, 2) == 1.0 and cell_weight(63, 252.0, 4) == 1.0
    assert cell_weight(3, 4.0, 2) == 1.5 and cell_weight(1, 4.0, 2) == 0.5
    assert cell_weight(0, 1.0, 2) == 0.0
    assert cell_weight(0, 0.0, 2) == 0.0  # every rank empty: nothing to weigh


def test_cell_weighted_rank_mean_is_the_union_mean():
    # DeepSpeed's gradient is the mean over ranks; with the weights it is the union's gradient.
    torch.manual_seed(0)
    net, x, y = nn.Linear(4, 1), torch.randn(5, 4), torch.randn(5, 1)

    def grad(loss: torch.Tensor) -> torch.Tensor:
        net.zero_grad()
        loss.backward()
        return net.weight.grad.clone()

    union = grad(nn.functional.mse_loss(net(x), y))
    for sizes in ((3, 2), (4, 1), (5, 0)):
        bounds = np.cumsum([0, *sizes])
        total = 0.0
        for r, n in enumerate(sizes):
            part = slice(bounds[r], bounds[r + 1])
            loss = nn.functional.mse_loss(net(x[part]), y[part]) if n else net(x[:1]).sum()
            total = total + cell_weight(n, float(sum(sizes)), len(sizes)) * loss
        torch.testing.assert_close(grad(total / len(sizes)), union, rtol=1e-6, atol=1e-7)


def test_empty_micro_batch_gives_zero_gradients_and_no_metrics(tmp_path):
    training, local, skipped = _step([_batch(0)])
    real, _, _ = _step([_batch(4)])
    engine = training.engine
    assert not skipped
    # The stand-in ran the whole backward: the same parameters got gradients, all exactly 0.
    assert {n for n, g in engine.grads.items() if g is not None} == {
        n for n, g in real.engine.grads.items() if g is not None
    }
    assert all(torch.all(g == 0) for g in engine.grads.values() if g is not None)
    assert (local["cells"], local["tokens"], local["flops"]) == (0.0, 0.0, 0.0)
    assert local["train/loss"] == 0.0  # a per-cell sum: the stand-in's loss is left out
    logged = _logged(training, local, tmp_path)
    assert math.isnan(logged["train/loss"]) and logged["cells_seen"] == 0  # no 0.0 loss


def test_empty_micro_batch_is_left_out_of_the_step(tmp_path):
    real = _batch(4)
    training, local, _ = _step([real, _batch(0)])
    alone, _, _ = _step([real])
    grads = training.engine.grads
    for name, grad in alone.engine.grads.items():  # weight 1 on the real cells, 0 on the stand-in
        assert (grad is None) == (grads[name] is None), name
        if grad is not None:
            assert torch.equal(grads[name], grad), name
    model = _vae()
    torch.manual_seed(1)  # the noise the step drew for the real batch
    with torch.no_grad():
        expected, metrics = vae_loss(model, real, torch.Generator())
    logged = _logged(training, local, tmp_path)
    assert local["cells"] == 4.0 and logged["cells_seen"] == 4
    assert logged["train/loss"] == pytest.approx(float(expected), rel=1e-6)
    for key, value in metrics.items():
        assert logged[f"train/{key}"] == pytest.approx(value, rel=1e-6), key


def test_stand_in_runs_through_the_latent_stage_losses():
    """The DiT and classifier losses take the stand-in, encoded or looked up in a cache."""
    vae = _vae().eval()
    stand_in = stand_in_batch(_batch(0))
    assert stand_in.num_cells == 1 and stand_in.conditions.shape == (1, 1)
    cache = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float32)
    encoders = {
        "encode": lambda batch, dev: vae.encode(cell_batch(batch, dev)).float(),
        "cache": lambda batch, dev: lookup(cache, batch.soma_joinid, dev),
    }
    stats = {"mean": 0.0, "std": 1.0}
    dit_cfg = DiTConfig(
        num_latent_tokens=4,
        latent_dim=4,
        embed_dim=32,
        num_layers=1,
        num_heads=2,
        time_freq_dim=32,
        vocab_sizes=[3],
    )
    classifier_cfg = ClassifierConfig(
        num_latent_tokens=4, latent_dim=4, num_classes=3, hidden_dims=[8], time_freq_dim=8
    )
    dit, classifier = DiT(dit_cfg), NoisyLatentClassifier(classifier_cfg)
    for name, encode in encoders.items():
        for net, make in ((dit, make_flow_loss), (classifier, make_classifier_loss)):
            latents = LatentSource(encode, stats)
            loss, _ = make(latents)(net, stand_in, torch.Generator().manual_seed(0))
            (loss * 0.0).backward()
            assert torch.isfinite(loss), (name, type(net).__name__)


# --- real multi-process runs ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _toy_loop(run_dir: Path, world: int, sizes: str, micro: int) -> dict[int, dict]:
    job = [str(REPO / "tests" / "ds_toy_job.py"), "--loop", "--run-dir", str(run_dir)]
    job += ["--loss-log", str(run_dir) + ".jsonl", "--total-steps", "2", "--no-ema"]
    job += ["--sizes", sizes, "--micro-cells", str(micro)]
    if world == 1:
        _run([sys.executable, *job])
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
        _run([*launch, "--master_port", str(_free_port()), *job])
    return read_run_metrics(run_dir)


@pytest.mark.integration
def test_two_ranks_with_unequal_batches_step_like_one_rank_on_their_union(tmp_path):
    """torchrun, 2 ranks of 3 and 1 cells per micro-batch (ZeRO-2, 2 micro-batches per step)
    vs one rank with their 4 cells: same gradient norm, loss and next step."""
    two = _toy_loop(tmp_path / "two", 2, "3,1", micro=2)
    one = _toy_loop(tmp_path / "one", 1, "4", micro=4)
    assert sorted(two) == sorted(one) == [1, 2]
    for step in (1, 2):
        for key in ("train/loss", "grad_norm"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
        assert two[step]["cells_seen"] == one[step]["cells_seen"] == 8 * step


# The pbmc68k copy's 631 training cells (val_fraction 0.1, seed 0) in chunks of C = 315, K = 1:
# one full round of 630 cells (5 batches of 63 per rank), then a 1-cell tail that rank 0 takes
# while rank 1 gets an empty batch. An epoch is 6 steps; step 7 starts the next one.
TAIL = {"micro": 63, "chunk": 315, "k": 1, "steps": 7}


def _tail_batch_sizes(copy: Path) -> tuple[int, list[list[int]]]:
    """(training cells, each rank's batch sizes in epoch 0) of the TAIL layout, from the sampler."""
    data = DataConfig(source=str(copy), val_fraction=0.1, drop_last=False, reader_threads=0)
    stream = CellStream(data, "train", 0, 2)
    cells = stream.num_cells
    stream.close()
    sizes = []
    for rank in range(2):
        sampler = LockstepSampler(
            cells,
            TAIL["chunk"],
            TAIL["k"],
            TAIL["micro"],
            2,
            rank,
            data.seed,
            drop_last=False,
        )
        sizes.append([int(n) for plan in sampler.rounds(0) for n in plan.batch_sizes])
    return cells, sizes


@pytest.mark.integration
def test_vae_zero3_epoch_tail_with_an_empty_rank(pbmc_copy, tmp_path):
    """deepspeed launcher, 2 ranks, ZeRO-3: rank 1's last batch of the epoch has 0 cells."""
    cells, sizes = _tail_batch_sizes(pbmc_copy)
    assert len(sizes[0]) == len(sizes[1]) == TAIL["steps"] - 1  # same steps on both ranks
    tail_step = len(sizes[0])
    assert sizes[1][-1] == 0 and sizes[0][-1] > 0, sizes  # the configuration tests what it claims
    tiny = [
        "model.embed_dim=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.num_cross_heads=2",
        "model.num_latent_tokens=4",
        "model.latent_dim=4",
    ]
    args = [
        str(REPO / "configs" / "debug.yaml"),
        *tiny,
        f"data.source={pbmc_copy}",
        f"run.root={tmp_path}",
        "run.name=tail",
        "zero.stage=3",
        "data.drop_last=false",
        f"batch.micro_cells={TAIL['micro']}",
        f"batch.global_cells={2 * TAIL['micro']}",
        f"data.micro_batch={TAIL['micro']}",  # the stage sets it too, after K*C % b is checked
        f"data.chunk_cells={TAIL['chunk']}",
        f"data.chunks_per_rank_round={TAIL['k']}",
        f"run.max_steps={TAIL['steps']}",
        "run.eval_every=0",
        "checkpoint.every_steps=0",
        "run.threads_per_rank=3",  # not the automatic 1: the log below proves the key arrives
    ]
    launch = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    launch += ["--master_port", str(_free_port()), str(REPO / "launchers" / "train_vae.py")]
    proc = _run([*launch, *args])
    assert "non-finite loss" not in proc.stdout
    assert "threads per rank: 3 (" in proc.stdout + proc.stderr
    metrics = read_run_metrics(tmp_path / "tail")
    assert sorted(metrics) == list(range(1, TAIL["steps"] + 1))
    assert all(math.isfinite(m["train/loss"]) and m["train/loss"] > 0 for m in metrics.values())
    # Every training cell once in the epoch, the stand-in never counted.
    assert metrics[tail_step]["cells_seen"] == cells
    assert metrics[tail_step]["cells_seen"] - metrics[tail_step - 1]["cells_seen"] == 1
    assert (tmp_path / "tail" / "export" / "model.safetensors").is_file()
