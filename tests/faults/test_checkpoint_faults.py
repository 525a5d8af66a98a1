"""Damaged checkpoints, injected into the files of real runs, resumed by real DeepSpeed jobs.

A clean 4-step run (one rank, a checkpoint every step) is made once; each test copies it,
damages it the way a crash, a bad disk or a stray `echo > latest` would, and resumes it with
`checkpoint.resume=auto` through the loop (`ckpt_job.py`, entered like the real launchers).
The promise: no traceback; a corrupt tag is moved aside (never deleted) and the newest tag
that verifies is resumed, ending with the same weights as the clean run; a damaged `latest`
never restarts the run from step 0; when nothing verifies, one line and nothing overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import assert_same_export

from atlasldm.train.checkpoint import COMPLETE, read_latest

REPO = Path(__file__).resolve().parents[2]
TAGS = [f"step_{s:07d}" for s in range(1, 5)]
MODEL_STATES = "mp_rank_00_model_states.pt"


def launch(run: Path, *extra: str, world: int = 1) -> list[subprocess.CompletedProcess]:
    """Run ckpt_job on `world` ranks started directly (no launcher); return each rank's result."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "tests.faults.ckpt_job", "--run-dir", str(run), *extra]
    if world == 1:
        return [subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for r in range(world):
        rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world))
        rank_env.update(LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (to show nothing was rewritten)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def moved_aside(ckpt: Path, tag: str) -> list[Path]:
    return sorted(ckpt.glob(f"{tag}.corrupt-*"))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("clean") / "run"
    (result,) = launch(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_latest(run / "checkpoints") == TAGS[-1]
    return run


@pytest.fixture
def damaged(clean_run, tmp_path) -> Path:
    """A copy of the clean run without its export (the resumed run must write it again)."""
    run = tmp_path / "run"
    shutil.copytree(clean_run, run, ignore=shutil.ignore_patterns("export"))
    return run


def overwrite_4k(path: Path, offset: int = 512) -> None:
    """Overwrite 4 KiB (or up to the end) in place with random bytes; the size is unchanged."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(os.urandom(min(4096, size - offset)))
    assert path.stat().st_size == size


def scramble_tensor_data(path: Path) -> None:
    """Overwrite the tensor payloads inside a torch.save zip with random bytes, in place.

    The zip structure stays valid and torch does not check payload CRCs, so such a file loads
    without error: the silent kind of damage (a bad disk block, a bit flip)."""
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename]
    with open(path, "r+b") as fh:
        for info in records:
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            fh.write(os.urandom(info.file_size))


@pytest.mark.parametrize("damage", ["random_tensor_bytes", "truncated"])
def test_corrupt_model_states_fall_back_to_previous_tag(clean_run, tmp_path, fork_run, damage):
    """Random bytes in the tensors loaded silently before: step 4 was NaN and skipped, and the
    weights differed from the clean run. Now the tag fails its checksum, is moved aside, and the
    run resumes from the tag before it, ending with the clean run's weights."""
    damaged = fork_run(clean_run, tmp_path / "run", 3)  # a run stopped after step 3
    ckpt = damaged / "checkpoints"
    shard = ckpt / TAGS[2] / MODEL_STATES
    if damage == "random_tensor_bytes":
        scramble_tensor_data(shard)
    else:
        os.truncate(shard, shard.stat().st_size // 2)
    bad_bytes = shard.read_bytes()
    (result,) = launch(damaged)
    assert result.returncode == 0, result.stderr[-3000:]
    no_traceback(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert any(TAGS[2] in w and MODEL_STATES in w for w in warnings), result.stderr[-3000:]
    assert any(f"resuming from {TAGS[1]}" in w for w in warnings), warnings
    assert f"resumed from {TAGS[1]}" in result.stdout
    assert "non-finite" not in result.stdout
    (aside,) = moved_aside(ckpt, TAGS[2])
    assert (aside / MODEL_STATES).read_bytes() == bad_bytes  # kept as it was, for inspection
    assert read_latest(ckpt) == TAGS[-1]  # step 4 trained and saved again
    assert_same_export(damaged, clean_run)


@pytest.mark.parametrize("content", [b"", os.urandom(64) + b"\xff\xfe"], ids=["empty", "binary"])
def test_damaged_latest_resumes_newest_verified_tag(clean_run, damaged, content):
    """An empty `latest` restarted from step 1 and overwrote every tag; garbage gave a
    traceback. Now the newest tag that verifies is resumed and the older tags stay as they were."""
    ckpt = damaged / "checkpoints"
    (ckpt / "latest").write_bytes(content)
    before = {tag: digests(ckpt / tag) for tag in TAGS[:-1]}
    (result,) = launch(damaged, "--total-steps", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    no_traceback(result)
    assert f"resumed from {TAGS[-1]}" in result.stdout
    assert "WARNING" in result.stderr and "latest" in result.stderr
    assert {tag: digests(ckpt / tag) for tag in TAGS[:-1]} == before
    assert read_latest(ckpt) == "step_0000005"
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [1, 2, 3, 4, 5]  # step 1 was not trained again


def test_garbage_complete_marker_falls_back(clean_run, damaged):
    """Binary garbage in `COMPLETE` gave a traceback; now the tag is moved aside."""
    ckpt = damaged / "checkpoints"
    (ckpt / TAGS[-1] / COMPLETE).write_bytes(os.urandom(200) + b"\xff")
    (result,) = launch(damaged)
    assert result.returncode == 0, result.stderr[-3000:]
    no_traceback(result)
    assert f"resumed from {TAGS[-2]}" in result.stdout
    assert len(moved_aside(ckpt, TAGS[-1])) == 1
    assert_same_export(damaged, clean_run)


def test_no_verified_tag_stops_with_one_line_and_overwrites_nothing(damaged):
    """Every tag damaged: the run must neither load garbage nor start afresh over the tags,
    and a requeued retry must say the same again without touching anything."""
    ckpt = damaged / "checkpoints"
    for tag in TAGS:
        overwrite_4k(ckpt / tag / MODEL_STATES)
    (ckpt / "latest").write_bytes(b"")
    for attempt in range(2):
        before = digests(ckpt)
        (result,) = launch(damaged)
        assert result.returncode != 0
        no_traceback(result)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no checkpoint" in errors[0] and "verifies" in errors[0]
        assert not list(ckpt.glob("step_???????"))  # all moved aside, none re-created
        assert len(list(ckpt.glob("step_*.corrupt-*"))) == len(TAGS)
        if attempt:  # the retry renames nothing further and writes nothing
            assert digests(ckpt) == before
    assert not (damaged / "export").exists()


def test_marker_without_checksums_still_loads(clean_run, damaged):
    """Tags saved before checksums existed load, with a note, and resume exactly."""
    ckpt = damaged / "checkpoints"
    for tag in TAGS:
        meta = json.loads((ckpt / tag / COMPLETE).read_text())
        legacy = {k: meta[k] for k in ("step", "world_size", "zero_stage")}
        (ckpt / tag / COMPLETE).write_text(json.dumps(legacy))
    shutil.rmtree(ckpt / TAGS[-1])  # resume from step 3: a step is trained from a legacy tag
    (ckpt / "latest").write_text(TAGS[-2])
    (result,) = launch(damaged)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {TAGS[-2]}" in result.stdout
    assert "predates checksums" in result.stderr
    assert_same_export(damaged, clean_run)


@pytest.mark.integration
def test_two_ranks_fall_back_together(tmp_path):
    """On two ranks, rank 0 verifies and falls back; rank 1 must resume the same tag."""
    run = tmp_path / "run"
    first = launch(run, "--total-steps", "3", world=2)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:]
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    shutil.rmtree(run / "export")
    overwrite_4k(run / "checkpoints" / TAGS[2] / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    results = launch(run, "--total-steps", "3", world=2)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr[-3000:]
    assert f"resumed from {TAGS[1]}" in results[0].stdout
    assert len(moved_aside(run / "checkpoints", TAGS[2])) == 1
    assert_same_export(run, clean)
