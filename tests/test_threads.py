"""Torch threads per rank: the count rule, its inputs, and what real 2-rank jobs end up with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlasldm.train import distributed
from atlasldm.train.config import ConfigError, RunConfig, TrainConfig, load_config
from atlasldm.train.distributed import (
    local_world_size,
    rank_threads,
    set_rank_threads,
    usable_cores,
)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "ds_toy_job.py"


@pytest.mark.parametrize(
    ("cores", "local", "override", "omp", "expected"),
    [
        (2, 2, 0, None, 1),  # this box: one core per rank
        (64, 8, 0, None, 8),
        (3, 2, 0, None, 1),  # the remainder core stays free rather than oversubscribed
        (1, 4, 0, None, 1),  # more ranks than cores: still one thread each
        (8, 1, 0, None, 8),  # a plain process gets every core
        (16, 0, 0, None, 16),  # a nonsense local size counts as one rank
        (2, 2, 0, "4", 4),  # an exported OMP_NUM_THREADS beats the automatic share
        (64, 8, 0, "6,2", 6),  # nested OpenMP levels: the outermost count
        (2, 2, 0, "", 1),  # set but empty: automatic
        (2, 2, 0, "0", 1),
        (2, 2, 0, "many", 1),
        (2, 2, 3, None, 3),  # the config override
        (2, 2, 3, "1", 3),  # the config override beats OMP_NUM_THREADS
        (64, 8, 2, "8", 2),
    ],
)
def test_rank_threads(cores, local, override, omp, expected) -> None:
    assert rank_threads(cores, local, override, omp) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 1),
        ({"LOCAL_SIZE": "4"}, 4),  # the deepspeed launcher
        ({"LOCAL_WORLD_SIZE": "8"}, 8),  # torchrun
        ({"LOCAL_WORLD_SIZE": "8", "LOCAL_SIZE": "4"}, 8),
        ({"LOCAL_WORLD_SIZE": "", "LOCAL_SIZE": "3"}, 3),
    ],
)
def test_local_world_size(env, expected) -> None:
    assert local_world_size(env) == expected


def test_usable_cores_follows_affinity(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("env", "override", "expected"),
    [
        ({"LOCAL_SIZE": "2"}, 0, 3),
        ({"LOCAL_WORLD_SIZE": "3", "OMP_NUM_THREADS": "5"}, 0, 5),
        ({"LOCAL_WORLD_SIZE": "3", "OMP_NUM_THREADS": "5"}, 4, 4),
    ],
)
def test_set_rank_threads_sets_torch_and_logs(
    monkeypatch, capsys, restore_threads, env, override, expected
) -> None:
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    interop: list[int] = []  # torch allows one inter-op change per process: keep pytest's
    monkeypatch.setattr(distributed, "_set_interop_threads", interop.append)
    assert set_rank_threads(override) == expected
    assert torch.get_num_threads() == expected
    assert interop == [expected]
    local = local_world_size()
    assert (
        capsys.readouterr().out == f"threads per rank: {expected} (cores 6, local ranks {local})\n"
    )


def test_set_rank_threads_silent_off_rank_zero(monkeypatch, capsys, restore_threads) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "_set_interop_threads", lambda threads: None)
    set_rank_threads(1)
    assert capsys.readouterr().out == ""


def test_threads_per_rank_config() -> None:
    assert RunConfig().threads_per_rank == 0
    cfg = load_config(TrainConfig, overrides=["run.threads_per_rank=3"])
    assert cfg.run.threads_per_rank == 3
    with pytest.raises(ConfigError, match="threads_per_rank"):
        load_config(TrainConfig, overrides=["run.threads_per_rank=-1"])
    with pytest.raises(ConfigError, match="threads_per_rank"):
        load_config(TrainConfig, overrides=["run.threads_per_rank=two"])


# ---- real 2-rank jobs (the toy DeepSpeed job, 2 optimiser steps) ------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_toy(tmp_path: Path, launcher: str, omp: str | None, override: int) -> tuple[list, str]:
    """Train the toy job on 2 ranks; return (per-rank thread records, stdout)."""
    log = tmp_path / "threads"
    args = [str(JOB), "--run-dir", str(tmp_path / "run"), "--loss-log", str(tmp_path / "l.jsonl")]
    args += ["--total-steps", "2", "--stop-at", "2", "--threads-log", str(log)]
    args += ["--threads-per-rank", str(override)]
    port = ["--master_port", str(_free_port())]
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", *port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *port]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(WANDB_MODE="disabled", **({"OMP_NUM_THREADS": omp} if omp is not None else {}))
    proc = subprocess.run(
        cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(log.glob("rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1]
    return records, proc.stdout


@pytest.mark.integration
def test_deepspeed_launcher_auto_threads(tmp_path) -> None:
    """No OMP_NUM_THREADS, no override: each rank gets its share of the cores (LOCAL_SIZE)."""
    records, stdout = _run_toy(tmp_path, "deepspeed", omp=None, override=0)
    expected = max(1, usable_cores() // 2)
    for rec in records:
        assert (rec["threads"], rec["local_ranks"], rec["omp_num_threads"]) == (expected, 2, None)
    line = f"threads per rank: {expected} (cores {usable_cores()}, local ranks 2)"
    assert stdout.count(line) == 1, stdout[-3000:]  # rank 0 only


@pytest.mark.integration
def test_torchrun_config_beats_omp_num_threads(tmp_path) -> None:
    """torchrun exports OMP_NUM_THREADS=1 to each rank; run.threads_per_rank=3 still wins."""
    records, _ = _run_toy(tmp_path, "torchrun", omp="1", override=3)
    for rec in records:
        assert (rec["threads"], rec["local_ranks"], rec["omp_num_threads"]) == (3, 2, "1")
