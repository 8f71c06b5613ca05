"""Posters -> frozen-model features -> the cache's stores: ``detect-cache build`` and the
computing half of every command that needs features.

Batches come from :mod:`~posterfusion.dataset` in input order, the models of
:mod:`~posterfusion.frozen` run on them, and a writer thread commits each batch's rows to the
stores while the next batch is computed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from .backbone import Backbone
from .cache import FeatureStore, MemoryStore, Store, disk_full_reported
from .detectors import Preparer
from .timing import timed
from .dataset import Item, PosterDataset, default_workers, iterate
from .frozen import Extracted, FrozenModels


class Progress(Protocol):
    def advance(self, n: int) -> None: ...
    def failure(self, path: str, reason: str) -> None: ...


@dataclass
class BuildSummary:
    done: int = 0
    cached: int = 0
    skipped: int = 0  # duplicates of a poster already handled in this run
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    keys: list[str] | None = field(default_factory=list)  # per input path, "" where it failed

    @property
    def posters_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def build_cache(paths: list[str], stores: dict[str, Store], models: FrozenModels, batch_size: int = 32,
                workers: int | None = None, progress: Progress | None = None) -> BuildSummary:
    """Compute what the stores lack for these posters; each batch is committed as it finishes."""
    summary = BuildSummary()
    for _ in extract_batches(paths, stores, models, summary, batch_size, workers, progress):
        pass
    return summary


def extract_batches(paths: Iterable[str], stores: dict[str, Store], models: FrozenModels, summary: BuildSummary,
                    batch_size: int = 32, workers: int | None = None, progress: Progress | None = None,
                    repeat_duplicates: bool = False) -> Iterator[tuple[list[Item], Extracted]]:
    """Each batch's items (in input order) with the outputs of the models that ran on them, once
    its rows are handed to the stores' writer; ``summary`` is filled in as batches pass (its
    ``keys`` too unless they are None). ``paths`` are read as the run goes: they may be a lazy
    walk or a pipe.

    Items that failed carry their error, cached ones ``cached``; the rest are in the outputs. A
    poster met twice in a run is skipped the second time (its rows are in the stores), unless
    ``repeat_duplicates``: a consumer that takes features from the outputs, not from the stores,
    gets it computed again (and nothing per poster is kept).
    """
    dataset = poster_dataset(stores, models.detectors.preparer if models.detectors else None, models.backbone,
                             models.text is not None)
    source = iter(paths)
    first = list(itertools.islice(source, batch_size + 1))
    if workers is None:  # one batch decodes in the main process sooner than a worker starts
        workers = default_workers(models.device) if len(first) > batch_size else 0
    seen: set[str] | None = None if repeat_duplicates else set()
    start = time.perf_counter()
    batches = iterate(dataset, batch_size, workers, itertools.chain(first, source))

    def todo_batches() -> Iterator[tuple[tuple[list[Item], int], list[Item]]]:
        """Each batch's posters that need the models, tagged (the batch's items, how many to do)."""
        while True:
            with timed(models.timings, "wait"):  # the models idle while no prepared batch is ready
                items = next(batches, None)
            if items is None:
                return
            todo = take_todo(items, summary, progress, seen)
            yield (items, len(todo)), todo

    yield from commit_batches(models.stream(todo_batches()), stores, summary, progress, models.timings, start)


def poster_dataset(stores: dict[str, Store], preparer: Preparer | None, backbone: Backbone | None,
                   read_text: bool) -> PosterDataset:
    """A dataset that prepares only what ``stores`` lack (their keys read once, now)."""
    done = {kind: frozenset(stores[kind].keys()) if kind in stores else frozenset()
            for kind in ("detectors", "backbone", "text")}
    return PosterDataset([], preparer, backbone, done["detectors"], done["backbone"], read_text, done["text"])


def take_todo(items: list[Item], summary: BuildSummary, progress: Progress | None = None,
              seen: set[str] | None = None) -> list[Item]:
    """A batch's items the models must run on, each item counted in ``summary`` (its key kept
    unless ``summary.keys`` is None) and a failure reported to ``progress`` as it is met; a key
    already in ``seen`` is a duplicate (skipped), and the others are added to it."""
    todo = []
    for item in items:
        if summary.keys is not None:
            summary.keys.append(item.key if not item.error else "")
        if item.error:
            summary.failed += 1
            summary.failures.append((item.path, item.error))
            if progress:
                progress.failure(item.path, item.error)
        elif item.cached:
            summary.cached += 1
        elif seen is not None and item.key in seen:
            summary.skipped += 1
        else:
            if seen is not None:
                seen.add(item.key)
            todo.append(item)
    return todo


def commit_batches(results: Iterable[tuple[tuple[list[Item], int], Extracted]], stores: dict[str, Store],
                   summary: BuildSummary, progress: Progress | None, timings: dict[str, float],
                   start: float) -> Iterator[tuple[list[Item], Extracted]]:
    """Hands each ``((items, done), outputs)`` batch's rows to the stores' writer, counts it and
    yields it; then times the run from ``start`` and compacts the stores. Every build (local or on
    Ray) commits through here, so their parts and their reports are the same."""
    detector_store, backbone_store, text_store = stores.get("detectors"), stores.get("backbone"), stores.get("text")
    # Parquet writes (and their fsync) overlap the next batch's inference; in-memory stores
    # take their rows at once.
    writer = _Writer(background=any(isinstance(store, FeatureStore) for store in stores.values()))
    with disk_full_reported(stores.values()):
        try:
            for (items, done), result in results:
                with timed(timings, "write"):  # only the wait for the previous batch's write
                    writer.submit(_append, detector_store, result.detector_items, result.features)
                    writer.submit(_append, backbone_store, result.backbone_items, result.embeddings)
                    writer.submit(_append, text_store, result.text_items, result.text_features, result.notes)
                summary.done += done
                if progress:
                    progress.advance(len(items))
                yield items, result
        finally:
            with timed(timings, "write"):
                writer.close()
        summary.seconds = time.perf_counter() - start
        for store in stores.values():
            store.compact()


def _append(store: Store | None, items: list[Item], values: np.ndarray | None, notes: list[str] | None = None) -> None:
    if store is not None and values is not None:
        store.append([i.key for i in items], [i.path for i in items], values, notes)


class _Writer:
    """Commits batches to the stores in a background thread while the models run the next one.

    Writes stay in order, at most two (one batch) in flight, so a killed run still loses at
    most the batches in flight; a failed write raises at the next ``submit`` or at ``close``.
    """

    def __init__(self, background: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="posterfusion-writer") if background else None
        self.pending: list = []

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            fn(*args)
            return
        if len(self.pending) >= 2:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.pop(0).result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)




def open_stores(models: FrozenModels, cache_dir: str | Path | None = None) -> dict[str, Store]:
    """The stores for these models: in a cache folder (created when new), or in memory."""
    specs = []
    if models.detectors is not None:
        specs.append(("detectors", models.detectors.identity, models.detectors.columns))
    if models.backbone is not None:
        specs.append(("backbone", models.backbone.identity, [f"cnn_{i:04d}" for i in range(models.backbone.dim)]))
    if models.text is not None:
        from .detectors import schema

        specs.append(("text", models.text.identity | {"schema_version": schema.SCHEMA_VERSION}, list(schema.TEXT_COLUMNS)))
    if cache_dir is None:
        return {kind: MemoryStore(kind, identity, columns) for kind, identity, columns in specs}
    return {kind: FeatureStore.open(cache_dir, kind, identity, columns) for kind, identity, columns in specs}
