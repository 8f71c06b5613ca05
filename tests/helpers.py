"""Small builders shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image


def write_poster(path: Path, seed: int = 0, size: tuple[int, int] = (120, 180), mode: str = "RGB") -> Path:
    """A small deterministic picture: coloured noise over gradients, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, stderr exactly one 'error: ...' line holding the fragments."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``folder`` for the block (e.g. ``size=96k`` for a full disk, ``ro`` for a
    read-only place); skips the test where this process may not mount."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    ).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def assert_figure_has_content(path: Path, min_coloured: float = 0.001) -> None:
    """``path`` is a PNG figure with something drawn in colour on it (curves, bars), not only an
    empty frame: an empty or axes-only figure is black, white and grey."""
    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        assert image.width >= 300 and image.height >= 200, image.size
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2) > 60).mean()
    assert coloured >= min_coloured, f"{path}: only {coloured:.2%} of the figure is drawn in colour"


def kill_when(command: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``command`` in a session of its own and SIGKILL it with its children as soon as
    ``ready()`` (e.g. its first batch is committed); fails if it ended first or was never ready."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the command ended before it could be killed"
            assert time.monotonic() < deadline, f"not ready to be killed within {timeout} s"
            time.sleep(0.02)
        still_running = process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert still_running and process.returncode == -signal.SIGKILL
