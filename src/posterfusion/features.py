"""Posters -> aligned feature arrays, batch by batch, through a cache folder or computed on the fly.

Whatever the cache lacks for the posters is computed first (the same code path as
``detect-cache build``), so training, evaluation and prediction never silently work on a subset.
:func:`stream_features` hands over each batch's features as the models finish it and keeps
none of them, so a run over a catalogue holds one batch at a time; :func:`gather` joins them for
the callers that want every poster at once (training, evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .cache import StoreLookup
from .detectors import schema
from .dataset import Item
from .extract import BuildSummary, Progress, extract_batches, open_stores
from .frozen import Extracted, FrozenModels


@dataclass(frozen=True)
class Features:
    """Posters' feature groups, a row per poster, as a head's branches read them: the CNN embedding,
    the detector features (``schema.COLUMNS``) and the text features (``schema.TEXT_COLUMNS``); a
    group that was not computed is None. Built from cache rows in one place
    (:class:`~posterfusion.features.FeatureTable`) and passed whole, so training, prediction,
    explanation and the ablations name the groups the same way."""

    cnn: np.ndarray | None = None
    detectors: np.ndarray | None = None
    text: np.ndarray | None = None

    def groups(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The groups in the order a head's ``forward`` takes them."""
        return self.cnn, self.detectors, self.text

    def __len__(self) -> int:
        return next((len(g) for g in self.groups() if g is not None), 0)

    def rows(self, index) -> "Features":
        """The posters at ``index`` (positions, a mask or a slice), every group alike."""
        return Features(*(None if g is None else g[index] for g in self.groups()))

    def for_mode(self, mode: str) -> "Features":
        """Only the groups a head of ``mode`` reads (an ablation's one-branch heads)."""
        return Features(self.cnn if mode in ("cnn", "fusion") else None,
                        self.detectors if mode in ("detectors", "fusion") else None,
                        self.text if mode in ("text", "fusion") else None)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor | None, ...]:
        """The groups as tensors on ``device``, for a head's ``forward``."""
        return tuple(None if g is None else torch.as_tensor(g, device=device) for g in self.groups())

    @classmethod
    def join(cls, parts: list["Features"]) -> "Features":
        """Consecutive rows as one: the groups of the parts, stacked."""
        if not parts:
            return cls()
        return cls(*(None if group[0] is None else np.concatenate(group) for group in zip(*(p.groups() for p in parts))))



@dataclass
class FeatureTable:
    """Posters ``start .. start + len(paths)`` of the input, those with features in input order."""

    rows: np.ndarray  # positions in the input of the posters with features
    keys: list[str]
    features: Features  # a row per poster with features
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), in input order
    text_read: list[str] | None = None  # the lines the text detector read, " / "-joined, where it ran
    paths: list[str] = field(default_factory=list)  # every poster covered, in input order
    start: int = 0

    def errors(self) -> dict[int, str]:
        """Reason per input position for the posters that could not be read."""
        have = set(self.rows.tolist())
        missing = [i for i in range(self.start, self.start + len(self.paths)) if i not in have]
        return {i: reason for i, (_, reason) in zip(missing, self.failures)}

    @classmethod
    def join(cls, tables: list["FeatureTable"]) -> "FeatureTable":
        """Consecutive tables as one."""
        read = [t.text_read for t in tables]
        return cls(
            np.concatenate([t.rows for t in tables]) if tables else np.zeros(0, np.int64),
            [k for t in tables for k in t.keys],
            Features.join([t.features for t in tables]),
            [f for t in tables for f in t.failures],
            None if not read or read[0] is None else [r for part in read for r in part],
            [p for t in tables for p in t.paths],
            tables[0].start if tables else 0,
        )


def gather(paths: list[str], models: FrozenModels, cache_dir: str | Path | None = None, batch_size: int = 32,
           workers: int | None = None, progress: Progress | None = None) -> FeatureTable:
    """Features for every readable poster; ``cache_dir`` None keeps them in memory only.

    Every row is kept, so the cache's row groups are too (:class:`StoreLookup` with no memory
    bound): each is decoded once whatever order the posters come in."""
    return FeatureTable.join(list(stream_features(paths, models, cache_dir, batch_size, workers, progress,
                                                  lookup_memory=None)))


def stream_features(paths: Iterable[str], models: FrozenModels, cache_dir: str | Path | None = None,
                    batch_size: int = 32, workers: int | None = None,
                    progress: Progress | None = None,
                    lookup_memory: int | None = StoreLookup.MEMORY_BYTES) -> Iterator[FeatureTable]:
    """One :class:`FeatureTable` per batch of ``paths``, in order, as the models finish it.

    With a cache, what it lacks is computed and stored as ``detect-cache build`` does, and what it
    holds is read through a :class:`StoreLookup` keeping at most ``lookup_memory`` bytes of decoded
    rows (None: every row group it reads). Nothing per poster is kept: a poster met twice in a run is
    computed twice (unless a cache held it before the run), which is rarer and cheaper than
    holding every poster's features.
    """
    stores = open_stores(models, cache_dir) if cache_dir is not None else {}
    widths = {}  # columns per kind of feature these models give
    if models.detectors is not None:
        widths["detectors"] = len(models.detectors.columns)
    if models.backbone is not None:
        widths["backbone"] = models.backbone.dim
    if models.text is not None:
        widths["text"] = len(schema.TEXT_COLUMNS)
    lookups = {kind: StoreLookup(store, lookup_memory) for kind, store in stores.items()}
    start = 0
    for items, result in extract_batches(paths, stores, models, BuildSummary(keys=None), batch_size, workers,
                                         progress, repeat_duplicates=True):
        yield _table(items, result, widths, lookups, start)
        start += len(items)


def _table(items: list[Item], result: Extracted, widths: dict[str, int], lookups: dict[str, StoreLookup],
           start: int) -> FeatureTable:
    """One batch's features: computed ones from the models' outputs, cached ones from the stores."""
    good = [i for i, item in enumerate(items) if not item.error]
    computed = {
        "detectors": (result.detector_items, result.features, None),
        "backbone": (result.backbone_items, result.embeddings, None),
        "text": (result.text_items, result.text_features, result.notes),
    }
    arrays: dict[str, np.ndarray | None] = {"detectors": None, "backbone": None, "text": None}
    read: list[str] | None = None
    for kind, width in widths.items():
        done_items, values, notes = computed[kind]
        row_of = {id(item): r for r, item in enumerate(done_items)}
        stored = [items[i].key for i in good if id(items[i]) not in row_of]
        cached, cached_notes = lookups[kind].rows(stored) if stored else (None, [])
        matrix = np.zeros((len(good), width), np.float32)
        notes_out = []
        next_cached = 0
        for r, i in enumerate(good):
            if id(items[i]) in row_of:
                matrix[r] = values[row_of[id(items[i])]]
                notes_out.append(notes[row_of[id(items[i])]] if notes is not None else "")
            else:
                matrix[r] = cached[next_cached]
                notes_out.append(cached_notes[next_cached])
                next_cached += 1
        arrays[kind] = matrix
        if kind == "text":
            read = notes_out
    return FeatureTable(
        np.array([start + i for i in good], dtype=np.int64), [items[i].key for i in good],
        Features(arrays["backbone"], arrays["detectors"], arrays["text"]),
        [(item.path, item.error) for item in items if item.error], read, [item.path for item in items], start,
    )
