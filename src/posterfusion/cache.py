"""The feature cache: a folder of Parquet files keyed by poster content and model identity.

A cache folder holds one *store* per feature set: the detector features of one detector set, or
the embeddings of one backbone. A store's folder name carries a hash of its identity (model
names, weights checksums, schema version), so features from different models never mix and a
model trained on one identity can ask for exactly its own. Rows are keyed by the sha256 of the
poster file, so moved or renamed posters are hits.

Each batch is written as its own Parquet part through a temporary file and an atomic rename: a
run killed at any moment loses at most the batch in flight and leaves no corrupt file. Readers
drop duplicate keys, so a crash during compaction is harmless too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PosterFusionError

IDENTITY_FILE = "_identity.json"  # "_" prefix: pyarrow skips it when reading the folder
COMPACT_AFTER = 32  # parts; a 10,000-poster build would otherwise leave ~300 small files


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

    @property
    def wide(self) -> bool:
        """Detector features are stored as named columns; embeddings as one list column."""
        return self.kind == "detectors"

    @classmethod
    def open(cls, root: str | Path, kind: str, identity: dict, columns: list[str]) -> "FeatureStore":
        """Open the store for this identity, creating it if the cache does not hold it yet."""
        folder = Path(root) / f"{kind}-{identity_digest(identity)}"
        meta = folder / IDENTITY_FILE
        if meta.is_file():
            stored = _read_meta(meta)
            if stored.get("identity") != identity or stored.get("columns") != columns:
                raise PosterFusionError(f"{meta}: identity does not match its folder name; remove that folder")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(meta, json.dumps(
                {"kind": kind, "identity": identity, "columns": columns, "created": time.time()}, indent=2
            ))
        for stale in folder.glob(".*.tmp"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        return cls(folder, kind, identity, columns)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def keys(self) -> set[str]:
        """Keys already stored (reads only the key column)."""
        import pyarrow.parquet as pq

        keys: set[str] = set()
        for part in self.parts():
            keys.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
        return keys

    def append(self, keys: list[str], paths: list[str], values: np.ndarray) -> None:
        """Write one batch atomically as a new part."""
        if not keys:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (len(keys), len(self.columns)):
            raise ValueError(f"expected {(len(keys), len(self.columns))} values, got {values.shape}")
        arrays: dict[str, pa.Array] = {"key": pa.array(keys, pa.string()), "path": pa.array(paths, pa.string())}
        if self.wide:
            arrays.update({name: pa.array(values[:, i]) for i, name in enumerate(self.columns)})
        else:
            arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), len(self.columns))
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(pa.table(arrays), tmp)
        _fsync_replace(tmp, self.folder / name)

    def read(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """All rows (or those of ``keys``, in that order, missing ones left out), deduplicated."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self.parts()
        if not parts:
            return [], np.zeros((0, len(self.columns)), np.float32)
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        stored_keys = table.column("key").to_pylist()
        if self.wide:
            matrix = np.column_stack([table.column(c).to_numpy() for c in self.columns]).astype(np.float32)
        else:
            flat = table.column("embedding").combine_chunks().flatten().to_numpy()
            matrix = flat.reshape(len(stored_keys), len(self.columns)).astype(np.float32, copy=False)
        index = {key: row for row, key in enumerate(stored_keys)}  # the last copy wins
        wanted = list(index) if keys is None else [k for k in keys if k in index]
        return wanted, matrix[[index[k] for k in wanted]]

    def compact(self) -> None:
        """Merge many small parts into one; crash-safe because readers deduplicate."""
        parts = self.parts()
        if len(parts) < COMPACT_AFTER:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(p) for p in parts])
        name = f"part-{time.time_ns():020d}-compact.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        _fsync_replace(tmp, self.folder / name)
        for part in parts:
            part.unlink(missing_ok=True)

    def row_count(self) -> int:
        return len(self.keys())


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    _fsync_replace(tmp, path)


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


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
        return f"{store.identity.get('name')} ({len(store.columns)}-d)"
    objects = store.identity.get("objects", {}).get("name", "?")
    return f"{objects} + mtcnn + expressions, {len(store.columns)} columns"
