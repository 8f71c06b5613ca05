"""Posters -> aligned feature arrays, through a cache folder or an in-memory store.

Whatever the store lacks for the posters is computed first (the same code path as
``detect-cache build``), so training, evaluation and prediction never silently work on a subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .extract import FrozenModels, Progress, build_cache, open_stores


@dataclass
class FeatureTable:
    """The posters that have features, in input order."""

    rows: np.ndarray  # indices into the input paths
    keys: list[str]
    cnn: np.ndarray | None
    detectors: np.ndarray | None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in input order
    text: np.ndarray | None = None  # the text detector's features, where it ran
    text_read: list[str] | None = None  # and the lines it read, " / "-joined

    def errors(self) -> dict[int, str]:
        """Reason per input index for the posters that could not be read."""
        have = set(self.rows.tolist())
        missing = [i for i in range(len(have) + len(self.failures)) if i not in have]
        return {i: reason for i, (_, reason) in zip(missing, self.failures)}


def gather(paths: list[str], models: FrozenModels, cache_dir: str | Path | None = None, batch_size: int = 32,
           workers: int | None = None, progress: Progress | None = None) -> FeatureTable:
    """Features for every readable poster; ``cache_dir`` None keeps them in memory only."""
    stores = open_stores(models, cache_dir)
    summary = build_cache(paths, stores, models, batch_size, workers, progress)
    rows = np.array([i for i, key in enumerate(summary.keys) if key], dtype=np.int64)
    keys = [summary.keys[i] for i in rows]
    unique = list(dict.fromkeys(keys))
    arrays: dict[str, np.ndarray | None] = {"detectors": None, "backbone": None, "text": None}
    for kind, store in stores.items():
        stored_keys, matrix = store.read(unique)
        position = {k: i for i, k in enumerate(stored_keys)}
        arrays[kind] = matrix[[position[k] for k in keys]]
    read = stores["text"].notes(unique) if "text" in stores else {}
    return FeatureTable(rows, keys, arrays["backbone"], arrays["detectors"], summary.failures, arrays["text"],
                        [read.get(k, "") for k in keys] if "text" in stores else None)
