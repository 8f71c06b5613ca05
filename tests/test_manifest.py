"""Manifests: relative paths, folders, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from posterfusion.errors import PosterFusionError
from posterfusion.manifest import load_manifest, split_genres

from helpers import write_poster


def test_paths_resolve_against_the_manifest_folder(tiny_manifest: Path) -> None:
    manifest = load_manifest(tiny_manifest)
    assert manifest.labelled and len(manifest) == 4
    assert all(Path(p).is_file() for p in manifest.paths)
    assert manifest.table["genre_list"].tolist() == [["Drama", "Comedy"], ["Horror"], [], ["Drama"]]
    assert manifest.genres() == ["Drama", "Comedy", "Horror"]
    assert "title" in manifest.table.columns  # other columns are kept


def test_a_folder_is_an_unlabelled_manifest(tmp_path: Path) -> None:
    write_poster(tmp_path / "a" / "x.jpg")
    write_poster(tmp_path / "y.png")
    (tmp_path / "notes.txt").write_text("not a poster")
    manifest = load_manifest(tmp_path)
    assert not manifest.labelled and sorted(manifest.table["poster"]) == ["a/x.jpg", "y.png"]


def test_genre_cells() -> None:
    assert split_genres(" Action | Sci-Fi ") == ["Action", "Sci-Fi"]
    assert split_genres(float("nan")) == [] and split_genres("(no genres listed)") == []


@pytest.mark.parametrize(
    "content, message",
    [
        ("image,genres\na.jpg,Drama\n", "no 'poster' column"),
        ("poster,genres\n,Drama\n", ":2: empty 'poster' path"),
        ("", "not a readable CSV"),
    ],
)
def test_bad_manifests_are_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(PosterFusionError, match=message) as info:
        load_manifest(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(PosterFusionError, match="no such manifest"):
        load_manifest(tmp_path / "nope.csv")
