"""MM-IMDb: ``dataset/<id>.json`` (``genres``, ``title``, ``plot``...) beside ``<id>.jpeg``.

The official ``split.json`` (train/dev/test ids) becomes the manifest's ``split`` column, so
results stay comparable with published MM-IMDb numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from posterfusion.errors import PosterFusionError
from posterfusion.importers.base import Record, RowProblem, parse_genres, parse_year

_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from every JSON file; ``encoding`` is unused (JSON carries its own)."""
    folder = source / "dataset" if (source / "dataset").is_dir() else source
    if not folder.is_dir():
        raise PosterFusionError(f"{source} is not a folder; pass the MM-IMDb folder with dataset/")
    files = sorted(p for p in folder.glob("*.json") if p.name != "split.json")
    if not files:
        raise PosterFusionError(f"{folder} holds no <id>.json files; is it MM-IMDb's dataset/?")
    splits: dict[str, str] = {}
    for split_file in dict.fromkeys([folder.parent / "split.json", folder / "split.json"]):
        if split_file.is_file():
            loaded = _load(split_file)
            if isinstance(loaded, RowProblem):
                yield loaded
            else:
                splits = _split_of(split_file, loaded)
                if not splits:
                    yield RowProblem(split_file, None, "not {'train': [ids], 'dev': [...], "
                                     "'test': [...]}; ignored")
    for file in files:
        data = _load(file)
        if isinstance(data, RowProblem):
            yield data
        elif not isinstance(data, dict):
            yield RowProblem(file, None, "not a JSON object")
        elif "genres" not in data:
            yield RowProblem(file, None, "no 'genres' field")
        else:
            try:
                genres = parse_genres(data["genres"])
            except ValueError as error:
                yield RowProblem(file, None, str(error))
                continue
            extras: dict[str, object] = {"id": file.stem}
            for key, value in data.items():
                if key != "genres" and _flat(value) is not None:
                    extras[key] = _flat(value)
            if splits:
                extras["split"] = splits.get(file.stem, "")
            yield Record(
                file, None, (file.stem,), genres, year=parse_year(data.get("year")),
                title_type=str(data["kind"]) if data.get("kind") else None, extras=extras,
            )


def _load(file: Path) -> object:
    try:
        return json.loads(file.read_bytes())
    except json.JSONDecodeError as error:
        return RowProblem(file, error.lineno, f"not valid JSON: {error.msg}")
    except UnicodeDecodeError:
        return RowProblem(file, None, "not UTF-8, UTF-16 or UTF-32 text")
    except OSError as error:
        return RowProblem(file, None, f"cannot read: {error.strerror}")


def _split_of(file: Path, data: object) -> dict[str, str]:
    if not isinstance(data, dict):
        return {}
    return {
        str(ident): _SPLITS[name]
        for name, ids in data.items() if name in _SPLITS and isinstance(ids, list)
        for ident in ids
    }


def _flat(value: object) -> object:
    """A CSV cell for a JSON value: scalars as they are, lists of scalars joined by ``|``."""
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return "|".join(str(v) for v in value)
    return None
