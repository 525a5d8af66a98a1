"""A full disk under real 2-rank DeepSpeed jobs: during a save, the metrics file and the export.

The disk is real: each test runs its jobs inside a new user and mount namespace
(`unshare -rm`, no root needed where unprivileged namespaces are allowed) on a small tmpfs,
filled with a filler file to leave a chosen amount free. The jobs (`ckpt_job.py`, entered like
the real launchers) start from a copy of a clean run stopped at step 2. The two ranks are
started directly, without a launcher that would stop the second when the first exits, so each
rank must end by itself; a per-rank `timeout` kills any rank that hangs (exit 137).

The promise: every rank exits non-zero within bounded time, printing one `error:` line (no
traceback) that names the path and the space needed; `latest` still names the previous
checkpoint, and a resume after freeing space completes with the weights of the clean run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_same_export

from atlasldm.train.checkpoint import read_latest
from tests.faults.test_checkpoint_faults import launch

REPO = Path(__file__).resolve().parents[2]
RANK_TIMEOUT_S = 240  # a rank still running then counts as hung (DeepSpeed start takes < 60 s)
DISK_KIB = 4096  # the tmpfs; the clean run takes ~0.5 MiB of it

# Bash functions of the namespace scripts: `fill LEFT_KIB` leaves LEFT_KIB free on $DISK;
# `launch NAME ARGS...` runs ckpt_job on two ranks and records rc, output and wall time in $OUT.
_PRELUDE = """
set -u
mount -t tmpfs -o size=${DISK_KIB}k tmpfs "$DISK"
cp -a "$SEED" "$DISK/run"
cd "$REPO"
fill() {
  local free=$(python -c "import shutil; print(shutil.disk_usage('$DISK').free)")
  head -c $((free - $1 * 1024)) /dev/zero > "$DISK/filler"
}
launch() {
  local name=$1 port t0 r; shift
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  t0=$(date +%s.%N)
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout -s KILL $RANK_TIMEOUT python -m tests.faults.ckpt_job --run-dir "$DISK/run" "$@" \
      > "$OUT/$name.$r.out" 2> "$OUT/$name.$r.err" &
    eval "pid$r=\\$!"
  done
  wait $pid0; echo $? > "$OUT/$name.0.rc"
  wait $pid1; echo $? > "$OUT/$name.1.rc"
  echo "$(date +%s.%N) - $t0" | bc > "$OUT/$name.seconds"
}
"""


def _namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("bc") is None or not _namespaces_work(),
    reason="mounting a small tmpfs needs user and mount namespaces (unshare -rm) and bc",
)


def on_small_disk(seed: Path, out: Path, body: str, **env: str) -> Path:
    """Run bash `body` after `_PRELUDE` in a new namespace; return `out` with the run copied."""
    out.mkdir()
    disk = out.parent / "disk"
    disk.mkdir()
    script = _PRELUDE + textwrap.dedent(body) + '\ncp -a "$DISK/run" "$OUT/run"\n'
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    full_env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", DISK=str(disk), OUT=str(out))
    full_env.update(SEED=str(seed), REPO=str(REPO), DISK_KIB=str(DISK_KIB))
    full_env.update(RANK_TIMEOUT=str(RANK_TIMEOUT_S), **env)
    proc = subprocess.run(
        ["unshare", "-rm", "bash", "-c", script],
        env=full_env,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def ranks(out: Path, name: str) -> list[tuple[int, str]]:
    """(exit status, stderr) of both ranks of job `name`."""
    return [
        (int((out / f"{name}.{r}.rc").read_text()), (out / f"{name}.{r}.err").read_text())
        for r in (0, 1)
    ]


def assert_one_line_stop(out: Path, name: str, *needles: str) -> list[str]:
    """Both ranks exited by themselves, non-zero, each with one `error:` line containing
    `needles`, no traceback and no flood of lines; return the error lines."""
    lines = []
    for rc, err in ranks(out, name):
        assert rc not in (0, 137), f"rc {rc} (137: hung until killed)\n{err[-3000:]}"
        assert "Traceback" not in err and len(err.splitlines()) < 10, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err[-3000:]
        for needle in needles:
            assert needle in errors[0], errors[0]
        lines.append(errors[0])
    return lines


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A clean 2-rank run of 4 steps, a checkpoint every step (on the ordinary disk)."""
    run = tmp_path_factory.mktemp("clean") / "run"
    results = launch(run, "--total-steps", "4", world=2)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    return run


@pytest.fixture
def seed(clean, tmp_path, fork_run) -> Path:
    """The clean run as it was when stopped after its checkpoint at step 2."""
    return fork_run(clean, tmp_path / "seed", 2)


@needs_namespaces
@pytest.mark.integration
def test_save_on_full_disk_stops_every_rank_then_resume_completes(clean, seed, tmp_path):
    """With room for a shard but not a checkpoint, every rank stops before writing, with one
    line; after freeing space the same command resumes from step 2 and ends like the clean run."""
    body = """
    fill 32
    launch full --total-steps 4
    rm "$DISK/filler"
    launch resumed --total-steps 4
    """
    out = on_small_disk(seed, tmp_path / "out", body)
    ckpt = "checkpoints"
    for line in assert_one_line_stop(out, "full", "step_0000003", "disk is full", "needs about"):
        assert str(out.parent / "disk" / "run" / ckpt) in line and "step_0000002" in line
    assert [rc for rc, _ in ranks(out, "resumed")] == [0, 0], ranks(out, "resumed")[0][1][-3000:]
    assert "resumed from step_0000002" in (out / "resumed.0.out").read_text()
    assert read_latest(out / "run" / ckpt) == "step_0000004"
    assert_same_export(out / "run", clean)


@needs_namespaces
@pytest.mark.integration
def test_disk_filling_inside_deepspeed_save_ends_every_rank(seed, tmp_path):
    """The free-space check is skipped, so one rank's shard write fails inside DeepSpeed's save
    while the other waits in DeepSpeed's barrier: before, both hung until killed."""
    body = """
    fill 8
    launch full --total-steps 4
    """
    out = on_small_disk(seed, tmp_path / "out", body, ATLASLDM_NO_SPACE_CHECK="1")
    lines = assert_one_line_stop(out, "full", "step_0000003")
    assert any("disk is full" in line for line in lines), lines
    assert float((out / "full.seconds").read_text()) < RANK_TIMEOUT_S
    assert read_latest(out / "run" / "checkpoints") == "step_0000002"


@needs_namespaces
@pytest.mark.integration
def test_full_metrics_file_ends_every_rank(seed, tmp_path):
    """One 4 KiB block left and no checkpoint before the end: the metrics file fills it within
    a few steps, and the next line cannot be written."""
    body = """
    fill 4
    launch full --total-steps 60 --every 0
    """
    out = on_small_disk(seed, tmp_path / "out", body)
    metrics = out / "run" / "metrics.jsonl"
    assert_one_line_stop(out, "full", str(out.parent / "disk" / "run" / "metrics.jsonl"), "full")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[:2] == [1, 2] and steps[-1] < 60  # whole lines only, none half written
    assert read_latest(out / "run" / "checkpoints") == "step_0000002"


@needs_namespaces
@pytest.mark.integration
def test_full_disk_during_export_ends_every_rank(seed, tmp_path):
    """The run is at its last step, so only the export is left to write, into 4 KiB."""
    body = """
    fill 4
    launch full --total-steps 2
    """
    started = time.monotonic()
    out = on_small_disk(seed, tmp_path / "out", body)
    assert_one_line_stop(out, "full", "export", "disk is full", "needs about")
    assert time.monotonic() - started < 2 * RANK_TIMEOUT_S
    assert not (out / "run" / "export").exists()
    assert read_latest(out / "run" / "checkpoints") == "step_0000002"
