"""posterfusion.files: atomic writes, writer-owned temporary files, bounded reads of regular files
only, and output paths checked before the work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from helpers import tmpfs

from posterfusion.errors import PosterFusionError, is_disk_full
from posterfusion.files import (
    MAX_FILE_BYTES, atomic_folder, atomic_path, check_writable, check_writable_folder, read_regular_file,
    remove_stale_temps, temp_name,
)


def test_atomic_path_replaces_the_file_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(tmp_path / "new" / "folder" / "out.txt") as tmp:  # folders made as needed
        tmp.write_text("deep")
    assert (tmp_path / "new" / "folder" / "out.txt").read_text() == "deep"


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_atomic_folder_replaces_the_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    model = tmp_path / "model"
    with atomic_folder(model, ("*.json", "*.bin")) as staging:
        (staging / "card.json").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (model / "card.json").read_text() == "1"
    with pytest.raises(OSError), atomic_folder(model, ("*.json", "*.bin")) as staging:
        (staging / "weights.bin").write_text("2")
        raise OSError(errno.ENOSPC, "No space left on device")  # after the weights, before the card
    assert sorted(p.name for p in model.iterdir()) == ["card.json"] and (model / "card.json").read_text() == "1"
    with atomic_folder(model, ("*.json", "*.bin")) as staging:
        (staging / "card.json").write_text("3")
        (staging / "weights.bin").write_text("3")
    assert sorted(p.name for p in model.iterdir()) == ["card.json", "weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old folder and the staging folder are gone


def test_atomic_folder_refuses_a_folder_holding_other_files_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PosterFusionError, match="notes.txt.*new or empty folder"), atomic_folder(tmp_path, ("*.json",)):
        pytest.fail("the block must not run")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_killed_writers_staging_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".model.{dead.stdout.strip()}-0123abcd.tmp"
    left.mkdir()
    (left / "card.json").write_text("half")
    with atomic_folder(tmp_path / "model", ("*.json",)) as staging:
        (staging / "card.json").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    mine = temp_name(tmp_path / "part-1.parquet")
    mine.write_bytes(b"in flight")
    dead = tmp_path / f".part-2.parquet.{_dead_pid()}-0123abcd.tmp"
    dead.write_bytes(b"left by a killed writer")
    legacy = tmp_path / ".part-3.parquet.tmp"  # no pid: written before pids were in the names
    legacy.write_bytes(b"old")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([dead, legacy])
    assert mine.exists()


@pytest.mark.parametrize("message", ["[Errno 28] No space left on device", "IOError: No space left on device. Detail: ..."])
def test_disk_full_is_recognised_with_or_without_errno(message: str) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(message))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("No space left on device"))


def test_regular_files_and_symlinks_to_them_are_read(tmp_path: Path) -> None:
    poster = tmp_path / "poster.jpg"
    poster.write_bytes(b"\xff\xd8 poster bytes")
    link = tmp_path / "link.jpg"
    link.symlink_to(poster)
    assert read_regular_file(poster) == read_regular_file(link) == b"\xff\xd8 poster bytes"


def test_devices_fifos_and_folders_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes to it: reading it would block forever
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    for path, kind in (("/dev/zero", "a character device"), (link, "a character device"), (fifo, "a FIFO"),
                       (tmp_path, "a folder")):
        with pytest.raises(ValueError, match=f"not a regular file \\({kind}\\)"):
            read_regular_file(path)


def test_files_above_the_cap_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(ValueError, match="file too large"):
        read_regular_file(big, limit=1000)
    assert len(read_regular_file(big, limit=1001)) == 1001
    assert MAX_FILE_BYTES >= 32 * 2**20  # far above any real poster


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can create files in: permission bits, or for root (whom they do not stop)
    a read-only tmpfs."""
    folder = tmp_path / "read-only"
    if os.geteuid() == 0:
        with tmpfs(folder, "ro,size=64k"):
            yield folder
        return
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_unwritable_outputs_are_refused_before_the_work(tmp_path: Path, read_only_folder: Path) -> None:
    a_file = tmp_path / "metrics.json"
    a_file.write_text("{}")
    cases = [
        (read_only_folder / "pr.png", "cannot write there"),
        (a_file / "pr.png", "cannot write there"),  # its folder would be a file
        (tmp_path, "is a folder"),
    ]
    for path, fragment in cases:
        with pytest.raises(PosterFusionError, match=fragment) as caught:
            check_writable(path, "--plot")
        assert str(caught.value).startswith(f"--plot {path}: ")
    with pytest.raises(PosterFusionError, match="is a file, not a folder"):
        check_writable_folder(a_file, "--out")
    check_writable(tmp_path / "new" / "deeper" / "pr.png", "--plot")  # folders the write will make
    check_writable(None, "--plot")  # not asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "read-only"]  # nothing left behind


def test_onnx_exports_clean_up_after_killed_exporters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from posterfusion import onnx_runtime

    monkeypatch.setenv("POSTERFUSION_ONNX_CACHE", str(tmp_path))
    dead = tmp_path / f".old.onnx.{_dead_pid()}-0123abcd.tmp"
    dead.write_bytes(b"half an export")
    live = temp_name(tmp_path / "other.onnx")  # another process exporting right now
    live.write_bytes(b"in flight")
    assert onnx_runtime.load(torch.nn.Linear(3, 2), "linear", "sha", (1, 3)) is not None
    assert not dead.exists() and live.exists()
