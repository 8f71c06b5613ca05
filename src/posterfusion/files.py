"""File I/O at the edges, done one safe way: atomic writes, checked outputs, bounded reads.

* Every file posterfusion writes for keeps (cache parts, manifests, ONNX exports, metadata) goes
  through :func:`atomic_path`: written under a temporary name beside its target, flushed to disk,
  then renamed over it, so a crash or a full disk leaves either the old file or the new one, never
  half of one. Temporary names carry the writer's process id, so a process cleaning up a shared
  folder (:func:`remove_stale_temps`) removes only what a dead writer left behind.
* :func:`check_writable` tries an output location before a long command starts, so a typo in
  ``--plot`` costs a second, not a finished evaluation.
* :func:`read_regular_file` reads only regular files, up to a size cap: a manifest row naming
  ``/dev/zero`` or a FIFO must not exhaust memory or hang a build.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator

from .errors import PosterFusionError, is_disk_full

MAX_FILE_BYTES = 64 * 1024 * 1024
"""Largest poster file read: far above any real poster (a few MB), far below a memory problem."""

_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")


def temp_name(final: Path) -> Path:
    """A hidden temporary name beside ``final``, owned by this process (its pid is in the name).

    The leading dot keeps pyarrow and pandas from reading it as part of a Parquet folder.
    """
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path to write ``final``'s content to; on leaving the block without an error the
    file is fsynced and renamed over ``final``. On any error (a full disk included) the temporary
    file is removed and the error goes on, so nothing half-written is ever left behind. Missing
    folders above ``final`` are made."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        if is_disk_full(exc) and exc.errno is not None and exc.filename in (None, str(tmp)):
            exc.filename = str(final)  # what the user asked for, not its temporary name (a bare
            # message, as pyarrow raises, would lose its text: such errors are left as they are)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(final: str | Path, holds: tuple[str, ...]) -> Iterator[Path]:
    """A temporary folder to write ``final``'s files to (a model folder); on leaving the block
    without an error every file is fsynced and the folder takes ``final``'s place in one step, so
    a crash or a full disk at any moment leaves the old folder whole or the new one complete,
    never a mix (the weights of one training and the card of another). On any error the temporary
    folder is removed and the old one stays as it was; one a killed writer left is removed by the
    next writer of the same folder. An existing ``final`` holding anything but files matching
    ``holds`` (glob patterns: what such a folder is made of) is refused before any work starts,
    since it is replaced whole: ``--out .`` must not take the current folder with it.

    The step is an exchange of the two names (Linux's ``renameat2``): where the file system
    cannot exchange, the old folder is renamed aside and the new one into place, and a crash
    between the two renames leaves the old folder under its temporary name.
    """
    final = Path(final)
    if final.is_dir():
        foreign = sorted(p.name for p in final.iterdir() if not any(p.match(pattern) for pattern in holds))
        if foreign:
            raise PosterFusionError(f"{final}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                                    f"which is no part of what is written there ({', '.join(holds)}), and the folder "
                                    "is replaced whole; choose a new or empty folder")
    elif final.exists():
        raise PosterFusionError(f"{final}: is a file; choose a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):  # left by a killed writer
        match = _TEMP.match(stale.name)
        if match and stale.is_dir() and not _alive(int(match[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if not final.exists():
            os.replace(tmp, final)
        elif not _exchange(tmp, final):
            aside = temp_name(final)
            os.replace(final, aside)
            os.replace(tmp, final)
            tmp = aside
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder after a swap, else the unfinished new one


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    if not done and ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))
    return done


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temporary files in ``folder`` whose writer process is gone; returns them.

    A file whose writer is alive (another build on the same cache) is left alone. Names without a
    pid (written by older versions) count as stale. Pids are only meaningful on one machine, so
    processes sharing a folder over a network file system must not build at the same time.
    """
    removed = []
    for tmp in folder.glob(".*.tmp"):
        match = _TEMP.match(tmp.name)
        if match and _alive(int(match[1])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_writable(path: Path | None, option: str) -> None:
    """Raise a one-line error now if ``path`` cannot be written later: it is a folder, or the
    folder it would go in cannot be made or written to. None (an output not asked for) passes.

    The test is a real write of a temporary file into the nearest folder that exists (permission
    bits do not tell: root ignores them, and a read-only mount does not show in them); nothing is
    created for good, so a mistyped path leaves no folders behind.
    """
    if path is None:
        return
    if path.is_dir():
        raise PosterFusionError(f"{option} {path}: is a folder; give a file name")
    existing = next(folder for folder in (path.absolute().parent, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise PosterFusionError(f"{option} {path}: cannot write there ({existing} is a file, not a folder)")
    probe = temp_name(existing / path.name)
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise PosterFusionError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def check_writable_folder(folder: Path, option: str) -> None:
    """Like :func:`check_writable`, for an output that is a folder (``fusion train --out``)."""
    if folder.exists() and not folder.is_dir():
        raise PosterFusionError(f"{option} {folder}: is a file, not a folder")
    check_writable(folder / "file", option)


def read_regular_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file (symlinks followed), at most ``limit`` of them.

    Anything else (a device, a FIFO, a socket, a folder) raises ``ValueError`` naming what it is,
    without reading: ``/dev/zero`` never ends and a FIFO blocks until someone writes to it. The
    type is checked on the opened descriptor (opened non-blocking, so a FIFO cannot hang the
    open itself), so the file cannot be swapped between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > limit:
            raise ValueError(f"file too large ({info.st_size / 2**20:.0f} MB, limit {limit / 2**20:.0f} MB)")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"file too large (over the {limit / 2**20:.0f} MB limit)")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"
