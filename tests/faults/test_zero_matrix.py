"""Every training stage at every ZeRO stage x precision exports weights the package loads.

Each cell trains 4 steps on 2 CPU ranks (torchrun, gloo) on the pbmc68k copy, checkpointing at
step 2; the slow matrix also resumes a copy of the run from step 2 and requires the same export
bit for bit. The export is loaded with the package's own loader (`load_vae`, `load_denoiser`,
`load_classifier`) and compared with the ZeRO-0 fp32 export of the same run:

- frozen parameters (the fixed sin-cos position tables) exactly: their fp32 value never changes,
  so any difference is a rounded (bf16) or missing (ZeRO-3 partition) copy;
- trained parameters within `adam_drift_bound` (+ `start_rounding` for bf16): two runs from the
  same initial weights whose gradients differ (bf16 arithmetic, another reduction order) can
  drift apart by at most the sum of both runs' largest AdamW steps, whatever the gradients were;
  a bf16 run's fp32 masters also start from the bf16 rounding of the initial weights.

A trained ZeRO-3 module keeps its small parameters gathered after the first forward pass, which
hides a fallback to the module's own (partitioned) parameter; a fresh engine, read before any
forward, shows it, so one test reads the export and the EMA of an untrained ZeRO-3 engine.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_run_metrics

from atlasldm.models.pretrained import load_classifier, load_denoiser, load_vae, read_export
from atlasldm.train.config import OptimConfig
from atlasldm.train.optim import lr_at

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug.yaml")
STEPS = 4
SHORT = [f"run.max_steps={STEPS}", "run.eval_every=2", "checkpoint.every_steps=2"]
TINY = {
    "vae": [
        "model.embed_dim=16", "model.num_layers=1", "model.num_heads=2",
        "model.num_cross_heads=2", "model.num_latent_tokens=4", "model.latent_dim=4",
    ],
    "dit": [
        "model.embed_dim=32", "model.num_layers=1", "model.num_heads=2", "model.time_freq_dim=32",
        "ema.every=1", "ema.start_step=2",
    ],
    "skip_mlp": [
        "stage.denoiser=skip_mlp", "skip_mlp.hidden_dims=[32,16]", "skip_mlp.head_dim=32",
        "skip_mlp.time_freq_dim=32", "ema.every=1", "ema.start_step=2",
    ],
    "classifier": ["model.hidden_dims=[32,16]", "model.time_freq_dim=32"],
}  # fmt: skip
SCRIPT = {
    "vae": "train_vae.py",
    "dit": "train_dit.py",
    "skip_mlp": "train_dit.py",
    "classifier": "train_classifier.py",
}
LOADER = {
    "vae": load_vae,
    "dit": load_denoiser,
    "skip_mlp": load_denoiser,
    "classifier": load_classifier,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(stage: str, root: Path, name: str, zero: int, dtype: str, source: str) -> Path:
    """Run `stage` on 2 ranks under torchrun into root/name; return the run folder.

    `source` is the training copy (VAE) or the VAE export (the later stages read the data
    source from its provenance).
    """
    args = [DEBUG, *TINY[stage], *SHORT, f"run.root={root}", f"run.name={name}"]
    args += [f"zero.stage={zero}", f"precision.dtype={dtype}"]
    args.append(f"data.source={source}" if stage == "vae" else f"stage.vae_export={source}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(REPO / "launchers" / SCRIPT[stage]), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{stage} zero {zero} {dtype}:\n" + proc.stderr[-5000:]
    return root / name


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def adam_drift_bound(run_dir: Path) -> float:
    """Largest possible |w_a - w_b| between two runs of `run_dir`'s config from one start.

    A bias-corrected AdamW step moves a weight by lr * |m_hat| / (sqrt(v_hat) + eps). With
    m_hat = sum_k a_k g_k and v_hat = sum_k b_k g_k^2 (a_k, b_k the bias-corrected EMA weights of
    the step-k gradient), Cauchy-Schwarz gives |m_hat| / sqrt(v_hat) <= sqrt(sum_k a_k^2 / b_k)
    for any gradients. Each run moves at most the sum of these steps; two runs twice that.
    """
    cfg = _config(run_dir)
    optim = OptimConfig(**{**cfg["optim"], "betas": tuple(cfg["optim"]["betas"])})
    assert optim.weight_decay == 0.0, "the bound leaves out decoupled weight decay"
    beta1, beta2 = optim.betas
    total, steps = 0.0, int(cfg["run"]["max_steps"])
    for t in range(1, steps + 1):
        ratio = 0.0
        for k in range(1, t + 1):
            a = (1 - beta1) * beta1 ** (t - k) / (1 - beta1**t)
            b = (1 - beta2) * beta2 ** (t - k) / (1 - beta2**t)
            ratio += a * a / b
        total += lr_at(t - 1, optim, steps) * math.sqrt(ratio)
    return 2.0 * total


def start_rounding(run_dir: Path) -> float:
    """Relative error of the run's starting fp32 masters: DeepSpeed makes them from the 16-bit
    model weights, so a bf16 run starts from the initial weights rounded to 8 significant bits
    (unit roundoff 2^-8); an fp32 run starts from them exactly."""
    return 2.0**-8 if _config(run_dir)["precision"]["dtype"] == "bf16" else 0.0


def assert_matches_reference(stage: str, run_dir: Path, ref_dir: Path) -> int:
    """Load both exports with the package loader and compare; return the frozen tensor count.

    Trained weights: |w - w_ref| <= drift + u * (|w_0|), with |w_0| <= |w_ref| + drift / 2 (the
    reference moved at most half the two-run drift from the common start w_0).
    """
    model, ref = LOADER[stage](run_dir / "export"), LOADER[stage](ref_dir / "export")
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    drift, u = adam_drift_bound(ref_dir), start_rounding(run_dir)
    frozen = 0
    for name, param in want.items():
        if not param.requires_grad:
            frozen += 1
            assert torch.equal(got[name], param), f"frozen {name} differs from the fp32 table"
        else:
            atol = drift + u * drift / 2
            torch.testing.assert_close(got[name], param, rtol=u, atol=atol, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers(), strict=True))
    return frozen


def assert_same_export(a: Path, b: Path) -> None:
    """Two runs' exports hold the same tensors bit for bit."""
    wa, wb = read_export(a / "export")[0], read_export(b / "export")[0]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class Runs:
    """Trains cells on demand into one folder; the ZeRO-0 fp32 run of each stage is the
    reference, and the VAE reference's export feeds the later stages."""

    def __init__(self, root: Path, pbmc_copy: Path) -> None:
        self.root, self.pbmc_copy, self.done = root, pbmc_copy, {}

    def run(self, stage: str, zero: int, dtype: str) -> Path:
        key = (stage, zero, dtype)
        if key not in self.done:
            source = self.pbmc_copy if stage == "vae" else self.run("vae", 0, "fp32") / "export"
            self.done[key] = _train(
                stage, self.root, f"{stage}_z{zero}_{dtype}", zero, dtype, str(source)
            )
        return self.done[key]

    def reference(self, stage: str) -> Path:
        return self.run(stage, 0, "fp32")


@pytest.fixture(scope="module")
def runs(pbmc_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("zero_matrix"), pbmc_copy)


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["vae", "dit"])
def test_zero3_bf16_export_loads_and_matches_zero0_fp32(runs: Runs, stage: str):
    """Issue #11: a bf16 export held the frozen position table as its bf16 rounding, and the
    DiT's EMA, set up from the table's empty ZeRO-3 partition, crashed at step 1."""
    run_dir = runs.run(stage, 3, "bf16")
    assert sorted(read_run_metrics(run_dir)) == list(range(1, STEPS + 1))
    frozen = assert_matches_reference(stage, run_dir, runs.reference(stage))
    assert frozen > 0  # the model has a frozen table, so the exact comparison can fail


# One process, a real ZeRO-3 engine around real models, read before any forward pass: every
# parameter is an empty local partition then (later forwards leave small ones gathered, which
# hid the fallback in trained runs).
_FRESH_ENGINE = """
import json, sys
import torch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train.distributed import build_engine, consolidated_state_dict, init_distributed
from atlasldm.train.distributed import master_weights
from atlasldm.train.optim import build_optimizer
from atlasldm.train.config import OptimConfig

init_distributed()
torch.manual_seed(0)
kind, dtype = sys.argv[1], sys.argv[2]
if kind == "vae":
    cfg = VAEConfig(num_genes=32, embed_dim=16, num_layers=1, num_heads=2, num_cross_heads=2,
                    num_latent_tokens=4, latent_dim=4)
    model = VAE(cfg)
else:
    model = DiT(DiTConfig(num_latent_tokens=4, latent_dim=4, embed_dim=32, num_layers=1,
                          num_heads=2, time_freq_dim=32))
expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {"stage": 3}, "bf16": {"enabled": dtype == "bf16"},
      "zero_force_ds_cpu_optimizer": False}
engine = build_engine(model, build_optimizer(model, OptimConfig()), ds)
ema = dict(master_weights(engine))
export = consolidated_state_dict(engine)
frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
bad = [n for n in frozen if not (torch.equal(export[n], expected[n])
                                 and torch.equal(ema[n], expected[n]))]
shapes = [n for n in expected if tuple(export[n].shape) != tuple(expected[n].shape)]
print(json.dumps({"frozen": frozen, "bad": bad, "shapes": shapes}))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("vae", "fp32"),
        ("dit", "bf16"),
        pytest.param("vae", "bf16", marks=pytest.mark.slow),
        pytest.param("dit", "fp32", marks=pytest.mark.slow),
    ],
)
def test_zero3_export_and_ema_of_an_untrained_engine_hold_the_full_fp32_tables(kind, dtype):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _FRESH_ENGINE, kind, dtype]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frozen"], "the model has a frozen table, so the comparison can fail"
    assert out["shapes"] == [] and out["bad"] == []


MATRIX = [
    (stage, zero, dtype)
    for stage in ("vae", "dit", "skip_mlp", "classifier")
    for zero in (0, 1, 2, 3)
    for dtype in ("fp32", "bf16")
    if (zero, dtype) != (0, "fp32")
]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(("stage", "zero", "dtype"), MATRIX)
def test_every_stage_trains_resumes_and_exports_at_every_zero_stage_and_precision(
    runs: Runs, fork_run, stage: str, zero: int, dtype: str
):
    run_dir = runs.run(stage, zero, dtype)
    assert_matches_reference(stage, run_dir, runs.reference(stage))
    # A copy stopped after its step-2 checkpoint resumes to the same export, bit for bit.
    name = f"{run_dir.name}_resumed"
    fork_run(run_dir, run_dir.parent / name, 2)
    source = runs.pbmc_copy if stage == "vae" else runs.reference("vae") / "export"
    resumed = _train(stage, run_dir.parent, name, zero, dtype, str(source))
    assert_same_export(resumed, run_dir)
