"""What every format reader shares: the row types and a forgiving reader for delimited text.

Readers only turn a source into :class:`Record` and :class:`RowProblem` items; everything a user
would call clean-up lives in :mod:`posterfusion.importers.cleanup`, so one fix there helps every
format. This module imports only the standard library, because the CLI imports it at start-up.
"""

from __future__ import annotations

import ast
import codecs
import csv
import gzip
import io
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from posterfusion.errors import PosterFusionError

if TYPE_CHECKING:
    import pandas as pd

ProblemKind = Literal["malformed", "missing", "duplicate"]

#: A record that spans more lines than this is an unbalanced quote eating the file, not a field.
MAX_RECORD_LINES = 50

_SURROGATES = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True, slots=True)
class RowProblem:
    """One input row (or file) left out, with enough to find and fix it in the user's file."""

    file: Path
    line: int | None
    reason: str
    kind: ProblemKind = "malformed"

    def __str__(self) -> str:
        where = display_path(self.file) + ("" if self.line is None else f":{self.line}")
        return f"{where}: {self.reason}"


@dataclass(slots=True)
class Record:
    """One poster as a reader saw it, before any clean-up.

    ``images`` holds candidate names rather than one path because datasets disagree on how a
    poster file is named (``603.jpg``, ``tt0133093.jpg``, the ``poster_path`` basename); the
    clean-up takes the first one that exists, whatever its extension.
    """

    file: Path
    line: int | None
    images: tuple[str, ...]
    genres: list[str]
    year: int | None = None
    title_type: str | None = None
    extras: dict[str, object] = field(default_factory=dict)


@dataclass
class ImportResult:
    """A manifest plus every row left out of it, so the CLI can report both."""

    manifest: pd.DataFrame
    problems: list[RowProblem]
    filtered: int = 0
    rare_genres: dict[str, int] = field(default_factory=dict)
    rare_into: str | None = None

    def count(self, kind: ProblemKind) -> int:
        """How many rows were left out for this reason."""
        return sum(problem.kind == kind for problem in self.problems)

    @property
    def unlabeled(self) -> int:
        """Posters with no genre left; they train as negatives for every genre."""
        return int((self.manifest["genres"] == "").sum()) if len(self.manifest) else 0


def display_path(path: Path) -> str:
    """A path as short as it can be while still pointing at the file from here."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def source_file(source: Path, *names: str) -> Path:
    """The table to read, also when a user points at the folder a dataset unpacked into."""
    if source.is_dir():
        for name in names:
            if (source / name).is_file():
                return source / name
        raise PosterFusionError(
            f"{source} is a folder without {' or '.join(names)}; pass the file itself as SOURCE"
        )
    if not source.is_file():
        raise PosterFusionError(f"{source} does not exist; check the SOURCE path")
    return source


# --- values ------------------------------------------------------------------------------------

#: MovieLens' marker for a title without genres; it is not a genre.
NO_GENRES = "(no genres listed)"

_YEAR = re.compile(r"(?<!\d)(1[89]\d\d|2[01]\d\d)(?!\d)")
_IMDB_ID = re.compile(r"\s*(?:tt)?(\d+)\s*", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def parse_year(text: object) -> int | None:
    """The year in a date, a bare year or a title such as ``2001: A Space Odyssey (1968)``.

    The last match wins because titles put the release year at the end.
    """
    found = _YEAR.findall(str(text)) if text is not None else []
    return int(found[-1]) if found else None


def imdb_id(text: str) -> str | None:
    """``tt0114709`` from ``tt0114709``, ``114709`` or ``0114709``, the spellings datasets use."""
    match = _IMDB_ID.fullmatch(text)
    return f"tt{int(match.group(1)):07d}" if match else None


def parse_genres(value: object) -> list[str]:
    """Genre names from any list spelling that poster datasets use.

    Accepts ``Action|Comedy``, ``Action, Comedy``, ``['Action']``, TMDb's
    ``[{'id': 28, 'name': 'Action'}]`` (Python or JSON quoting), IMDb's ``\\N`` and lists
    already parsed from JSON. Raises ValueError with the reason when it cannot be read.
    """
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "\\N", "[]") or text.casefold() == NO_GENRES:
            return []
        if text[0] not in "[{(":
            return clean_genre_names(re.split(r"[|,;]", text))
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError(f"cannot parse the genre list {_short(text)!r}") from None
    items = value if isinstance(value, (list, tuple)) else [value]
    names = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            names.append(item["name"])
        elif isinstance(item, str):
            names.append(item)
        else:
            raise ValueError(
                f"the genre list holds {_short(repr(item))}, not a name or an {{'id', 'name'}} dict"
            )
    return clean_genre_names(names)


def clean_genre_names(names: list[str]) -> list[str]:
    """Names with whitespace collapsed and duplicates dropped; ``|`` would split them in the CSV.

    Raises ValueError for a name without letters: that is an id (TMDb's ``28``), not a genre.
    """
    cleaned: list[str] = []
    for name in names:
        name = _SPACES.sub(" ", str(name)).strip().replace("|", "/")
        if not name or name.casefold() == NO_GENRES:
            continue
        if not any(char.isalpha() for char in name):
            raise ValueError(f"genre {name!r} is not a name (a genre id?)")
        if name not in cleaned:
            cleaned.append(name)
    return cleaned


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- delimited text ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableRow:
    """One record of a table, keyed by the header, and the line it starts on (header is 1)."""

    line: int
    values: dict[str, str]


class _RunawayRecord(Exception):
    """Raised from inside the csv module when a quote never closes."""


class _Lines:
    """Numbered physical lines with push-back, so a broken quote costs one line, not the file."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._pending: deque[tuple[int, str]] = deque()
        self._count = 0
        self.taken: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if len(self.taken) >= MAX_RECORD_LINES:
            raise _RunawayRecord
        if self._pending:
            number, text = self._pending.popleft()
        else:
            text = self._stream.readline()
            if not text:
                raise StopIteration
            self._count += 1
            number = self._count
        self.taken.append((number, text))
        return text

    def push_back(self, lines: list[tuple[int, str]]) -> None:
        self._pending.extendleft(reversed(lines))


def _open_text(path: Path, encoding: str | None) -> tuple[IO[str], str]:
    """The file as text, gunzipped, with its encoding found from a BOM or NUL bytes.

    Undecodable bytes become lone surrogates (``surrogateescape``) instead of stopping the read,
    so the table reader can report and skip just the rows that hold them.
    """
    try:
        raw: IO[bytes] = path.open("rb")
    except OSError as error:
        raise PosterFusionError(f"cannot read {path}: {error.strerror}") from None
    try:
        if raw.read(2) == b"\x1f\x8b":
            raw.close()
            raw = gzip.open(path, "rb")  # type: ignore[assignment]
        raw.seek(0)
        head = raw.read(4096)
        raw.seek(0)
        if head.startswith(b"PK\x03\x04"):
            raise PosterFusionError(f"{path} is a zip archive; unzip it and pass the file inside")
        if encoding is None:
            encoding = _sniff_encoding(path, head)
        else:
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise PosterFusionError(
                    f"--encoding {encoding!r} is not an encoding Python knows"
                ) from None
    except (OSError, EOFError) as error:
        raw.close()
        raise PosterFusionError(f"cannot read {path}: {error}") from None
    except PosterFusionError:
        raw.close()
        raise
    stream = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="")
    return stream, encoding


def _sniff_encoding(path: Path, head: bytes) -> str:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\x00" in head:
        half = max(len(head) // 2, 1)
        if head[1::2].count(0) > half * 0.4 and head[0::2].count(0) < half * 0.1:
            return "utf-16-le"
        if head[0::2].count(0) > half * 0.4 and head[1::2].count(0) < half * 0.1:
            return "utf-16-be"
        try:  # a stray NUL in text is one bad row; NULs among non-text bytes are a binary file
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            raise PosterFusionError(f"{path} is a binary file, not a text table") from None
    return "utf-8"


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class Table:
    """A delimited text file read record by record, never stopping for one bad row.

    Rows come as :class:`TableRow`; rows that cannot be read come as :class:`RowProblem` with
    the physical line they start on. ``latin1_fallback`` is for formats documented as Latin-1:
    fields that are not UTF-8 are then read as Windows-1252/Latin-1 instead of being reported.
    """

    def __init__(
        self,
        path: Path,
        *,
        encoding: str | None = None,
        latin1_fallback: bool = False,
        delimiter: str | None = None,
        quoting: bool = True,
    ) -> None:
        self.path = path
        self._stream, self.encoding = _open_text(path, encoding)
        try:
            self._read_header(latin1_fallback, delimiter, quoting)
        except BaseException:
            self._stream.close()
            raise
        csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))

    def _read_header(self, latin1_fallback: bool, delimiter: str | None, quoting: bool) -> None:
        self._fallback = latin1_fallback and self.encoding.startswith("utf-8")
        self._lines = _Lines(self._stream)
        first = self._read_header_line()
        if delimiter is None:
            delimiter = max([",", ";", "\t"], key=first.count)
        self._dialect: dict[str, object] = {"delimiter": delimiter}
        if not quoting:
            self._dialect["quoting"] = csv.QUOTE_NONE
        header = next(csv.reader([first], **self._dialect))  # type: ignore[arg-type]
        fixed = self._decoded(header)
        if fixed is None:
            raise PosterFusionError(
                f"{self.path}: the header is not {self.encoding} text; {self._hint}"
            )
        self.columns = [name.strip().lstrip("\ufeff") for name in fixed]

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()

    @property
    def _hint(self) -> str:
        return "save it as UTF-8, or pass --encoding (e.g. --encoding cp1252)"

    def _read_header_line(self) -> str:
        try:
            for line in self._lines:
                self._lines.taken = []
                if line.strip():
                    return line
        except (OSError, EOFError) as error:
            raise PosterFusionError(f"cannot read {self.path}: {error}") from None
        raise PosterFusionError(f"{self.path} is empty")

    def column(self, *aliases: str, required: bool = True) -> str | None:
        """The header name matching one of ``aliases``, ignoring case, spaces and underscores."""
        keys = {_column_key(name): name for name in self.columns}
        for alias in aliases:
            if _column_key(alias) in keys:
                return keys[_column_key(alias)]
        if required:
            raise PosterFusionError(
                f"{self.path} has no {aliases[0]!r} column (it has {', '.join(self.columns)}); "
                "is it the right file for this format?"
            )
        return None

    def _decoded(self, fields: list[str]) -> list[str] | None:
        """The fields, with Latin-1 bytes repaired where allowed; None if they are not text."""
        try:
            "\x1f".join(fields).encode("utf-8")
            return fields
        except UnicodeEncodeError:
            if not self._fallback:
                return None
        return [_latin1(value) for value in fields]

    def __iter__(self) -> Iterator[TableRow | RowProblem]:
        width = len(self.columns)
        reader = csv.reader(self._lines, **self._dialect)  # type: ignore[arg-type]
        while True:
            self._lines.taken = []
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (OSError, EOFError) as error:
                raise PosterFusionError(f"cannot read {self.path}: {error}") from None
            except (_RunawayRecord, csv.Error) as error:
                taken = self._lines.taken
                reason = (
                    f"a quote opened here never closes: {_short(taken[0][1].rstrip())!r}"
                    if isinstance(error, _RunawayRecord) else f"unreadable CSV: {error}"
                )
                yield RowProblem(self.path, taken[0][0], reason)
                self._lines.push_back(taken[1:])
                reader = csv.reader(self._lines, **self._dialect)  # type: ignore[arg-type]
                continue
            taken = self._lines.taken
            line = taken[0][0]
            if not any(value.strip() for value in fields):
                continue
            if len(fields) > width and not any(value.strip() for value in fields[width:]):
                fields = fields[:width]
            if len(fields) != width:
                reason = f"expected {width} fields, found {len(fields)}"
                if len(taken) > 1:
                    reason += f" over {len(taken)} lines (an unbalanced quote?)"
                    self._lines.push_back(taken[1:])
                    reader = csv.reader(self._lines, **self._dialect)  # type: ignore[arg-type]
                yield RowProblem(self.path, line, reason)
                continue
            decoded = self._decoded(fields)
            if decoded is None:
                bad = next(v for v in fields if _SURROGATES.search(v))
                byte = ord(_SURROGATES.search(bad).group()) - 0xDC00  # type: ignore[union-attr]
                yield RowProblem(
                    self.path, line,
                    f"not {self.encoding} text (byte 0x{byte:02X} in {_short(_printable(bad))!r}); "
                    f"{self._hint}",
                )
                continue
            yield TableRow(line, dict(zip(self.columns, decoded)))


def _latin1(value: str) -> str:
    raw = value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _printable(value: str) -> str:
    return _SURROGATES.sub("?", value)


def records(
    path: Path, rows: Iterable[TableRow | RowProblem], make: Callable[[TableRow], Record]
) -> Iterator[Record | RowProblem]:
    """Each row through a format's ``make``; a ValueError it raises becomes that row's problem."""
    for row in rows:
        if isinstance(row, RowProblem):
            yield row
            continue
        try:
            yield make(row)
        except ValueError as error:
            yield RowProblem(path, row.line, str(error))


def without(values: dict[str, str], *consumed: str | None) -> dict[str, object]:
    """The row's other columns, kept in the manifest so nothing the user had is lost."""
    return {key: value for key, value in values.items() if key not in consumed}
