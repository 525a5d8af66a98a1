"""torch.compile as a config switch (`precision.compile`, train/compile.py) and its benchmark.

Runs that need DeepSpeed or a broken compiler happen in subprocesses: this file is also the
script they run (`python tests/test_compile.py JOB ...`, see `job_*`), so the engine is the real
DeepSpeed engine on CPU (a world of one, gloo). Compiling even a tiny model with inductor takes
minutes of cold compile on a loaded 2-core machine, so the tests that compile for real are
marked `slow`; the others only probe a compiler, break it on purpose or trace without code
generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.bench import compile as compile_bench
from atlasldm.models.batch import CellBatch
from atlasldm.models.dit import DiT, DiTConfig
from atlasldm.models.flow import flow_loss
from atlasldm.models.vae import VAE, VAEConfig
from atlasldm.train import compile as tc
from atlasldm.train.config import (
    BatchConfig,
    CheckpointConfig,
    ConfigError,
    LoggingConfig,
    PrecisionConfig,
    TrainConfig,
    ZeroConfig,
    load_config,
)
from atlasldm.train.dit_stage import DiTStageConfig
from atlasldm.train.stage import Stage
from atlasldm.train.vae_stage import VAEStageConfig

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
DEBUG = str(REPO / "configs" / "debug.yaml")
TINY_VAE = {"num_genes": 64, "embed_dim": 16, "num_layers": 1, "num_heads": 2}
TINY_VAE |= {"num_cross_heads": 2, "num_latent_tokens": 4, "latent_dim": 4}
TINY_DIT = {"vocab_sizes": [3], "embed_dim": 32, "num_layers": 1, "num_heads": 2}
TINY_DIT |= {"time_freq_dim": 32, "num_latent_tokens": 4, "latent_dim": 4}
STAGE_ARGS = [f"model.{k}={v}" for k, v in TINY_VAE.items() if k != "num_genes"]
# Tolerances of compiled against eager fp32 training (docs/compile.md, 'Equality'): inductor
# fuses and reorders sums, so the loss moves in the last bits; AdamW's first steps divide each
# gradient by its own magnitude, so an element whose gradient is at the rounding floor can move
# by up to lr per step either way: parameters are compared in relative L2, not element by element.
LOSS_RTOL = 1e-5
PARAM_REL_L2 = 1e-4


# ----- subprocess jobs (this file as a script) ------------------------------------------------
def _tiny_stage(kind: str) -> tuple[Stage, list]:
    """A tiny VAE or DiT stage (seed 0) and 3 batches (VAE: a different T every step)."""
    torch.manual_seed(0)
    if kind == "vae":
        model = VAE(VAEConfig(**TINY_VAE))
        batches = [compile_bench.varied_cells(4, 8, 64, seed) for seed in range(3)]

        def loss_fn(module, batch, gen):
            return module(batch).total, {}

    else:
        model = DiT(DiTConfig(**TINY_DIT))
        z, labels = torch.randn(4, 4, 4), torch.randint(0, 3, (4, 1))
        batches = [(z, labels)] * 3

        def loss_fn(module, batch, gen):
            return flow_loss(module, batch[0], module.drop_labels(batch[1], gen), gen), {}

    return Stage(kind, model, loss_fn, train_stream=None, export_fn=lambda *a: None), batches


def _config(switch: str, zero: int = 2) -> TrainConfig:
    return TrainConfig(
        batch=BatchConfig(global_cells=4, micro_cells=4),
        precision=PrecisionConfig(dtype="fp32", compile=switch),
        zero=ZeroConfig(stage=zero),
        checkpoint=CheckpointConfig(resume="never"),
        logging=LoggingConfig(wandb_mode="disabled", progress_bar=False),
    )


def job_open_run(kind: str, zero: int, switches: list[str]) -> None:
    """Open a real run per switch ("on:0": no steps), train 3 steps; print losses, state, diffs."""
    from atlasldm.train.distributed import init_distributed
    from atlasldm.train.loop import open_run

    init_distributed(1)
    out: dict = {"losses": {}, "compiled": {}, "wrapped": {}, "keys": {}}
    params = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in switches:
            switch, _, steps = spec.partition(":")
            stage, batches = _tiny_stage(kind)
            batches = batches[: int(steps or len(batches))]
            loss_fn = stage.loss_fn
            training, _ = open_run(stage, _config(switch, zero), Path(tmp) / switch)
            engine, losses = training.engine, []
            for i, batch in enumerate(batches):
                loss, _ = stage.loss_fn(engine.module, batch, torch.Generator().manual_seed(i))
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            block = tc.hot_block(engine.module)  # the VAE compiles its gene-query block only
            compiled = engine.is_compiled or (block is not None and block in vars(engine.module))
            out["losses"][switch], out["compiled"][switch] = losses, compiled
            out["wrapped"][switch] = stage.loss_fn is not loss_fn
            out["keys"][switch] = list(engine.module.state_dict())
            params[switch] = [p.detach().clone() for p in engine.module.parameters()]
    if len(switches) == 2:
        out["param_rel_l2"] = compile_bench._rel_l2(*params.values())
    print(json.dumps(out))


def job_stage(argv: list[str]) -> None:
    """A real VAE stage run (`train.cli.run_stage`) whose inductor C++ compiler is broken.

    Only inductor's compiler breaks, after DeepSpeed started: DeepSpeed's CPU communication op
    is a C++ extension of its own, checked with the same CXX at start-up. "auto" compiles on
    CPU here, as it does on the devices where it compiles.
    """
    from atlasldm.train import runner, vae_stage
    from atlasldm.train.cli import run_stage

    start = runner.init_distributed

    def start_then_break_the_compiler(threads: int) -> torch.device:
        device = start(threads)
        import torch._inductor.config as inductor_config

        inductor_config.cpp.cxx = (None, "/bin/false")
        return device

    runner.init_distributed = start_then_break_the_compiler
    tc.AUTO_DEVICES = frozenset({"cpu"})
    run_stage(vae_stage.main, argv)


def _job(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `python tests/test_compile.py ARGS` in a world of one, with `env` added."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base |= {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    cmd = [sys.executable, str(THIS), *args]
    return subprocess.run(cmd, cwd=REPO, env=base, capture_output=True, text=True, timeout=1200)


def _json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- the config field -------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [VAEStageConfig, DiTStageConfig])
def test_every_stage_has_the_switch_and_checks_it(schema, tmp_path):
    assert load_config(schema).precision.compile == "auto"
    for value in ("on", "off", "auto"):  # YAML reads a bare on/off as a boolean
        assert (
            load_config(schema, overrides=[f"precision.compile={value}"]).precision.compile == value
        )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("precision: {compile: on}\n")
    assert load_config(schema, [recipe]).precision.compile == "on"
    with pytest.raises(ConfigError, match="precision.compile"):
        load_config(schema, overrides=["precision.compile=fast"])
    with pytest.raises(ConfigError, match="'auto', 'on', 'off'"):
        PrecisionConfig(compile="true")


def test_auto_compiles_only_on_the_measured_devices():
    for device in (torch.device("cpu"), torch.device("meta")):
        assert tc.compile_wanted("auto", device) == (device.type in tc.AUTO_DEVICES)
        assert tc.compile_wanted("on", device) and not tc.compile_wanted("off", device)
    assert "cpu" not in tc.AUTO_DEVICES  # docs/compile.md: no gain on CPU worth the compile


# ----- a compiler fault on a real call ----------------------------------------------------------
def _failing_backend(gm, example_inputs):
    raise RuntimeError("cannot build this operator")


@pytest.fixture
def compiled_noise():
    """A loss whose compiled form cannot build; eagerly it draws noise from the generator."""
    torch.compiler.reset()

    def loss(module, batch, gen):
        return (batch * torch.randn(batch.shape, generator=gen)).sum(), {}

    yield torch.compile(loss, backend=_failing_backend)
    torch.compiler.set_stance("default")  # "auto" fell back for the whole process
    torch.compiler.reset()


def test_auto_falls_back_to_eager_with_one_warning(compiled_noise, capsys):
    call = tc.guarded(compiled_noise, "auto")
    x = torch.ones(5)
    got = [call(None, x, torch.Generator().manual_seed(s))[0] for s in (1, 2)]
    for seed, value in zip((1, 2), got, strict=True):  # the retry drew what the failed call drew
        expected = (x * torch.randn(5, generator=torch.Generator().manual_seed(seed))).sum()
        assert torch.equal(value, expected)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: torch.compile failed")
    assert "cannot build this operator" in lines[0] and "precision.compile=off" in lines[0]


def test_on_stops_with_one_line_naming_the_fix(compiled_noise):
    call = tc.guarded(compiled_noise, "on")
    with pytest.raises(tc.CompileError) as info:
        call(None, torch.ones(3), torch.Generator())
    message = str(info.value)
    assert "\n" not in message and "cannot build this operator" in message
    assert message.endswith(tc.MODEL_FIX)  # a compiler that builds the probe: switch it off


def test_the_models_own_error_is_not_blamed_on_the_compiler():
    def loss(module, batch, gen):
        raise ValueError("batch of the wrong shape")

    call = tc.guarded(torch.compile(loss, backend=_failing_backend), "on")
    with pytest.raises(ValueError, match="wrong shape"):
        call(None, torch.ones(2), torch.Generator())
    torch.compiler.reset()


def test_a_long_compiler_error_becomes_one_short_line():
    exc = RuntimeError("\n  InvalidCxxCompiler: no compiler " + "x" * 300 + "\nmore\nlines")
    line = tc._first_line(exc)
    assert line.startswith("InvalidCxxCompiler") and len(line) <= 200 and "\n" not in line


# ----- the real engine ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["vae", "dit"])
def test_off_and_auto_give_the_eager_module_and_on_compiles_in_place(kind):
    """Through `train.loop.open_run` and the real DeepSpeed engine; "on" takes no step here."""
    out = _json_line(_job("open_run", kind, "2", "off", "auto", "on:0"))
    assert out["compiled"] == {"off": False, "auto": False, "on": True}
    assert out["wrapped"] == {"off": False, "auto": False, "on": True}
    assert out["keys"]["on"] == out["keys"]["off"]  # checkpoints and exports keep their names
    assert out["losses"]["auto"] == out["losses"]["off"]  # eager, bit for bit


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["vae", "dit"])
@pytest.mark.parametrize("zero", [2, 3])
def test_on_trains_like_eager(kind, zero):
    """3 AdamW steps through the real engine, compiled and eager, from the same weights."""
    out = _json_line(_job("open_run", kind, str(zero), "off", "on"))
    assert out["compiled"] == {"off": False, "on": True}
    off, on = out["losses"]["off"], out["losses"]["on"]
    assert on == pytest.approx(off, rel=LOSS_RTOL)
    assert out["param_rel_l2"] <= PARAM_REL_L2


def _broken_stage(pbmc_copy: Path, tmp_path: Path, switch: str) -> subprocess.CompletedProcess:
    """2 steps of the tiny VAE stage with `switch`, inductor's compiler broken, nothing cached."""
    args = [DEBUG, *STAGE_ARGS, f"data.source={pbmc_copy}", f"run.root={tmp_path / 'runs'}"]
    args += ["run.max_steps=2", "run.eval_every=0", f"precision.compile={switch}"]
    return _job("stage", *args, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))


@pytest.mark.integration
def test_auto_with_a_broken_compiler_trains_eagerly_after_one_warning(pbmc_copy, tmp_path):
    proc = _broken_stage(pbmc_copy, tmp_path, "auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = [ln for ln in proc.stderr.splitlines() if "torch.compile" in ln]
    assert len(said) == 1 and said[0].startswith("warning: torch.compile failed ("), said
    assert "C++ compiler" in said[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "runs" / "vae" / "export" / "export.json").is_file()


@pytest.mark.integration
def test_on_with_a_broken_compiler_is_one_line_exit_2_and_writes_nothing(pbmc_copy, tmp_path):
    proc = _broken_stage(pbmc_copy, tmp_path, "on")
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: precision.compile=on but torch.compile failed: ")
    assert "install a C++ compiler" in errors[0] and errors[0].endswith("precision.compile=off")
    assert not (tmp_path / "runs" / "vae").exists()


# ----- the benchmark ----------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    cells=st.integers(1, 6),
    expressed=st.integers(1, 40),
    vocab=st.integers(2, 80),
    seed=st.integers(0, 9),
)
def test_varied_cells_have_distinct_genes_around_the_mean(cells, expressed, vocab, seed):
    batch = compile_bench.varied_cells(cells, expressed, vocab, seed)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    high = min(vocab, max(1, expressed * 3 // 2))
    assert batch.num_cells == cells and all(min(expressed // 2, high) <= n <= high for n in lengths)
    assert all(n >= 1 for n in lengths)
    assert batch.gene_ids.min() >= 1 and batch.gene_ids.max() <= vocab
    for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True):
        assert len(set(batch.gene_ids[a:b].tolist())) == b - a  # distinct genes per cell
    assert isinstance(batch, CellBatch) and batch.counts.min() >= 1


def test_the_benchmark_harness_runs_quick_cases(capsys):
    """Twins in fresh processes, traced without code generation (aot_eager) to stay quick."""
    argv = ["--quick", "--backend", "aot_eager", "--cases", "vae_genes,dit_model"]
    assert compile_bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["cases"]) == {"vae_genes", "dit_model"} and out["env"]["backend"] == "aot_eager"
    for res in out["cases"].values():
        assert res["graphs_first_step"] >= 1 and res["recompiles"] >= 0
        assert res["eager_cpu_s"] > 0 and res["compiled_cpu_s"] > 0 and res["compile_s"] > 0
        assert res["loss_rel_diff"] <= LOSS_RTOL and res["param_rel_l2_diff_end"] <= PARAM_REL_L2
        assert res["steps_total"] == 5  # 2 checked + 1 warm-up + 2 timed


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--cases", "vae_everything"], "unknown case(s) ['vae_everything']"),
        (["vae.num_layer=2"], "no vae field 'num_layer'"),
        (["bench.stepz=2"], "no bench field 'stepz'"),
        (["steps=2"], "is not vae.|dit.|bench.<field>=<value>"),
        (["vae.embed_dim=30"], "invalid VAEConfig"),
    ],
)
def test_a_bad_benchmark_argument_is_one_line_and_exit_2(argv, phrase, capsys):
    with pytest.raises(SystemExit) as info:
        compile_bench.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and phrase in err


if __name__ == "__main__":  # the subprocess jobs above
    job, *rest = sys.argv[1:]
    if job == "open_run":
        job_open_run(rest[0], int(rest[1]), rest[2:])
    else:
        job_stage(rest)
