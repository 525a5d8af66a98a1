"""GPU readiness (issue #14; docs/gpu.md): bf16 steps, attention backends, the MFU harness.

Each device test runs on "cpu" and on "cuda"; the cuda variant carries the `gpu` marker (what
`bash bench/gpu_check.sh` runs, with `-m gpu`) and is skipped where torch sees no CUDA device,
so CI runs the same assertions on CPU. Nothing here needs tests/conftest.py (the GPU image runs
pytest with --noconftest: it lacks tiledbsoma). Timings are never asserted.

Tolerances of bf16 against fp32. bf16 keeps 8 significand bits (unit roundoff 2^-8 ≈ 0.4%);
matmuls round their inputs and accumulate in fp32, and the NB terms, the normaliser and the
latent LayerNorm stay fp32 (models/likelihoods.py), so per-element errors average out in the
summed loss. On CPU bf16 (the same rounding unit) we measured a loss error of ≤ 2.3e-4 relative,
a whole-gradient L2 error of ≤ 4e-3 and ≤ 1.6e-2 for any parameter tensor holding ≥ 1% of the
largest gradient norm; the bounds below leave 4-9x headroom and still catch a bf16 likelihood or
normaliser (errors of several percent), autocast left off, or a wrong backward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from atlasldm.bench import gpu_mfu
from atlasldm.bench.gpu_mfu_row import autocast, step_count, vae_loss_fn
from atlasldm.models import attention as attn_mod
from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")]
)
DEVICES = ["cpu", CUDA]
LOSS_RTOL = 2e-3  # bf16 vs fp32 loss, relative (measured ≤ 2.3e-4)
GRAD_RTOL = 2e-2  # whole gradient, relative L2 (measured ≤ 4e-3)
TENSOR_RTOL = 6e-2  # any parameter tensor with ≥ 1% of the largest gradient norm (≤ 1.6e-2)
# Backends against sdpa: fp32 on CPU agrees to float rounding; bf16 on CUDA differs by the
# kernels' rounding (CPU bf16, reference vs sdpa: max 9e-3, mean 1.6e-3 on unit-scale latents).
BACKEND_TOL = {"fp32": (1e-5, 1e-6, 1e-6), "bf16": (5e-2, 1e-2, LOSS_RTOL)}  # max, mean, loss
FLOP_RTOL = 0.02  # analytic 3 x forward vs counted forward + backward (tests/test_flops.py)
VAE_FLOP_RTOL = 5e-3  # the tiny VAE rows: measured ≤ 1.3e-3, and a missing term costs ≥ 1.8%
HARNESS_CASES = ["vae_reference", "vae_reference_ckpt_true", "vae_census70m_sampled_2048", "dit"]


def _vae_config(**kw) -> VAEConfig:
    base = {"num_genes": 200, "embed_dim": 32, "num_layers": 2, "num_heads": 4,
            "num_cross_heads": 4, "num_latent_tokens": 8, "latent_dim": 8,
            "decode_chunk": 64}  # fmt: skip
    return VAEConfig(**(base | kw))


def _dit(device: str, **kw) -> DiT:
    cfg = DiTConfig(
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_latent_tokens=8,
        latent_dim=8,
        vocab_sizes=[5],
        time_freq_dim=64,
        **kw,
    )
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():  # off the adaLN-Zero init, so every block gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device)


def _cells(device: str, lens=(5, 60, 17, 33, 1, 48), V: int = 200) -> CellBatch:
    """Packed cells of different lengths (one of a single gene), distinct genes per cell."""
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randperm(V, generator=g)[:n] + 1 for n in lens])
    counts = torch.randint(1, 30, (sum(lens),), generator=g).float()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return CellBatch.from_packed(ids, counts, cu).to(device)


def _loss_and_grads(model, loss_fn, device: torch.device, bf16: bool) -> tuple:
    """Loss, {name: grad} and the dtype the watched layer computed in."""
    model.zero_grad(set_to_none=True)
    with autocast(device, enabled=bf16):
        loss = loss_fn()
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())
    return float(loss.detach()), grads


def _assert_bf16_close(model, loss_fn, device: torch.device, watched: torch.nn.Module) -> None:
    """bf16 autocast ran (watched layer in bf16), and loss and gradients are close to fp32."""
    seen = []
    hook = watched.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss32, g32 = _loss_and_grads(model, loss_fn, device, bf16=False)
    loss16, g16 = _loss_and_grads(model, loss_fn, device, bf16=True)
    hook.remove()
    assert torch.float32 in seen and torch.bfloat16 in seen, seen
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    assert g16.keys() == g32.keys()
    flat16, flat32 = (torch.cat([g[n].flatten() for n in g32]) for g in (g16, g32))
    assert (flat16 - flat32).norm() <= GRAD_RTOL * flat32.norm()
    top = max(g.norm() for g in g32.values())
    worst = {
        n: float((g16[n] - g).norm() / g.norm()) for n, g in g32.items() if g.norm() >= top / 100
    }
    assert max(worst.values()) <= TENSOR_RTOL, worst


@pytest.mark.parametrize("device", DEVICES)
def test_vae_bf16_step_finite_and_close_to_fp32(device: str) -> None:
    """The harness's VAE step (synthetic cells, full decode in 4 chunks) under bf16 autocast."""
    dev = torch.device(device)
    model, loss_fn = vae_loss_fn(_vae_config(), (6, 40), dev)
    with torch.no_grad():  # move the NB dispersion off its symmetric init
        model.decoder_head.theta.weight.normal_(
            1.0, 0.3, generator=torch.Generator().manual_seed(0)
        )
    _assert_bf16_close(model, loss_fn, dev, model.decoder.decoder_cross_attention.mlp.w1)


@pytest.mark.parametrize("device", DEVICES)
def test_dit_bf16_step_finite_and_close_to_fp32(device: str) -> None:
    dev = torch.device(device)
    model = _dit(device)
    z = F.layer_norm(torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(1)), (8,))
    z, labels = z.to(dev), torch.randint(0, 5, (32, 1)).to(dev)

    def loss_fn() -> torch.Tensor:  # the same t and noise on every call
        return flow_loss(model, z, labels, torch.Generator(device=dev).manual_seed(7))

    _assert_bf16_close(model, loss_fn, dev, model.blocks[0].mlp.w1)


BACKEND_PAIRS = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cuda", "reference", id="cuda-reference", marks=CUDA.marks),
    pytest.param("cuda", "flash", id="cuda-flash", marks=[*CUDA.marks, pytest.mark.skipif(
        attn_mod.flash_attn_varlen_func is None, reason="flash-attn is not installed")]),
]  # fmt: skip


def _assert_near(a: torch.Tensor, b: torch.Tensor, tol: tuple) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= tol[0] and diff.mean() <= tol[1], (diff.max(), diff.mean())


@pytest.mark.parametrize(("device", "backend"), BACKEND_PAIRS)
def test_backend_agrees_with_sdpa(device: str, backend: str) -> None:
    """Packed (varlen) and padded encoder, the gene-query decoder's loss, and the DiT, with
    ``backend`` against sdpa: fp32 on CPU, bf16 autocast on CUDA (flash needs half precision)."""
    dev, bf16 = torch.device(device), device == "cuda"
    tol = BACKEND_TOL["bf16" if bf16 else "fp32"]
    torch.manual_seed(0)
    sdpa = VAE(_vae_config(attention_backend="sdpa")).to(dev).eval()
    other = VAE(_vae_config(attention_backend=backend)).to(dev).eval()
    other.load_state_dict(sdpa.state_dict())
    dit_sdpa, dit_other = (
        _dit(device, attention_backend="sdpa"),
        _dit(device, attention_backend=backend),
    )
    cells = _cells(device)
    z, t, labels = (
        x.to(dev) for x in (torch.randn(16, 8, 8), torch.rand(16), torch.randint(0, 5, (16, 1)))
    )
    with torch.no_grad(), autocast(dev, enabled=bf16):
        mu = sdpa.encode(cells)
        _assert_near(other.encode(cells), mu, tol)  # packed
        _assert_near(other.encode(cells.padded(64)), mu, tol)  # padded, masked keys
        loss, loss_other = sdpa.loss(cells).total, other.loss(cells).total
        _assert_near(dit_other(z, t, labels), dit_sdpa(z, t, labels), tol)
    assert abs(float(loss_other) - float(loss)) <= tol[2] * abs(float(loss))


def _mfu_command(device: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "atlasldm.bench.gpu_mfu",
        "--device",
        device,
        "--tiny",
        "--seconds",
        "0.2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_mfu_harness_tiny_run(device: str, tmp_path: Path) -> None:
    """The harness end to end on tiny models: every row measured, the same keys on every device,
    FLOPs, TFLOP/s, MFU and HFU consistent, the options taking effect."""
    out = tmp_path / "mfu.json"
    cmd = _mfu_command(device, out, "--peak-tflops", "1", "--cases", *HARNESS_CASES)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == res
    assert res["complete"] and not res["failed"] and res["env"]["device"] == device
    rows = {row["name"]: row for row in res["rows"]}
    assert list(rows) == [name for name in gpu_mfu.CASE_NAMES if name in HARNESS_CASES]
    for row in rows.values():
        assert tuple(row) == gpu_mfu.ROW_KEYS and row["error"] is None, row
        assert row["steps"] >= 2 and row["step_ms"] > 0 and row["model_flops_per_step"] > 0
        tflops = row["model_flops_per_step"] / (row["step_ms"] / 1e3) / 1e12
        assert row["tflops"] == pytest.approx(tflops) and row["mfu"] == pytest.approx(tflops)
        assert row["hfu"] >= row["mfu"]
        assert (row["peak_mem_gb"] is not None) == (device == "cuda")
    base, ckpt = rows["vae_reference"], rows["vae_reference_ckpt_true"]
    assert base["decode_checkpointed"] is False and base["ratio_to_default"] == 1.0
    assert base["hardware_flops_per_step"] == base["model_flops_per_step"]
    assert ckpt["decode_checkpointed"] is True and ckpt["hfu"] > ckpt["mfu"]
    sampled = rows["vae_census70m_sampled_2048"]
    assert sampled["decoded_genes"] == 8 + 2048 // gpu_mfu.TINY_K_DIVISOR < 64
    assert sampled["model_flops_per_step"] < base["model_flops_per_step"]


def _counted_step_flops(model, loss_fn) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"checkpoint_decode": "true"},
        {"sampled_zeros": 8},
        {"sampled_zeros": 8, "sampled_normaliser": "exact"},
    ],
)
def test_row_flops_match_counted_flops(options: dict) -> None:
    """The harness's FLOPs of a row (what MFU divides) against torch's count of the same step;
    HFU's count adds the checkpointed recompute. Reference attention: FlopCounterMode does not
    count CPU SDPA kernels."""
    vae, _, _ = gpu_mfu.preset_configs("reference", tiny=True)
    cfg = dataclasses.replace(gpu_mfu.apply_options(vae, options), attention_backend="reference")
    sizes = gpu_mfu.TINY_SIZES[("vae", "reference")]
    model, loss_fn = vae_loss_fn(cfg, sizes, torch.device("cpu"))
    counted = _counted_step_flops(model, loss_fn)
    ckpt = options.get("checkpoint_decode") == "true"
    count = gpu_mfu.row_flops("vae", cfg, sizes, ckpt)
    assert count["hardware"] == pytest.approx(counted, rel=VAE_FLOP_RTOL)
    assert (count["hardware"] > count["model"]) == ckpt


def test_dit_row_flops_match_counted_flops() -> None:
    from atlasldm.bench.gpu_mfu_row import dit_loss_fn

    _, dit, _ = gpu_mfu.preset_configs("reference", tiny=True)
    cfg = dataclasses.replace(dit, attention_backend="reference")
    model, loss_fn = dit_loss_fn(cfg, 8, torch.device("cpu"))
    count = gpu_mfu.row_flops("dit", cfg, (8, 0), None)
    assert count["model"] == pytest.approx(_counted_step_flops(model, loss_fn), rel=FLOP_RTOL)


@pytest.mark.parametrize("preset", ["reference", "census70m"])
@pytest.mark.parametrize("tiny", [False, True])
def test_plain_yaml_configs_equal_build_configs(preset: str, tiny: bool, monkeypatch) -> None:
    """The GPU image's fallback (no omegaconf/tiledbsoma) resolves the presets identically."""
    from atlasldm.bench.model_presets import build_configs

    extra = gpu_mfu.TINY if tiny else {"vae": {}, "dit": {}}
    lines = [f"{g}.{k}={json.dumps(v)}" for g in ("vae", "dit") for k, v in extra[g].items()]
    vae, dit, _ = build_configs(preset, lines, quick=True)
    assert gpu_mfu.yaml_configs(preset, extra) == (vae, dit)
    assert gpu_mfu.preset_configs(preset, tiny) == (vae, dit, "build_configs")
    monkeypatch.setitem(sys.modules, "atlasldm.bench.model_presets", None)  # cannot import
    *configs, source = gpu_mfu.preset_configs(preset, tiny)
    assert configs == [vae, dit] and source.startswith("plain YAML")


def test_options_the_config_refuses_become_error_rows() -> None:
    vae = _vae_config()
    with pytest.raises(ValueError, match="no field 'no_such_field'"):
        gpu_mfu.apply_options(vae, {"no_such_field": 1})
    with pytest.raises(ValueError):
        gpu_mfu.apply_options(vae, {"num_heads": 5})  # VAEConfig's own check (32 % 5 != 0)
    assert gpu_mfu.apply_options(vae, {"sampled_zeros": 3}).sampled_zeros == 3
    args = Namespace(
        tiny=True, backend="sdpa", seconds=0.5, warmup=1, device="cpu", peak_tflops=None
    )
    configs = {"reference": gpu_mfu.preset_configs("reference", tiny=True)[:2]}
    row = gpu_mfu.run_case(("x", "vae", "reference", {"no_such_field": 1}), args, configs, 1e9)
    assert tuple(row) == gpu_mfu.ROW_KEYS and row["error"].startswith("config refused")
    row = gpu_mfu.run_case(("y", "dit", "reference", {}), args, configs, left_s=5.0)
    assert row["error"].startswith("skipped") and row["steps"] is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name: str, peak: float | None) -> None:
    assert gpu_mfu.peak_tflops(name)[0] == peak


@given(st.floats(1e-6, 1e3), st.floats(1e-3, 1e3))
def test_step_count_fills_the_seconds_within_bounds(estimate: float, seconds: float) -> None:
    n = step_count(estimate, seconds, lo=2, hi=200)
    assert 2 <= n <= 200
    if 2 < n < 200:
        assert (n - 1) * estimate < seconds <= n * estimate * (1 + 1e-12)


BAD_ARGS = [
    (["--device", "cpu"], "add --tiny"),
    (["--device", "cpu", "--tiny", "--seconds", "0"], "--seconds must be > 0"),
    (["--device", "cpu", "--tiny", "--warmup", "-1"], "--warmup must be >= 0"),
    (["--device", "cpu", "--tiny", "--backend", "flash"], "--backend flash needs"),
    (["--device", "cpu", "--tiny", "--cases", "nope"], "invalid choice: 'nope'"),
    (["--device", "cpu", "--tiny", "--out", "{tmp}/missing/mfu.json"], "create the folder first"),
]
if NO_CUDA:
    BAD_ARGS.append((["--device", "cuda"], "sees no CUDA device"))


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS)
def test_bad_input_is_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        gpu_mfu.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def _gpu_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OUT": str(tmp_path / "results")}
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-GPU refusal")
def test_gpu_check_without_a_gpu_says_so_and_writes_nothing(tmp_path: Path) -> None:
    proc = _gpu_check(tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_gpu_check_usage_mistake_is_one_line(tmp_path: Path) -> None:
    proc = _gpu_check(tmp_path, "--bogus")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_phase(tmp_path: Path) -> None:
    """The whole script on CPU (minutes: pytest inside pytest), results where $OUT says."""
    proc = _gpu_check(tmp_path, "--cpu-smoke")
    summary = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert summary["failed"] == [] and set(summary["phases"]) == {"env", "tests", "mfu"}
    for name in ("gpu_check.log", "env.json", "tests.xml", "mfu.json"):
        assert (tmp_path / "results" / name).is_file()
