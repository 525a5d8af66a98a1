"""End-to-end training with real DeepSpeed on CPU: 2 ranks, gloo, the built-in pbmc68k copy.

One 6-step fp32 VAE run at ZeRO-2 (deepspeed launcher) and one bf16 run with W&B offline are
shared by the tests. "Stop at step 3 and resume" copies a run as it was after its step-3
checkpoint (the checkpoint a stopped run writes is the same one) and resumes it, under torchrun,
`accelerate launch` or one process; at the same world size steps 4-6 must repeat exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_VAE, assert_same_export, read_run_metrics

from atlasldm.data.config import DataConfig
from atlasldm.data.stream import CellStream
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.batches import cell_batch
from atlasldm.train.checkpoint import COMPLETE, CRASH_ENV, read_latest
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    LoopConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)
from atlasldm.train.export import read_export
from atlasldm.train.loop import TrainingError, train_steps
from atlasldm.train.stage import Stage
from atlasldm.train.training_run import TrainingRun

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
TINY_DIT = [
    "model.embed_dim=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.time_freq_dim=32",
]


SHM = Path("/dev/shm")
SHM_LEFT: dict[str, set[Path]] = {}  # shared-memory files a run left behind, by fixture


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(
    script: str, args: list[str], launcher: str, env_extra: dict | None = None
) -> tuple[list[str], dict]:
    """Return (argv, environment) that start a training launcher (2 ranks unless "python")."""
    path = str(REPO / "launchers" / script)
    if launcher == "deepspeed":  # the `deepspeed` console script, without relying on PATH
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
        cmd += ["--master_port", str(_free_port()), path]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_free_port()), path]
    elif launcher == "accelerate":  # the `accelerate launch` console script
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        cmd += ["--num_processes", "2", "--main_process_port", str(_free_port()), path]
    else:
        cmd = [sys.executable, path]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})})
    return cmd + args, env


def _launch(
    script: str, args: list[str], launcher: str = "python", ok: bool = True, **env_extra: str
):
    """Run a training launcher (`env_extra` adds environment variables); return the process."""
    cmd, env = _command(script, args, launcher, env_extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def vae_run(pbmc_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished 6-step VAE run at ZeRO-2 on 2 ranks (deepspeed launcher); (run dir, args)."""
    root = tmp_path_factory.mktemp("runs")
    args = [DEBUG, *TINY_VAE, f"data.source={pbmc_copy}", f"run.root={root}", "zero.stage=2"]
    before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    _launch("train_vae.py", [*args, "run.name=full"], launcher="deepspeed")
    SHM_LEFT["vae_run"] = set(SHM.glob("deepspeed_allreduce_buffer_*")) - before
    return root / "full", args


def test_cpu_run_leaves_no_shared_memory(vae_run):
    # DeepSpeed's CPU allreduce op never unlinks its per-rank /dev/shm buffers (RAM);
    # train.distributed does at exit.
    assert "vae_run" in SHM_LEFT and not SHM_LEFT["vae_run"]


def test_vae_loss_decreases_and_export_is_complete(vae_run):
    run_dir, _ = vae_run
    metrics = read_run_metrics(run_dir)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert metrics[6]["val/nll"] < metrics[3]["val/nll"]
    assert metrics[6]["cells_seen"] == 6 * 16
    files = {p.name for p in (run_dir / "export").iterdir()}
    assert {"model.safetensors", "config.json", "genes.tsv", "labels.json", "libsize.json"} <= files
    libsize = json.loads((run_dir / "export" / "libsize.json").read_text())
    assert "CD14+ Monocyte" in libsize["log_library_size"]["cell_type"]
    assert (run_dir / "deepspeed.json").is_file() and (run_dir / "config.yaml").is_file()


def test_model_flops_of_every_step_are_logged(vae_run):
    # perf/model_tflops x step time must equal the analytic FLOPs of the step's batches: the
    # encoder term scales with the expressed genes (tokens), the decoder with cells x genes,
    # and the per-micro-batch terms with the micro-batches of all ranks.
    from atlasldm.train.config import load_config
    from atlasldm.train.throughput import vae_flops_fn
    from atlasldm.train.vae_stage import VAEStageConfig

    run_dir, _ = vae_run
    cfg = load_config(VAEStageConfig, [run_dir / "config.yaml"])
    flops = vae_flops_fn(cfg.model)
    micro = cfg.batch.global_cells // cfg.batch.micro_cells
    per_micro = flops(SimpleNamespace(num_tokens=0, num_cells=0))
    per_cell = flops(SimpleNamespace(num_tokens=0, num_cells=1)) - per_micro
    per_token = flops(SimpleNamespace(num_tokens=1, num_cells=0)) - per_micro
    for row in read_run_metrics(run_dir).values():
        if "perf/model_tflops" not in row:
            continue
        seconds = row["perf/step_s"]
        tokens = row["perf/tokens_per_s"] * seconds
        expected = per_token * tokens + per_cell * cfg.batch.global_cells + per_micro * micro
        assert row["perf/model_tflops"] * 1e12 * seconds == pytest.approx(expected, rel=1e-6)
        assert "perf/mfu" not in row  # no known peak on a CPU
    assert any("perf/model_tflops" in row for row in read_run_metrics(run_dir).values())


def _assert_same_steps(got: Path, ref: dict[int, dict], steps: tuple[int, ...]) -> None:
    """Training losses (and validation metrics) of `steps` equal bit for bit."""
    again = read_run_metrics(got)
    for step in steps:
        assert again[step]["train/loss"] == ref[step]["train/loss"], step
        for key in (k for k in ref[step] if k.startswith("val/")):
            assert again[step][key] == ref[step][key], (step, key)


def test_vae_resume_is_exact(vae_run, tmp_path, fork_run):
    run_dir, args = vae_run
    resumed = fork_run(run_dir, tmp_path / "resumed", 3)
    args = [*args, f"run.root={tmp_path}", "run.name=resumed"]
    proc = _launch("train_vae.py", args, launcher="torchrun")
    assert "resumed from step_0000003" in proc.stdout
    _assert_same_steps(resumed, read_run_metrics(run_dir), (4, 5, 6))
    assert_same_export(resumed, run_dir)


def test_sampled_decode_trains_and_resumes_exactly(pbmc_copy, tmp_path, fork_run):
    """`model.sampled_zeros`: genes drawn from the step's seed, so a resume repeats the steps."""
    args = [DEBUG, *TINY_VAE, f"data.source={pbmc_copy}", f"run.root={tmp_path}"]
    args += ["model.sampled_zeros=64", "run.max_steps=4", "run.eval_every=2"]
    args += ["checkpoint.every_steps=2"]
    _launch("train_vae.py", [*args, "run.name=full"])
    ref = read_run_metrics(tmp_path / "full")
    assert all(math.isfinite(ref[s]["train/loss"]) for s in (1, 2, 3, 4))
    assert "val/nll" in ref[4]  # validation decodes every gene
    fork_run(tmp_path / "full", tmp_path / "resumed", 2)
    proc = _launch("train_vae.py", [*args, "run.name=resumed"])
    assert "resumed from step_0000002" in proc.stdout
    _assert_same_steps(tmp_path / "resumed", ref, (3, 4))


def test_vae_resumes_at_another_world_size(vae_run, tmp_path, fork_run):
    """2 ranks -> 1 -> 2 through DeepSpeed universal checkpoints; the stream continues
    elastically (a world size's own batch order, so losses are not compared step by step)."""
    run_dir, args = vae_run
    full, root = read_run_metrics(run_dir), f"run.root={tmp_path}"
    one = fork_run(run_dir, tmp_path / "world1", 3)
    # One process; a checkpoint every step (all kept) gives a world-1 tag (step 4) to resume from.
    ckpt = ["checkpoint.every_steps=1", "checkpoint.keep_last_k=4"]
    proc = _launch("train_vae.py", [*args, root, "run.name=world1", *ckpt])
    assert "resumed from step_0000003" in proc.stdout
    two = fork_run(one, tmp_path / "world2", 4)
    proc = _launch("train_vae.py", [*args, root, "run.name=world2"], launcher="torchrun")
    assert "resumed from step_0000004" in proc.stdout
    for run, tag in ((one, "step_0000003"), (two, "step_0000004")):
        assert (run / "checkpoints" / "universal" / tag / COMPLETE).is_file()
        metrics = read_run_metrics(run)
        assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(metrics[s]["train/loss"]) for s in (4, 5, 6))
        assert metrics[6]["cells_seen"] == full[6]["cells_seen"]
        # Training continued from the loaded weights: better than the step-3 checkpoint.
        assert metrics[6]["val/nll"] < full[3]["val/nll"]


@pytest.fixture(scope="module")
def bf16_killed(pbmc_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 6-step bf16 VAE run at ZeRO-2 on 2 ranks (deepspeed launcher, W&B offline) whose rank 0
    is killed with SIGKILL in the middle of the step-6 save (all shards written, `latest` not).

    Holds the run dir, its args, the process, and what the kill left: metrics, `latest`, the
    files of the step-6 tag folder, whether an export exists.
    """
    root = tmp_path_factory.mktemp("bf16")
    args = [DEBUG, *TINY_VAE, f"data.source={pbmc_copy}", f"run.root={root}", "zero.stage=2"]
    args += ["precision.dtype=bf16", "run.name=killed"]
    env = {CRASH_ENV: "step_0000006", "WANDB_MODE": "offline"}
    proc = _launch("train_vae.py", args, launcher="deepspeed", ok=False, **env)
    run_dir = root / "killed"
    ckpt = run_dir / "checkpoints"
    return SimpleNamespace(
        run_dir=run_dir,
        args=args,
        proc=proc,
        metrics=read_run_metrics(run_dir),
        latest=read_latest(ckpt),
        step6={p.name for p in (ckpt / "step_0000006").iterdir()},
        exported=(run_dir / "export").exists(),
    )


@pytest.fixture(scope="module")
def bf16_resumed(bf16_killed) -> subprocess.CompletedProcess:
    """The killed bf16 run started again, under `accelerate launch --multi_gpu` (W&B offline)."""
    (bf16_killed.run_dir / "wandb_run_id").unlink()  # only the checkpoint can name the run now
    args = bf16_killed.args
    return _launch("train_vae.py", args, launcher="accelerate", WANDB_MODE="offline")


def test_bf16_vae_trains(bf16_killed):
    run_dir, metrics = bf16_killed.run_dir, bf16_killed.metrics
    assert json.loads((run_dir / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6], bf16_killed.proc.stderr[-3000:]
    assert all(math.isfinite(metrics[s]["train/loss"]) for s in metrics)
    assert metrics[6]["val/nll"] < metrics[3]["val/nll"]


def test_kill_during_save_keeps_the_previous_checkpoint(bf16_killed):
    assert bf16_killed.proc.returncode != 0
    assert bf16_killed.latest == "step_0000003"
    assert "rng_rank1.pt" in bf16_killed.step6  # the save had got that far...
    assert COMPLETE not in bf16_killed.step6  # ...but was not committed
    assert not bf16_killed.exported


def test_resume_after_the_kill_is_exact_under_accelerate(bf16_killed, bf16_resumed):
    """Resumes from step 3 and repeats steps 4-6 (losses and validation) bit for bit."""
    assert "resolved config (2 ranks)" in bf16_resumed.stdout
    assert "resumed from step_0000003" in bf16_resumed.stdout
    _assert_same_steps(bf16_killed.run_dir, bf16_killed.metrics, (4, 5, 6))
    assert read_latest(bf16_killed.run_dir / "checkpoints") == "step_0000006"
    assert (bf16_killed.run_dir / "export" / "model.safetensors").is_file()


def test_wandb_offline_resume_reopens_the_same_run(bf16_killed, bf16_resumed):
    run_dir = bf16_killed.run_dir
    # W&B writes one folder `offline-run-<time>-<id>` per start: the killed and the resumed one.
    ids = [p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")]
    assert len(ids) == 2 and ids[0] == ids[1] == (run_dir / "wandb_run_id").read_text(), ids


def test_sigterm_saves_then_exits(pbmc_copy, tmp_path):
    args = [DEBUG, *TINY_VAE, f"data.source={pbmc_copy}", f"run.root={tmp_path}"]
    args += ["run.name=term", "run.max_steps=10000", "run.eval_every=0", "checkpoint.every_steps=0"]
    cmd, env = _command("train_vae.py", args, "python")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    log = tmp_path / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved step" in out
    step = int(read_latest(tmp_path / "term" / "checkpoints")[5:])
    assert 2 <= step < 10000 and not (tmp_path / "term" / "export").exists()


def test_export_reload_equals_live_model(vae_run, pbmc_copy):
    """The fresh VAE from the export reproduces the live model's validation NLL."""
    run_dir, _ = vae_run
    state, config, folder = read_export(run_dir / "export")
    vae = VAE(VAEConfig(**config)).eval()
    vae.load_state_dict(state)
    live = json.loads((folder / "provenance.json").read_text())["val"]["val/nll"]
    stream = CellStream(DataConfig(source=str(pbmc_copy), val_fraction=0.1, micro_batch=8), "val")
    total, cells = 0.0, 0
    with torch.no_grad():
        for batch in stream.iter_eval():
            if batch.num_cells >= 2:  # the loop's validation skips single-cell batches too
                nll = vae.loss(cell_batch(batch, torch.device("cpu"))).nll
                total, cells = total + float(nll) * batch.num_cells, cells + batch.num_cells
    stream.close()
    assert total / cells == pytest.approx(live, rel=1e-5)


@pytest.mark.parametrize("latents", ["encode", "cache"])
def test_dit_trains_from_the_vae_export(vae_run, tmp_path, latents):
    run_dir, _ = vae_run
    args = [DEBUG, *TINY_DIT, f"run.root={tmp_path}", "run.name=dit", "run.max_steps=4"]
    args += [
        f"stage.vae_export={run_dir / 'export'}",
        "ema.start_step=2",
        f"stage.latents={latents}",
    ]
    _launch("train_dit.py", args)
    metrics = read_run_metrics(tmp_path / "dit")
    assert "val/flow_loss_ema" in metrics[4] and metrics[4]["train/loss"] > 0
    state, config, folder = read_export(tmp_path / "dit" / "export")
    assert config.pop("denoiser") == "dit"
    dit = DiT(DiTConfig(**config))
    dit.load_state_dict(state)
    conditions = json.loads((folder / "conditions.json").read_text())
    assert conditions["null_indices"]["cell_type"] == len(conditions["vocabularies"]["cell_type"])
    assert (tmp_path / "dit" / "latent_cache" / "meta.json").is_file() == (latents == "cache")


def test_classifier_trains_from_the_vae_export(vae_run, tmp_path):
    run_dir, _ = vae_run
    args = [DEBUG, f"run.root={tmp_path}", "run.name=clf", "run.max_steps=3"]
    args += [f"stage.vae_export={run_dir / 'export'}", "model.hidden_dims=[32,16]"]
    args += ["model.time_freq_dim=32"]
    code = f"from atlasldm.train.classifier_stage import main; main({args!r})"
    _, env = _command("train_vae.py", [], "python")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "val/accuracy" in read_run_metrics(tmp_path / "clf")[3]
    state, config, folder = read_export(tmp_path / "clf" / "export")
    assert config["num_classes"] == len(
        json.loads((folder / "conditions.json").read_text())["values"]
    )


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("train_vae.py", ["model.embed_dimm=8"], "embed_dimm"),
        ("train_vae.py", ["batch.global_cells=20"], "must be a positive multiple"),
        ("train_dit.py", ["stage.vae_run=missing"], "run train_vae.py first"),
    ],
)
def test_bad_config_gives_a_clear_error(script, extra, message, pbmc_copy, tmp_path):
    args = [DEBUG, f"run.root={tmp_path}", f"data.source={pbmc_copy}", *extra]
    proc = _launch(script, args, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


class _FakeEngine:
    """The engine methods the loop calls, on a plain module (a world of one, no DeepSpeed)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.device = module, torch.device("cpu")
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> None:
        return None

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, *args, **kwargs) -> None:
        pass


class _FakeStream:
    def __iter__(self):
        while True:
            yield SimpleNamespace(num_cells=4, num_tokens=8, x=torch.ones(4, 3))

    def __len__(self) -> int:
        return 1

    def state_dict(self) -> dict:
        return {}


def _nan_run(tmp_path: Path, bad_calls: set[int], max_bad_steps: int):
    module = torch.nn.Linear(3, 1)
    seen: list[torch.Tensor] = []

    def loss_fn(model, batch, gen):
        seen.append(model.weight.detach().clone())
        loss = model(batch.x).square().mean()
        return (loss * float("nan") if len(seen) in bad_calls else loss), {}

    stage = Stage("toy", module, loss_fn, _FakeStream(), export_fn=lambda *a: None)
    cfg = TrainConfig(
        run=RunConfig(max_steps=4),
        batch=BatchConfig(global_cells=4, micro_cells=4),
        precision=PrecisionConfig(dtype="fp32"),
        checkpoint=CheckpointConfig(every_steps=0),
        loop=LoopConfig(max_bad_steps),
    )
    return TrainingRun(_FakeEngine(module), stage, cfg, tmp_path), seen


def test_nan_loss_skips_the_update_and_counts_it(tmp_path):
    training, seen = _nan_run(tmp_path, bad_calls={2}, max_bad_steps=2)
    assert train_steps(training)
    state = training.state
    assert state.step == 4 and state.bad_steps == 1
    torch.testing.assert_close(seen[2], seen[1], rtol=0, atol=0)  # step 2 left weights alone
    assert not torch.equal(seen[1], seen[0])


def test_too_many_nan_steps_stop_with_a_clear_message(tmp_path):
    training, _ = _nan_run(tmp_path, bad_calls={1, 2, 3, 4}, max_bad_steps=2)
    with pytest.raises(TrainingError, match="NaN/inf loss"):
        train_steps(training)
    assert training.state.bad_steps == 3


def test_vae_zero3_matches_zero2_and_resumes_exactly(vae_run, tmp_path, fork_run):
    """ZeRO-3 partitions the VAE's weights; every parameter must still be gathered on use."""
    run_dir, args = vae_run
    z3_args = [*args, "zero.stage=3", f"run.root={tmp_path}"]
    _launch("train_vae.py", [*z3_args, "run.name=z3"], launcher="torchrun")
    zero2, zero3 = read_run_metrics(run_dir), read_run_metrics(tmp_path / "z3")
    for step in range(1, 7):
        assert zero3[step]["train/loss"] == pytest.approx(zero2[step]["train/loss"], rel=1e-5)
    resumed = fork_run(tmp_path / "z3", tmp_path / "z3_resumed", 3)
    proc = _launch("train_vae.py", [*z3_args, "run.name=z3_resumed"], launcher="torchrun")
    assert "resumed from step_0000003" in proc.stdout
    again = read_run_metrics(resumed)
    for step in (4, 5, 6):
        assert again[step]["train/loss"] == zero3[step]["train/loss"], step
