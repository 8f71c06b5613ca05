"""Shared fixtures: synthetic posters for fast tests, real posters for the slow ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_poster

REPO = Path(__file__).resolve().parents[1]
POSTERS = REPO.parent / "shared" / "data" / "movieposters"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_manifest() -> Path:
    """The shared labelled posters; slow tests skip where the folder is absent."""
    labels = POSTERS / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"real posters not found at {POSTERS}")
    return labels


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """Four synthetic posters with genres, listed by relative path."""
    for i in range(4):
        write_poster(tmp_path / "img" / f"p{i}.jpg", seed=i)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "poster,genres,title\nimg/p0.jpg,Drama|Comedy,a\nimg/p1.jpg,Horror,b\nimg/p2.jpg,,c\nimg/p3.jpg,Drama,d\n"
    )
    return manifest
