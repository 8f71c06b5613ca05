"""Where per-poster records (predictions, audits) go, a batch at a time: the terminal or a pipe, or
a results file that a rerun completes. A :class:`Layout` says how one kind of record is written.

Every format is written as each batch finishes, so a reader downstream (``| head``, a log, a
database loader) works while the run goes on, and a run killed over a catalogue has kept all
but the batch in flight:

* ``--out FILE.csv`` / ``FILE.jsonl``: each batch is appended in one write, flushed and fsynced.
  A kill can cut the last line short; the next run removes that piece before appending.
* ``--out FILE.parquet``: a Parquet file cannot be appended to, so each batch is written as a part
  in ``FILE.parquet.parts/`` (through :func:`~posterfusion.files.atomic_path`), and at the end of
  a run, interrupted or not, the file and the parts are merged into a new ``FILE.parquet``,
  again atomically. After a ``kill -9`` the parts wait for the next run.

A rerun with the same ``--out`` skips the posters the file (and its parts) already holds, by the
path as given, so every poster ends up in it exactly once; unreadable posters are written too,
with their reason, and are not retried (delete their rows to retry them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Protocol, TextIO

from .errors import PosterFusionError
from .files import atomic_path, remove_stale_temps
from .predict import Prediction, evidence_lines

FORMATS = (".csv", ".jsonl", ".parquet")


class Sink(Protocol):
    def write(self, batch: list) -> None: ...
    def close(self) -> None: ...


class Layout(Protocol):
    """How one kind of per-poster record is written (a prediction, an audit): its CSV columns,
    JSON object, Parquet schema and lines for people. Every layout starts with ``poster``, the
    key a rerun resumes by."""

    def header(self) -> list[str]: ...
    def row(self, item) -> list[str]: ...
    def record(self, item) -> dict: ...
    def arrow_schema(self): ...
    def arrow_columns(self, batch: list) -> dict[str, list]: ...
    def text(self, item) -> list[str]: ...


class PredictionLayout:
    """:class:`~posterfusion.predict.Prediction` records: genres, ``top_k`` probabilities (JSON) or
    all of them (CSV, Parquet), and the evidence."""

    def __init__(self, genres: list[str], top_k: int = 3) -> None:
        self.genres, self.top_k = genres, top_k

    def header(self) -> list[str]:
        return ["poster", "genres", *self.genres, "error"]

    def row(self, p: Prediction) -> list[str]:
        probabilities = [f"{p.probabilities[g]:.4f}" if p.probabilities else "" for g in self.genres]
        return [p.path, "|".join(p.genres), *probabilities, p.error]

    def record(self, p: Prediction) -> dict:
        return {"poster": p.path, "genres": p.genres, "top": p.top(self.top_k), "probabilities": p.probabilities,
                "evidence": p.evidence, "error": p.error or None}

    def arrow_schema(self):
        import pyarrow as pa

        return pa.schema([("poster", pa.string()), ("genres", pa.list_(pa.string())),
                          *[(g, pa.float32()) for g in self.genres], ("evidence", pa.string()), ("error", pa.string())])

    def arrow_columns(self, batch: list[Prediction]) -> dict[str, list]:
        return {
            "poster": [p.path for p in batch],
            "genres": [p.genres for p in batch],
            **{g: [p.probabilities.get(g) for p in batch] for g in self.genres},
            "evidence": [json.dumps(p.evidence) if p.evidence else None for p in batch],
            "error": [p.error or None for p in batch],
        }

    def text(self, p: Prediction) -> list[str]:
        """Genres and top probabilities, then what the detectors saw and read."""
        if p.error:
            return []  # its one-line report goes to stderr
        top = ", ".join(f"{g} {prob:.2f}" for g, prob in p.top(self.top_k))
        return [f"{p.path}: {' | '.join(p.genres)}   [{top}]", *(f"    {line}" for line in evidence_lines(p.evidence))]


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


class Printed:
    """Records on standard output as ``text``, ``csv`` or ``json`` lines, flushed per batch."""

    def __init__(self, form: str, layout: Layout, stream: TextIO | None = None) -> None:
        self.form, self.layout = form, layout
        self.stream = stream or sys.stdout
        if form == "csv":
            self.stream.write(_csv_text([layout.header()]))
            self.stream.flush()

    def write(self, batch: list) -> None:
        if self.form == "csv":
            self.stream.write(_csv_text([self.layout.row(p) for p in batch]))
        elif self.form == "json":
            self.stream.write("".join(json.dumps(self.layout.record(p)) + "\n" for p in batch))
        else:
            self.stream.write("".join(line + "\n" for p in batch for line in self.layout.text(p)))
        self.stream.flush()

    def close(self) -> None:
        pass


def check_format(path: Path) -> str:
    """The format a results file's name asks for, or a one-line error before any work starts."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PosterFusionError(f"--out {path}: say the format by the name's ending: {', '.join(FORMATS)}")
    return suffix[1:]


def open_results(path: Path, layout: Layout) -> "LineResults | ParquetResults":
    """The results file ``path`` (its suffix says the format), ready to take the rest of a run."""
    form = check_format(path)
    return ParquetResults(path, layout) if form == "parquet" else LineResults(path, form, layout)


class LineResults:
    """A CSV or JSON-lines results file, appended to a batch at a time; ``done``: the posters it
    held when opened."""

    def __init__(self, path: Path, form: str, layout: Layout) -> None:
        self.path, self.form, self.layout = path, form, layout
        self.done = self._resume()
        self.handle = open(path, "a", encoding="utf-8", newline="")
        if form == "csv" and self.handle.tell() == 0:
            self._append(_csv_text([layout.header()]))

    def _resume(self) -> set[str]:
        """The posters already in the file, after cutting off a line a killed run left unfinished."""
        if not self.path.exists():
            return set()
        _cut_after_last_newline(self.path)
        done: set[str] = set()
        with open(self.path, encoding="utf-8", newline="") as handle:
            if self.form == "csv":
                rows = csv.reader(handle)
                header = next(rows, None)
                if header is not None and header != self.layout.header():
                    raise PosterFusionError(f"--out {self.path}: its columns are not this run's (another model's "
                                            "genres, or another command's file); write to a new file")
                done.update(row[0] for row in rows if row)
                return done
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        done.add(json.loads(line)["poster"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise PosterFusionError(f"--out {self.path}:{number}: not a line of posterfusion's "
                                                "JSON results; write to a new file") from None
        return done

    def write(self, batch: list) -> None:
        if self.form == "csv":
            self._append(_csv_text([self.layout.row(p) for p in batch]))
        else:
            self._append("".join(json.dumps(self.layout.record(p)) + "\n" for p in batch))

    def _append(self, text: str) -> None:
        self.handle.write(text)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _cut_after_last_newline(path: Path) -> None:
    """Truncate ``path`` after its last newline (to nothing if it has none)."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                end = start + found + 1
                break
            end = start
        if end < size:
            handle.truncate(end)


class ParquetResults:
    """A Parquet results file: parts per batch beside it, merged into it when the run ends;
    ``done``: the posters the file and the parts held when opened."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path, self.layout = path, layout
        self.parts = path.with_name(path.name + ".parts")
        self.schema = layout.arrow_schema()
        self.done = self._resume()
        self.count = len(self._part_files())

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def _resume(self) -> set[str]:
        import pyarrow.parquet as pq

        if self.parts.is_dir():
            remove_stale_temps(self.parts)
        done: set[str] = set()
        for file in ([self.path] if self.path.exists() else []) + self._part_files():
            try:
                schema = pq.read_schema(file)
                posters = pq.read_table(file, columns=["poster"]).column("poster").to_pylist()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
                raise PosterFusionError(f"--out {file}: not a readable Parquet file ({exc}); write to a new file") from None
            if not schema.equals(self.schema):
                raise PosterFusionError(f"--out {file}: its columns are not this run's (another model's genres, "
                                        "or another command's file); write to a new file")
            done.update(posters)
        return done

    def write(self, batch: list) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(self.parts / f"part-{self.count:08d}.parquet") as tmp:
            pq.write_table(pa.table(self.layout.arrow_columns(batch), schema=self.schema), tmp)
        self.count += 1

    def close(self) -> None:
        """Merge the file and the parts into the file, one part in memory at a time."""
        import pyarrow.parquet as pq

        parts = self._part_files()
        if parts:
            with atomic_path(self.path) as tmp, pq.ParquetWriter(tmp, self.schema) as writer:
                for file in ([self.path] if self.path.exists() else []) + parts:
                    source = pq.ParquetFile(file)
                    for group in range(source.num_row_groups):
                        writer.write_table(source.read_row_group(group))
        if self.parts.is_dir():  # merged, or only a killed writer's temporary files
            shutil.rmtree(self.parts)
