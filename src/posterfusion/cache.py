"""The feature cache: a folder of Parquet files keyed by poster content and model identity.

A cache folder holds one *store* per feature set: the detector features of one detector set, or
the embeddings of one backbone. A store's folder name carries a hash of its identity (model
names, weights checksums, schema version), so features from different models never mix and a
model trained on one identity can ask for exactly its own. Rows are keyed by the sha256 of the
poster file, so moved or renamed posters are hits.

Each batch is written as its own Parquet part through a temporary file and an atomic rename: a
run killed at any moment loses at most the batch in flight and leaves no corrupt file. Readers
drop duplicate keys, so a crash during compaction is harmless too.

Any number of processes may build and read one cache at once: temporary files carry their
writer's pid and are cleaned up only once that writer is gone; compaction holds a per-store lock
(``flock``) and writes the merged part before it deletes the ones it merged, and a reader that
finds a listed part gone lists the parts again and starts over.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from .errors import DiskFull, PosterFusionError, is_disk_full
from .files import atomic_path, remove_stale_temps, write_text_atomic

IDENTITY_FILE = "_identity.json"  # "_" prefix: pyarrow skips it when reading the folder
LOCK_FILE = "_compact.lock"
COMPACT_AFTER = 32  # parts; a 10,000-poster build would otherwise leave ~300 small files
READ_ATTEMPTS = 20  # a reader starts over when compaction removed a part it had listed
ROW_GROUP_BYTES = 1 << 20  # of float32 values per Parquet row group: what a lookup decodes to reach one row


def row_group_rows(width: int) -> int:
    """Rows per Parquet row group for rows of ``width`` float32 values: ~``ROW_GROUP_BYTES``
    however wide the rows, so that reaching one row outside the groups a reader holds costs
    ~1 MiB (a group of 1,024 2,560-d embeddings was 10 MiB, decoded per key by a shuffled
    read of a store larger than :class:`StoreLookup`'s memory bound)."""
    return max(1, ROW_GROUP_BYTES // (4 * width))


def identity_digest(identity: dict) -> str:
    """Short stable hash of an identity dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class FeatureStore:
    """One feature set in a cache folder: rows of float32 features by poster key."""

    folder: Path
    kind: str  # "detectors" or "backbone"
    identity: dict
    columns: list[str]
    filesystem: Any = None  # a pyarrow filesystem where the folder is not local (:class:`UriStore`)

    @property
    def wide(self) -> bool:
        """Detector features are stored as named columns; embeddings as one list column."""
        return self.kind == "detectors"

    @classmethod
    def open(cls, root: str | Path, kind: str, identity: dict, columns: list[str]) -> "FeatureStore":
        """Open the store for this identity, creating it if the cache does not hold it yet; a
        ``root`` URI (``s3://``, ``gs://``, ``hdfs://``...) opens a :class:`UriStore` there."""
        if is_uri(root):
            return UriStore.open(root, kind, identity, columns)
        root = local_root(root)
        folder = Path(root) / f"{kind}-{identity_digest(identity)}"
        meta = folder / IDENTITY_FILE
        if meta.is_file():
            stored = _read_meta(meta)
            if stored.get("identity") != identity or stored.get("columns") != columns:
                raise PosterFusionError(f"{meta}: identity does not match its folder name; remove that folder")
        else:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                write_text_atomic(meta, _meta_json(kind, identity, columns))
            except OSError as exc:
                error = DiskFull if is_disk_full(exc) else PosterFusionError  # exit 1 or 2
                raise error(f"{root}: cannot create a cache store there ({exc.strerror or exc})") from None
        remove_stale_temps(folder)  # left by a killed writer; other live writers' stay
        return cls(folder, kind, identity, columns)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def keys(self) -> set[str]:
        """Keys already stored (reads only the key column)."""
        _, table = self._read_parts(columns=["key"])
        return set(table.column("key").to_pylist()) if table is not None else set()

    def _read_parts(self, columns: list[str] | None = None):
        """The parts read, and all of them as one pyarrow table (None when there are none).

        Another process's compaction may delete a part between listing and reading it; it wrote
        the merged part first, so listing again finds every row.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        for _ in range(READ_ATTEMPTS):
            parts = self.parts()
            try:
                tables = [pq.read_table(str(p), columns=columns, filesystem=self.filesystem) for p in parts]
            except FileNotFoundError:
                continue
            # promote: parts written before a store gained its optional ``note`` column lack it
            return parts, (pa.concat_tables(tables, promote_options="default") if tables else None)
        raise PosterFusionError(f"{self.folder}: parts kept vanishing while reading; is a cleanup deleting them?")

    def append(self, keys: list[str], paths: list[str], values: np.ndarray, notes: list[str] | None = None) -> None:
        """Write one batch atomically as a new part; ``notes`` is a string per row to keep beside
        the values (the text detector's lines read, shown as evidence)."""
        if not keys:
            return
        import pyarrow as pa

        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (len(keys), len(self.columns)):
            raise ValueError(f"expected {(len(keys), len(self.columns))} values, got {values.shape}")
        arrays: dict[str, pa.Array] = {"key": pa.array(keys, pa.string()), "path": pa.array(paths, pa.string())}
        if self.wide:
            arrays.update({name: pa.array(values[:, i]) for i, name in enumerate(self.columns)})
        else:
            arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), len(self.columns))
        if notes is not None:
            arrays["note"] = pa.array(notes, pa.string())
        self._write_part(pa.table(arrays), uuid.uuid4().hex[:8])

    def _write_part(self, table, tag: str) -> None:
        import pyarrow.parquet as pq

        with atomic_path(self.folder / f"part-{time.time_ns():020d}-{tag}.parquet") as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_rows(len(self.columns)))

    def read(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """All rows (or those of ``keys``, in that order, missing ones left out), deduplicated."""
        _, table = self._read_parts()
        if table is None:
            return [], np.zeros((0, len(self.columns)), np.float32)
        stored_keys = table.column("key").to_pylist()
        matrix = self.values(table)
        index = {key: row for row, key in enumerate(stored_keys)}  # the last copy wins
        wanted = list(index) if keys is None else [k for k in keys if k in index]
        return wanted, matrix[[index[k] for k in wanted]]

    def values(self, table) -> np.ndarray:
        """A pyarrow table of this store's rows as a float32 matrix (one row per table row)."""
        if self.wide:
            return np.column_stack([table.column(c).to_numpy() for c in self.columns]).astype(np.float32)
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return flat.reshape(table.num_rows, len(self.columns)).astype(np.float32, copy=False)

    def notes(self, keys: list[str]) -> dict[str, str]:
        """The notes stored with these keys (where a row has one)."""
        _, table = self._read_parts()
        if table is None or "note" not in table.column_names:
            return {}
        wanted = set(keys)
        found = zip(table.column("key").to_pylist(), table.column("note").to_pylist())
        return {key: note for key, note in found if key in wanted and note is not None}

    def compact(self, force: bool = False) -> None:
        """Merge the parts into one holding each key once (``COMPACT_AFTER`` parts or more, or any
        two with ``force``).

        Crash-safe because the merged part is in place before the merged ones go, and readers
        deduplicate. One process compacts a store at a time (the others skip it: the parts they
        see are being merged); parts written meanwhile are not among those listed, so they stay.
        """
        enough = 2 if force else max(COMPACT_AFTER, 2)
        if len(self.parts()) < enough:  # the common case touches nothing (a read-only cache works)
            return
        with self._compaction_lock() as locked:
            if not locked:
                return
            parts, table = self._read_parts()  # listed again: a compaction before ours merged some
            if len(parts) < enough:
                return
            keys = table.column("key").to_pylist()
            last = {key: row for row, key in enumerate(keys)}  # the last copy wins, as in read()
            if len(last) < len(keys):
                table = table.take(sorted(last.values()))
            self._write_part(table, "compact")
            for part in parts:
                part.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _compaction_lock(self):
        """Yields whether this process got the store's compaction lock (never waits for it)."""
        with open(self.folder / LOCK_FILE, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def row_count(self) -> int:
        return len(self.keys())


class StoreLookup:
    """Rows of a store fetched by key, whatever order they are asked in, with bounded memory.

    The keys are indexed once (part, row group, row; the last copy of a key wins, as in
    :meth:`FeatureStore.read`). Each call plans its reads: every row group holding some of its
    keys is decoded once, and the rows are handed back in the order asked, so a call costs the
    row groups it touches, not its keys. Decoded row groups stay, least recently used dropped
    first, while they fit in ``memory_bytes``: a store that fits is decoded once however a manifest
    orders its posters (a training cache: 10,000 posters' embeddings are ~100 MB), and a larger
    one (``fusion predict --cache`` over a catalogue) never holds more than that. ``None`` keeps
    every group read, for callers that keep every row anyway (:func:`posterfusion.features.gather`).

    The parts' files are opened when the keys are indexed and held open, so another process's
    compaction, which deletes the parts it merged, cannot take rows from under a lookup; a key
    stored after the index was made makes it index again.
    """

    MEMORY_BYTES = 256 << 20

    def __init__(self, store: FeatureStore, memory_bytes: int | None = MEMORY_BYTES) -> None:
        self.store = store
        self.memory_bytes = memory_bytes
        self.groups: collections.OrderedDict = collections.OrderedDict()  # (part, group) -> (values, notes)
        self.held = 0  # bytes of the decoded values in ``groups``
        self._index()

    def _index(self) -> None:
        import pyarrow.parquet as pq

        for _ in range(READ_ATTEMPTS):
            where: dict[str, tuple[Path, int, int]] = {}
            files = {}
            try:
                for part in self.store.parts():
                    files[part] = meta = pq.ParquetFile(part, filesystem=self.store.filesystem)
                    for group in range(meta.num_row_groups):
                        keys = meta.read_row_group(group, columns=["key"]).column("key").to_pylist()
                        where.update((key, (part, group, row)) for row, key in enumerate(keys))
            except FileNotFoundError:
                continue
            self.where, self.files = where, files
            self.groups.clear()
            self.held = 0
            return
        raise PosterFusionError(f"{self.store.folder}: parts kept vanishing while reading; is a cleanup deleting them?")

    def rows(self, keys: list[str]) -> tuple[np.ndarray, list[str]]:
        """The values of ``keys`` (each stored), in that order, and their notes ("" where none)."""
        for attempt in range(2):
            if attempt or any(key not in self.where for key in keys):
                self._index()
            try:
                return self._take(keys)
            except KeyError:  # still unknown after indexing again: gone since it was asked for
                continue
        missing = [key for key in keys if key not in self.where]
        raise PosterFusionError(f"{self.store.folder}: {len(missing)} posters' rows vanished from the cache while reading")

    def _take(self, keys: list[str]) -> tuple[np.ndarray, list[str]]:
        """One read of each row group the keys live in, the rows put where they were asked."""
        plan: dict[tuple[Path, int], list[tuple[int, int]]] = {}  # (part, group) -> [(position, row)]
        for position, key in enumerate(keys):
            part, group, row = self.where[key]
            plan.setdefault((part, group), []).append((position, row))
        values = np.empty((len(keys), len(self.store.columns)), np.float32)
        notes = [""] * len(keys)
        for (part, group), wanted in plan.items():
            group_values, group_notes = self._group(part, group)
            positions, rows = (list(column) for column in zip(*wanted))
            values[positions] = group_values[rows]
            if group_notes is not None:
                for position, row in wanted:
                    notes[position] = group_notes[row] or ""
        return values, notes

    def _group(self, part: Path, group: int) -> tuple[np.ndarray, list[str | None] | None]:
        """One row group's values and notes (None where its part has no ``note`` column), decoded
        once while it stays within the memory bound."""
        if (part, group) not in self.groups:
            meta = self.files[part]
            columns = [name for name in meta.schema_arrow.names if name not in ("key", "path")]
            table = meta.read_row_group(group, columns=columns)
            notes = table.column("note").to_pylist() if "note" in table.column_names else None
            self.groups[(part, group)] = decoded = (self.store.values(table), notes)
            self.held += decoded[0].nbytes
            while self.memory_bytes is not None and self.held > self.memory_bytes and len(self.groups) > 1:
                _, (dropped, _) = self.groups.popitem(last=False)
                self.held -= dropped.nbytes
        self.groups.move_to_end((part, group))
        return self.groups[(part, group)]


@dataclass
class UriStore(FeatureStore):
    """A store on shared storage named by a URI (``s3://``, ``gs://``, ``hdfs://``, or any scheme
    fsspec knows), for a build on a Ray cluster; the same folder name, identity file and parts as
    a local store, written through pyarrow's filesystems.

    A part is written under a hidden name and then moved to its own, so listings never show half
    of one (an object store's copy appears whole). Nothing is compacted: no lock reaches across
    machines, and readers drop duplicate keys anyway. A killed writer's hidden file stays (no pid
    says whether its writer lives on another machine); it is never read.
    """

    @classmethod
    def open(cls, root: str | Path, kind: str, identity: dict, columns: list[str]) -> "UriStore":
        from pyarrow.fs import FileType

        try:
            filesystem, base = uri_filesystem(str(root))
            store = cls(PurePosixPath(base) / f"{kind}-{identity_digest(identity)}", kind, identity, columns, filesystem)
            meta = store.folder / IDENTITY_FILE
            if filesystem.get_file_info(str(meta)).type == FileType.File:
                with filesystem.open_input_stream(str(meta)) as handle:
                    stored = json.loads(handle.read())
                if stored.get("identity") != identity or stored.get("columns") != columns:
                    raise PosterFusionError(f"{root}/{meta.parent.name}: identity does not match its folder name; remove that folder")
            else:
                filesystem.create_dir(str(store.folder), recursive=True)
                store._put(meta, lambda tmp: _write_bytes(filesystem, tmp, _meta_json(kind, identity, columns).encode()))
        except (OSError, ValueError) as exc:
            raise PosterFusionError(f"{root}: cannot open a cache store there ({exc})") from None
        return store

    def parts(self) -> list[PurePosixPath]:
        from pyarrow.fs import FileSelector, FileType

        found = self.filesystem.get_file_info(FileSelector(str(self.folder), allow_not_found=True))
        return sorted(PurePosixPath(info.path) for info in found
                      if info.type == FileType.File and PurePosixPath(info.path).match("part-*.parquet"))

    def _write_part(self, table, tag: str) -> None:
        import pyarrow.parquet as pq

        final = self.folder / f"part-{time.time_ns():020d}-{tag}.parquet"
        self._put(final, lambda tmp: pq.write_table(table, tmp, filesystem=self.filesystem,
                                                          row_group_size=row_group_rows(len(self.columns))))

    def _put(self, final: PurePosixPath, write) -> None:
        """``write(path)`` to a hidden name beside ``final``, then moved there; removed on failure."""
        tmp = str(final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"))
        try:
            write(tmp)
            self.filesystem.move(tmp, str(final))
        except BaseException:
            with contextlib.suppress(OSError):
                self.filesystem.delete_file(tmp)
            raise

    def compact(self, force: bool = False) -> None:
        """Nothing: see the class's docstring."""


def is_uri(root: str | Path) -> bool:
    """Whether a cache is named by a URI of a filesystem that is not the local one."""
    scheme, sep, _ = str(root).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def local_root(root: str | Path) -> Path:
    """A local cache folder, given as a path or a ``file://`` URI."""
    return Path(str(root)[len("file://"):]) if str(root).startswith("file://") else Path(root)


def uri_filesystem(uri: str):
    """The pyarrow filesystem of a URI and the path inside it: pyarrow's own (s3, gs, hdfs, abfs)
    where it has one, else fsspec's wrapped for pyarrow."""
    from pyarrow import ArrowInvalid
    from pyarrow.fs import FileSystem, FSSpecHandler, PyFileSystem

    try:
        return FileSystem.from_uri(uri)
    except ArrowInvalid:
        import fsspec

        try:
            filesystem, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc:
            raise PosterFusionError(f"{uri}: no filesystem for this URI ({exc})") from None
        return PyFileSystem(FSSpecHandler(filesystem)), path


def _write_bytes(filesystem, path: str, data: bytes) -> None:
    with filesystem.open_output_stream(path) as handle:
        handle.write(data)


def _meta_json(kind: str, identity: dict, columns: list[str]) -> str:
    """A store's ``_identity.json``."""
    return json.dumps({"kind": kind, "identity": identity, "columns": columns, "created": time.time()}, indent=2)


@contextlib.contextmanager
def disk_full_reported(stores: Iterable) -> Iterator[None]:
    """A full disk inside the block becomes one line saying what is safe and what to do.

    Every part is written atomically (the one being written when space ran out is removed), so
    the cache stays valid and a rerun computes only what is missing. Counted once the block's
    writes have ended: posters whose features are in every one of ``stores``.
    """
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        on_disk = [store for store in stores if isinstance(store, FeatureStore)]
        safe = set.intersection(*(store.keys() for store in on_disk)) if on_disk else set()
        where = on_disk[0].folder.parent if on_disk else "cache"
        raise DiskFull(
            f"{where}: disk full; {len(safe)} posters are safe in the cache, "
            "and a rerun with free space completes it"
        ) from None


def list_stores(root: str | Path) -> list[FeatureStore]:
    """Every store in a cache folder, for ``detect-cache info`` and for clear refusal messages."""
    root = Path(root)
    if not root.is_dir():
        raise PosterFusionError(f"{root}: no such cache folder; build one with 'detect-cache build'")
    stores = []
    for meta in sorted(root.glob(f"*/{IDENTITY_FILE}")):
        stored = _read_meta(meta)
        stores.append(FeatureStore(meta.parent, stored["kind"], stored["identity"], stored["columns"]))
    return stores


def find_store(root: str | Path, kind: str, identity: dict) -> FeatureStore:
    """The store holding exactly this identity, or a one-line refusal naming what the cache holds."""
    for store in list_stores(root):
        if store.kind == kind and store.identity == identity:
            return store
    held = [identity_digest(s.identity) for s in list_stores(root) if s.kind == kind]
    raise PosterFusionError(
        f"{root}: cache holds no {kind} features for {_describe(identity)} (it holds {len(held)} other "
        f"{kind} set(s): {', '.join(held) or 'none'}); run 'detect-cache build' with the same models"
    )


def _describe(identity: dict) -> str:
    return identity.get("name") or f"identity {identity_digest(identity)}"


def _read_meta(meta: Path) -> dict:
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PosterFusionError(f"{meta}: unreadable cache metadata ({exc}); remove that folder and rebuild") from None


def describe_cache(root: str | Path) -> dict:
    """What a cache holds, as JSON-ready data; the largest detector store is the headline."""
    stores = list_stores(root)
    rows = {store.folder.name: store.row_count() for store in stores}
    detectors = [s for s in stores if s.kind == "detectors"]
    backbones = [s for s in stores if s.kind == "backbone"]
    main = max(detectors, key=lambda s: rows[s.folder.name], default=None)
    cnn = max(backbones, key=lambda s: rows[s.folder.name], default=None)
    return {
        "cache": str(root),
        "posters": rows[main.folder.name] if main else 0,
        "detectors": main.identity if main else None,
        "schema_version": main.identity.get("schema_version") if main else None,
        "columns": main.columns if main else [],
        "backbone": cnn.identity if cnn else None,
        "embedding_posters": rows[cnn.folder.name] if cnn else 0,
        "stores": [
            {
                "kind": s.kind,
                "folder": s.folder.name,
                "posters": rows[s.folder.name],
                "identity": s.identity,
                "summary": _summary(s),
            }
            for s in stores
        ],
    }


def _summary(store: FeatureStore) -> str:
    if store.kind == "backbone":
        view = store.identity.get("input_size")
        view = f"{view[0]}x{view[1]}{'+flip' if store.identity.get('flip') else ''}" if isinstance(view, list) else f"{view}x{view}"
        return f"{store.identity.get('name')} {view} ({len(store.columns)}-d)"
    if store.kind == "text":
        return f"{store.identity.get('name')} text, {len(store.columns)} columns"
    objects = store.identity.get("objects", {}).get("name", "?")
    return f"{objects} + mtcnn + expressions, {len(store.columns)} columns"


class Store(Protocol):
    """What the build writes to and lookups read from: a :class:`FeatureStore` in a cache folder, or
    a :class:`MemoryStore` for one command."""

    kind: str
    identity: dict
    columns: list[str]

    def keys(self) -> set[str]: ...
    def append(self, keys: list[str], paths: list[str], values: np.ndarray, notes: list[str] | None = None) -> None: ...
    def read(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]: ...
    def notes(self, keys: list[str]) -> dict[str, str]: ...
    def compact(self) -> None: ...


@dataclass
class MemoryStore:
    """A store that lives only for one command (``fusion predict`` without a cache)."""

    kind: str
    identity: dict
    columns: list[str]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    notes_by_key: dict[str, str] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return set(self.rows)

    def append(self, keys: list[str], paths: list[str], values: np.ndarray, notes: list[str] | None = None) -> None:
        self.rows.update(zip(keys, np.asarray(values, np.float32)))
        if notes is not None:
            self.notes_by_key.update(zip(keys, notes))

    def notes(self, keys: list[str]) -> dict[str, str]:
        return {k: self.notes_by_key[k] for k in keys if k in self.notes_by_key}

    def read(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        wanted = list(self.rows) if keys is None else [k for k in keys if k in self.rows]
        matrix = np.stack([self.rows[k] for k in wanted]) if wanted else np.zeros((0, len(self.columns)), np.float32)
        return wanted, matrix

    def compact(self) -> None:
        pass
