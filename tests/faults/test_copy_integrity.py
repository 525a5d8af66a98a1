"""Damaged training copies are refused at open with one line naming the file (issue #11, 10).

Each case damages a private copy of the session's synthetic copy on disk, the way a bad disk,
an interrupted rsync or a stray script would, then opens it as the training stream does
(CopySource) and runs the full check (`python -m atlasldm.data.verify`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlasldm.data.config import DataConfig
from atlasldm.data.copy_files import (
    CopyDamagedError,
    copy_files,
    file_record,
    record_all,
    sampling_recipe,
)
from atlasldm.data.reader import CopySource
from atlasldm.data.rowstore import build_row_store
from atlasldm.data.validate import IngestError
from atlasldm.data.verify import main as verify_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(small_synthetic_copy, tmp_path) -> Path:
    """A private copy of the session copy, safe to damage."""
    out = tmp_path / "copy"
    shutil.copytree(small_synthetic_copy, out)
    return out


def open_copy(copy: Path) -> CopySource:
    return CopySource(DataConfig(source=str(copy)), None)


def _rewrite_npy(path: Path, change) -> None:
    np.save(path, change(np.load(path)))


def _double_library(copy: Path) -> str:
    _rewrite_npy(copy / "side/library_size.npy", lambda a: a * 2)
    return "side/library_size.npy"


def _shift_row_genes(copy: Path) -> str:
    _rewrite_npy(copy / "rows/genes.npy", lambda a: np.roll(a, 1))
    return "rows/genes.npy"


def _truncate(rel: str):
    def damage(copy: Path) -> str:
        path = copy / rel
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
        return rel

    return damage


def _garbage_npy(copy: Path) -> str:
    path = copy / "side/nnz.npy"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return "side/nnz.npy"


def _short_codes(copy: Path) -> str:
    _rewrite_npy(copy / "side/codes_cell_type.npy", lambda a: a[:-1])
    return "side/codes_cell_type.npy"


def _labels_not_utf8(copy: Path) -> str:
    path = copy / "labels.json"
    path.write_bytes(path.read_bytes().replace(b'"', b'"\xff', 1))
    return "labels.json"


def _fragment_metadata(copy: Path) -> str:
    meta = sorted((copy / "experiment/ms/RNA/X/raw").rglob("__fragment_metadata.tdb"))[0]
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    meta.write_bytes(bytes(data))
    return meta.relative_to(copy).as_posix()


DAMAGE = {
    "doubled library sizes": _double_library,
    "shifted rows/genes.npy": _shift_row_genes,
    "truncated manifest": _truncate("manifest.json"),
    "truncated side array": _truncate("side/source_joinid.npy"),
    "truncated row store": _truncate("rows/counts.npy"),
    "garbage .npy": _garbage_npy,
    "short codes array": _short_codes,
    "labels.json not UTF-8": _labels_not_utf8,
    "TileDB fragment metadata": _fragment_metadata,
}


def test_finished_copy_records_every_file(copy) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    assert sorted(manifest["files"]) == copy_files(copy)
    assert {"side/library_size.npy", "rows/counts.npy", "labels.json"} <= set(manifest["files"])
    assert any(r.endswith("__fragment_metadata.tdb") for r in manifest["files"])
    assert open_copy(copy).manifest["n_cells"] == 3000
    assert verify_main([str(copy)]) == 0


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_named_at_open_and_by_verify(copy, case, capsys) -> None:
    rel = DAMAGE[case](copy)
    with pytest.raises(IngestError) as err:
        open_copy(copy)
    message = str(err.value)
    assert rel in message and "\n" not in message, message
    assert verify_main([str(copy)]) == 1
    printed = capsys.readouterr().err.strip()
    assert rel in printed and len(printed.splitlines()) == 1, printed


def test_verify_command_prints_one_line(copy) -> None:
    _double_library(copy)
    done = subprocess.run(
        [sys.executable, "-m", "atlasldm.data.verify", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "side/library_size.npy" in done.stderr and "Traceback" not in done.stderr


def test_full_check_finds_damage_between_samples(copy) -> None:
    # A byte flipped between the sampled blocks of a file: the open-time check reads only its
    # samples (by design: cheap), the full check reads everything. Small sample blocks, so
    # that this small copy's files are sampled rather than hashed whole.
    record_all(copy, sampling_recipe(block_bytes=1024, blocks=8))
    path = copy / "rows/genes.npy"
    data = bytearray(path.read_bytes())
    assert len(data) > 64 * 1024
    data[len(data) // 2] ^= 0x01  # samples sit at 3/7 and 4/7 of the file, not at 1/2
    path.write_bytes(bytes(data))
    open_copy(copy)
    assert verify_main([str(copy), "--quick"]) == 0
    assert verify_main([str(copy)]) == 1


def _forget_records(copy: Path) -> dict:
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    old = dict(manifest)
    del manifest["files"], manifest["file_sample"]
    path.write_text(json.dumps(manifest))
    return old


def test_copy_without_records_opens_with_one_warning(copy, caplog) -> None:
    old = _forget_records(copy)
    with caplog.at_level(logging.WARNING):
        open_copy(copy)
    warnings = [r.getMessage() for r in caplog.records if "checksums" in r.getMessage()]
    assert len(warnings) == 1 and "python -m atlasldm.data.verify" in warnings[0]
    assert "--record" in warnings[0]
    assert verify_main([str(copy), "--record"]) == 0
    recorded = json.loads((copy / "manifest.json").read_text())
    assert recorded["fingerprint"] == old["fingerprint"]
    assert recorded["files"] == old["files"]  # the same records as the ingest wrote
    _double_library(copy)
    with pytest.raises(CopyDamagedError, match="side/library_size.npy"):
        open_copy(copy)


@pytest.mark.parametrize(
    "case", ["short codes array", "garbage .npy", "labels.json not UTF-8", "truncated row store"]
)
def test_copy_without_records_still_names_structural_damage(copy, case) -> None:
    _forget_records(copy)
    rel = DAMAGE[case](copy)
    with pytest.raises(CopyDamagedError, match=rel.replace(".", r"\.")):
        open_copy(copy)


def test_rebuilt_row_store_is_recorded_again(copy) -> None:
    build_row_store(copy, block_cells=700)  # other write blocks: layout.json changes
    manifest = json.loads((copy / "manifest.json").read_text())
    layout = copy / "rows/layout.json"
    assert manifest["files"]["rows/layout.json"] == file_record(layout, manifest["file_sample"])
    assert not open_copy(copy).reads_tiledb  # the rebuilt row store is used
    assert verify_main([str(copy)]) == 0
