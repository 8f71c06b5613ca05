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


def test_combine_joins_collections_with_their_source_and_drops_repeats(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from posterfusion.manifest_cli import manifest_app

    for folder, names in (("a", ["x.jpg", "y.jpg"]), ("b", ["z.jpg", "y2.jpg"])):
        for name in names:
            write_poster(tmp_path / folder / "posters" / name)
    (tmp_path / "a" / "labels.csv").write_text("poster,genres,split,imdb_id\nposters/x.jpg,Drama,train,\n"
                                               "posters/y.jpg,Horror,test,tt0000002\n")
    (tmp_path / "b" / "labels.csv").write_text(f"poster,genres,imdb_id\nposters/z.jpg,Comedy,\n{tmp_path}/a/posters/x.jpg,Drama,\n"
                                               "posters/y2.jpg,Horror,tt0000002\n")  # the test film's other poster
    out = tmp_path / "out" / "all.csv"
    out.parent.mkdir()
    result = CliRunner().invoke(manifest_app, ["combine", str(tmp_path / "a" / "labels.csv"),
                                               str(tmp_path / "b" / "labels.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 posters" in result.output and "2 posters listed again (same file or IMDb id) left out" in result.output
    manifest = load_manifest(out)
    assert [Path(p).name for p in manifest.paths] == ["x.jpg", "y.jpg", "z.jpg"]
    assert all(Path(p).is_file() for p in manifest.paths)
    assert manifest.table["source"].tolist() == [str(tmp_path / "a" / "labels.csv")] * 2 + [str(tmp_path / "b" / "labels.csv")]
    assert manifest.table["split"].fillna("").tolist() == ["train", "test", ""]
