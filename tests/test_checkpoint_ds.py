"""DeepSpeed checkpoint/resume on CPU with real launchers (torchrun, 2 ranks, gloo).

Each uninterrupted 8-step run is launched once per ZeRO stage (module fixtures). A "stop at step
4" is taken from that run by copying its folder up to `step_0000004` and pointing `latest` at it:
the checkpoint a stopped run writes at step 4 is the same one. The kill test stops a real job.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from atlasldm.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    Snapshot,
    prune,
    read_latest,
    save_checkpoint,
    tag_for,
    write_latest,
)
from atlasldm.train.export import read_export
from atlasldm.train.preempt import Preemption
from atlasldm.train.resume import ResumePoint, find_resume, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "ds_toy_job.py"


def _launch(run_dir: Path, stage: int, world: int, *extra: str, ok: bool = True):
    log = run_dir.parent / f"{run_dir.name}_{world}_{len(list(run_dir.parent.iterdir()))}.jsonl"
    args = [str(JOB), "--run-dir", str(run_dir), "--stage", str(stage), "--loss-log", str(log)]
    if world == 1:  # plain python: the single-process fallback of train.distributed
        cmd = [sys.executable, *args, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(world), *args, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, _losses(log)


def _losses(log: Path) -> dict[int, dict]:
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _assert_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, _, _ = read_export(a / "export")
    wb, _, _ = read_export(b / "export")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)
    ema_a = json.loads((a / "export" / "ema.json").read_text())
    ema_b = json.loads((b / "export" / "ema.json").read_text())
    for key in ema_a:
        torch.testing.assert_close(
            torch.tensor(ema_a[key]), torch.tensor(ema_b[key]), rtol=0, atol=atol
        )


def _assert_losses(got: dict, ref: dict, steps: range, exact: bool) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        if exact:  # same world size: bit for bit, RNG included
            assert got[step] == ref[step], step
        else:
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("ds")
    out = {}
    for stage in (2, 3):
        run = root / f"base{stage}"
        _, losses = _launch(run, stage, 2)
        assert sorted(losses) == list(range(1, 9))
        out[stage] = (run, losses)
    return out


@pytest.mark.integration
def test_kill_during_save_keeps_previous_then_exact_resume(baselines, tmp_path):
    base, ref = baselines[2]
    run = tmp_path / "killed"
    proc, first = _launch(run, 2, 2, "--kill-at", "4", ok=False)
    assert proc.returncode != 0
    assert sorted(first) == [1, 2, 3, 4]
    ckpt = run / "checkpoints"
    assert read_latest(ckpt) == "step_0000002"
    assert (ckpt / "step_0000004").is_dir() and not (ckpt / "step_0000004" / COMPLETE).exists()
    _, resumed = _launch(run, 2, 2)
    _assert_losses(resumed, ref, range(3, 9), exact=True)
    _assert_weights(run, base)


@pytest.mark.integration
def test_zero3_exact_resume(baselines, tmp_path, fork_run):
    base, ref = baselines[3]
    run = fork_run(base, tmp_path / "z3", 4)
    _, resumed = _launch(run, 3, 2)
    _assert_losses(resumed, ref, range(5, 9), exact=True)
    _assert_weights(run, base)


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_world_2_to_1_to_2(baselines, tmp_path, stage, fork_run):
    base, ref = baselines[stage]
    one = fork_run(base, tmp_path / "w1", 4)
    _, resumed = _launch(one, stage, 1)  # 2 -> 1 ranks via universal checkpoint
    _assert_losses(resumed, ref, range(5, 9), exact=False)
    _assert_weights(one, base, atol=1e-5)
    if stage == 3:
        return  # 1 -> 2 is checked once (ZeRO-2) to keep the suite short
    two = fork_run(one, tmp_path / "w2", 6)
    _, resumed = _launch(two, stage, 2)  # 1 -> 2 ranks
    _assert_losses(resumed, ref, range(7, 9), exact=False)
    _assert_weights(two, base, atol=1e-5)


def _tensors(obj: object, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor nested in a loaded checkpoint object, by its key path."""
    if torch.is_tensor(obj):
        return {path: obj}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else []
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors(value, f"{path}/{key}"))
    return out


def _tag_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of a tag's engine shards and EMA by file and path, the client state)."""
    tensors, client = {}, {}
    for path in sorted(folder.glob("*.pt")):
        if path.name.startswith("rng_"):  # the RNG moves on every step, skipped or not
            continue
        obj = torch.load(path, map_location="cpu", weights_only=False)
        tensors.update({path.name + k: v for k, v in _tensors(obj).items()})
        if "bad_steps" in obj:
            client = obj
    return tensors, client


@pytest.mark.integration
def test_nan_step_leaves_weights_and_optimizer_state_unchanged(tmp_path):
    """The loop's NaN guard on a real engine (bf16, ZeRO-2, 2 ranks, 2 micro-batches per step):
    in step 3 one micro-batch of one rank has a NaN loss. (ZeRO-3 takes the same path.)"""
    run = tmp_path / "nan"
    args = ("--loop", "--nan-at", "3", "--total-steps", "4", "--dtype", "bf16")
    proc, _ = _launch(run, 2, 2, *args)
    assert "step 3: non-finite loss, update skipped (1)" in proc.stdout
    (before, c2), (skipped, c3), (after, c4) = (
        _tag_state(run / "checkpoints" / tag_for(s)) for s in (2, 3, 4)
    )
    assert (c2["bad_steps"], c3["bad_steps"], c4["bad_steps"]) == (0, 1, 1)
    adam = [k for k in before if k.endswith(("/exp_avg", "/exp_avg_sq", "/step"))]
    assert adam and any("ema.pt" in k for k in before) and before.keys() == skipped.keys()
    # Weights (fp32 masters and 16-bit copies), Adam moments and step counts, EMA: bit for bit.
    assert [k for k in before if not torch.equal(before[k], skipped[k])] == []
    # The next, finite step updates them again (the comparison can see a change).
    assert all(not torch.equal(skipped[k], after[k]) for k in adam)
    # metrics.jsonl marks the skipped step instead of logging a fake 0.0 loss for it.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in lines if "train/loss" in r or r.get("skipped")}
    assert steps[3].get("skipped") is True and "train/loss" not in steps[3]
    assert all(math.isfinite(steps[s]["train/loss"]) and "skipped" not in steps[s] for s in (2, 4))


@pytest.mark.integration
def test_ema_averages_the_fp32_master_weights_under_bf16(tmp_path):
    """A bf16 engine's EMA (copy phase) equals its fp32 masters, not their bf16 copies."""
    run, common = tmp_path / "bf16", ("--loop", "--dtype", "bf16", "--total-steps", "4")
    _launch(run, 2, 1, *common, "--ema-start", "100")  # before start_step the EMA copies
    # Export the same checkpoint again without EMA: the consolidated fp32 master weights.
    _launch(run, 2, 1, *common, "--no-ema", "--export-only", "--export-name", "masters")
    ema, _, _ = read_export(run / "export")
    masters, _, _ = read_export(run / "masters")
    assert ema.keys() == masters.keys()
    # The masters hold updates below bf16 resolution, so the comparison can tell them apart.
    assert any(not torch.equal(w, w.bfloat16().float()) for w in masters.values())
    for key in masters:
        torch.testing.assert_close(ema[key], masters[key], rtol=0, atol=0, msg=key)


class _DiskFullEngine:
    """Stands in for a DeepSpeed engine whose shard write hits a full disk."""

    def zero_optimization_stage(self) -> int:
        return 2

    def save_checkpoint(self, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def _complete(ckpt: Path, step: int) -> None:
    folder = ckpt / f"step_{step:07d}"
    folder.mkdir(parents=True)
    (folder / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))


def test_disk_full_keeps_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _complete(ckpt, 2)
    write_latest(ckpt, "step_0000002")
    with pytest.raises(CheckpointError, match="disk is full") as info:
        save_checkpoint(_DiskFullEngine(), tmp_path, Snapshot(4, {"data": {"position": 0}}))
    assert "step_0000002" in str(info.value) and "step_0000004" in str(info.value)
    assert read_latest(ckpt) == "step_0000002"


def test_missing_or_incomplete_checkpoint_errors(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert find_resume(tmp_path, "auto", 1) is None
    assert find_resume(tmp_path, "never", 1) is None
    _complete(ckpt, 2)
    (ckpt / "step_0000004").mkdir()
    with pytest.raises(CheckpointError, match=r"step_0000009.*checkpoint\.resume"):
        find_resume(tmp_path, "step_0000009", 2)
    with pytest.raises(CheckpointError, match=r"step_0000004.*incomplete.*step_0000002"):
        find_resume(tmp_path, "step_0000004", 2)
    point = find_resume(tmp_path, "step_0000002", 1)
    assert point.universal and point.saved_world == 2


def test_prune_keeps_last_k_complete(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _complete(ckpt, step)
    (ckpt / "step_0000003").mkdir()  # debris of a crashed save
    write_latest(ckpt, "step_0000008")
    assert prune(ckpt, 2) == ["step_0000002", "step_0000003", "step_0000004"]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000006", "step_0000008"]


def test_sigterm_sets_flag_only(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_requested = Preemption(timeout_s=float("inf")).install_handler().stop_requested
        assert not stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives; the loop saves and exits
        assert stop_requested()
    finally:
        signal.signal(signal.SIGTERM, previous)


class _CorruptEngine:
    """Stands in for an engine whose shard files cannot be unpickled."""

    optimizer = SimpleNamespace(param_groups=[])

    def load_checkpoint(self, *args, **kwargs) -> None:
        raise RuntimeError("PytorchStreamReader failed reading zip archive")


def test_corrupt_checkpoint_error_names_tag_and_fix(tmp_path):
    folder = tmp_path / "checkpoints" / "step_0000004"
    point = ResumePoint("step_0000004", folder, folder.parent, 2, universal=False)
    with pytest.raises(CheckpointError, match=r"step_0000004.*corrupt.*checkpoint\.resume="):
        load_checkpoint(_CorruptEngine(), point)
