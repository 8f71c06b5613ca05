"""Posters -> frozen-model features, in batches, with one read and one decode per poster.

DataLoader workers read each file once, hash it (the cache key), skip it if the cache already has
it, decode it and prepare every model's input; the main process runs the models on whole
batches. Batches are cut from the manifest in order, so a resumed run forms the same batches as
an uninterrupted one and yields the same values.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, TypeVar

import numpy as np
import torch

from . import onnx_runtime, settings

from .backbone import Backbone, create_backbone
from .cache import FeatureStore, disk_full_reported
from .defaults import DEFAULT_BACKBONE, DEFAULT_VIEW
from .detectors import DetectorSet, Evidence, Preparer
from .images import BadImage, content_key, decode_bytes, read_poster_bytes
from .timing import timed

T = TypeVar("T")


@dataclass
class Item:
    """One poster after the worker: its key, and model inputs or the reason it failed."""

    path: str
    key: str = ""
    error: str = ""
    cached: bool = False
    detector_input: dict[str, Any] | None = None
    backbone_input: torch.Tensor | None = None
    text_input: np.ndarray | None = None


class PosterDataset(torch.utils.data.Dataset):
    """Reads, hashes, decodes and prepares posters; runs inside DataLoader workers."""

    def __init__(self, paths: list[str], preparer: Preparer | None, backbone: Backbone | None,
                 detector_done: frozenset[str] = frozenset(), backbone_done: frozenset[str] = frozenset(),
                 read_text: bool = False, text_done: frozenset[str] = frozenset()) -> None:
        self.paths = paths
        self.preparer = preparer
        self.backbone_prepare = backbone.prepare if backbone is not None else None
        self.read_text = read_text
        self.detector_done = detector_done
        self.backbone_done = backbone_done
        self.text_done = text_done

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | str) -> Item:
        """The poster at ``index`` in ``paths``, or the one at the path ``index`` (what a run over a
        stream of paths sends its workers, the paths being read as it goes)."""
        item = Item(self.paths[index] if isinstance(index, int) else index)
        try:
            data = read_poster_bytes(item.path)
        except BadImage as exc:
            item.error = str(exc)
            return item
        item.key = content_key(data)
        need_detectors = self.preparer is not None and item.key not in self.detector_done
        need_backbone = self.backbone_prepare is not None and item.key not in self.backbone_done
        need_text = self.read_text and item.key not in self.text_done
        if not (need_detectors or need_backbone or need_text):
            item.cached = True
            return item
        try:
            rgb = decode_bytes(data)
        except BadImage as exc:
            item.error = str(exc)
            return item
        if need_detectors:
            item.detector_input = self.preparer(rgb)
        if need_backbone:
            item.backbone_input = self.backbone_prepare(rgb)
        if need_text:
            from .detectors import text

            item.text_input = text.prepare(rgb)
        return item


def _collate(items: list[Item]) -> list[Item]:
    """In a worker: each kind of model input in one tensor for the batch, the items holding views.

    Every tensor a worker sends crosses in its own shared-memory segment and file descriptor
    (~0.5 ms each, paid by the main process); one per kind instead of three per poster cuts the
    main process's wait for a batch of 32 from ~55 ms to a few.
    """
    detector_inputs = [i.detector_input for i in items if i.detector_input is not None]
    for name in ("objects", "canvas"):  # fixed-size uint8 tensors (YOLO's inputs are arrays)
        holders = [d for d in detector_inputs if isinstance(d[name], torch.Tensor)]
        for d, view in zip(holders, _one_tensor([d[name] for d in holders])):
            d[name] = view
    holders = [i for i in items if i.backbone_input is not None]
    for item, view in zip(holders, _one_tensor([i.backbone_input for i in holders])):
        item.backbone_input = view
    return items


def _one_tensor(tensors: list[torch.Tensor]) -> torch.Tensor | list:
    return torch.stack(tensors) if tensors else []


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only resize; the models get the cores


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding workers: one per spare core, at least one so decoding overlaps inference.

    On a CPU the models need the cores (at most 4 workers); a GPU is fed by the CPU, so there
    every core but two (the main process and its writer) decodes, up to 12.
    """
    cores = os.cpu_count() or 2
    if torch.device(device).type == "cuda":
        return max(1, min(12, cores - 2))
    return max(1, min(4, cores - 1))


def iterate(dataset: PosterDataset, batch_size: int, workers: int,
            stream: Iterable[str] | None = None) -> Iterator[list[Item]]:
    """Batches of prepared items in manifest order, decoded in parallel with inference; given
    ``stream``, of its paths instead, taken from it only as the workers need them (one pool of
    workers for a whole run, however long: a worker forked again later would copy the pages the
    models have written since, ~0.7 GB each time)."""
    indices = iter(stream if stream is not None else range(len(dataset)))
    if workers <= 0:
        while batch := [dataset[i] for i in itertools.islice(indices, batch_size)]:
            yield batch
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=False,
    )
    # Forked workers share the parent's pages until they write to them, and Python's collector
    # writes to every object it scans; frozen, the parent's objects are never scanned there
    # (4 workers, 1,600 posters: each grew by ~25 MB instead of ~45 MB).
    gc.freeze()
    try:
        batches = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()
    yield from batches


@dataclass
class Extracted:
    """Model outputs for the items of one batch that needed work."""

    detector_items: list[Item] = field(default_factory=list)
    features: np.ndarray | None = None
    evidence: list[Evidence] = field(default_factory=list)
    backbone_items: list[Item] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    text_items: list[Item] = field(default_factory=list)
    text_features: np.ndarray | None = None
    text_lines: list = field(default_factory=list)  # per text item, the Lines read

    @property
    def prepared(self) -> list[dict[str, Any]]:
        """The detector items' inputs."""
        return [i.detector_input for i in self.detector_items]

    @property
    def notes(self) -> list[str]:
        """Per text item, the lines read, " / "-joined (kept in the text store, shown as evidence)."""
        return [" / ".join(line.text for line in lines) for lines in self.text_lines]


class FrozenModels:
    """The detector set and the backbone, on one device, run on prepared batches.

    On a CPU with two or more cores the models run as two stages side by side, each on half the
    cores: NanoDet + the backbone (onnxruntime, which releases the GIL) in a helper thread, and
    MTCNN + the expression model (PyTorch) in the calling thread. None of them scales linearly
    with threads (on 2 cores, 1 -> 2 threads makes NanoDet 1.8x and MTCNN 1.6x faster), so two
    one-thread stages finish a batch sooner than every model in turn on both cores. Outputs do
    not change: each model sees the same batches, and its results do not depend on its thread
    count (tests/test_speedups.py). ``concurrent=False`` runs them in turn on all cores.

    The text detector (``text=True``, OCR: ~3x the other models' cost together) runs in the PyTorch
    stage, which is the lighter one without it.
    """

    def __init__(self, objects: str | None = "nanodet", backbone: str | None = DEFAULT_BACKBONE,
                 device: str = "auto", backbone_weights: str | Path | None = None,
                 concurrent: bool | None = None, backbone_view: str | None = DEFAULT_VIEW, text: bool = False) -> None:
        self.device = resolve_device(device)
        settings.apply(self.device)
        cores = torch.get_num_threads()
        if concurrent is None:
            concurrent = self.device.type == "cpu" and cores >= 2 and (objects is not None or text)
        self.concurrent = concurrent
        # Threads of the PyTorch stage (faces) and of the onnxruntime stage (objects, backbone).
        self.torch_threads = cores - cores // 2 if concurrent else cores
        ort_threads = max(1, cores // 2) if concurrent else None
        self.detectors = DetectorSet(objects, self.device, ort_threads) if objects else None
        ort = onnx_runtime.enabled(self.device)
        self.backbone = create_backbone(backbone, weights=backbone_weights, lazy=ort, view=backbone_view).to(self.device) if backbone else None
        if self.backbone is not None and ort:
            self.backbone.use_onnxruntime(ort_threads)  # frozen here: the faster CPU runtime, same numbers
        if text:
            from .detectors.text import TextReader

            self.text = TextReader(self.torch_threads)
        else:
            self.text = None
        # A flipping view's mirror image runs in the PyTorch stage: with both images the
        # onnxruntime stage (NanoDet + backbone) was the slower one by ~40 % (bench/run.py).
        self.split_views = self.concurrent and self.backbone is not None and self.backbone.flip
        self.timings: dict[str, float] = {}
        self.model_batch = model_batch_size(self.device)
        self._helper = None

    @torch.inference_mode()
    def stream(self, batches: Iterable[tuple[T, list[Item]]]) -> Iterator[tuple[T, Extracted]]:
        """Each ``(tag, items)`` batch with its outputs, in order, as the models finish them.

        NanoDet and the backbone are fed ``model_batch`` posters at a time; MTCNN the whole batch
        (see :meth:`DetectorSet.detect_faces`). With side-by-side stages the onnxruntime stage
        runs up to one batch ahead of the PyTorch one: a batch's cost differs between them (MTCNN's
        follows the faces in it), and the queue evens that out where a per-batch join would leave
        one core idle.
        """
        if not self.concurrent:
            for tag, items in batches:
                out = _split(items)
                objects = self._objects_and_embeddings(out)
                faces = self._faces(out)
                self._read_text(out)
                yield tag, self._finish(out, objects, faces)
            return
        if self._helper is None:
            from concurrent.futures import ThreadPoolExecutor

            self._helper = ThreadPoolExecutor(1, thread_name_prefix="posterfusion-models")
        stage = torch.inference_mode()(self._objects_and_embeddings)
        ahead: collections.deque = collections.deque()
        try:
            for tag, items in batches:
                out = _split(items)
                ahead.append((tag, out, self._helper.submit(stage, out)))
                if len(ahead) > 1:
                    yield self._finish_side_by_side(*ahead.popleft())
            while ahead:
                yield self._finish_side_by_side(*ahead.popleft())
        finally:
            for _, _, pending in ahead:  # a consumer that stopped early: let the helper go idle
                pending.cancel()

    def _finish_side_by_side(self, tag: T, out: Extracted, pending) -> tuple[T, Extracted]:
        """The PyTorch stage for a batch whose onnxruntime stage is already queued."""
        with torch_threads(self.torch_threads):
            try:
                faces = self._faces(out)
                self._read_text(out)
                mirrored = self._embed(out, mirrored=True) if self.split_views and out.backbone_items else None
            finally:
                objects = pending.result()
        if mirrored is not None:
            out.embeddings = (out.embeddings + mirrored) / 2
        return tag, self._finish(out, objects, faces)

    def _faces(self, out: Extracted) -> list:
        """The PyTorch stage: faces and their expressions."""
        return self.detectors.detect_faces(out.prepared, self.timings) if out.detector_items else []

    def _read_text(self, out: Extracted) -> None:
        """Text lines and their features (into ``out``), in the PyTorch stage's thread."""
        if self.text is None or not out.text_items:
            return
        from .detectors import schema

        with timed(self.timings, "text"):
            rows = []
            for item in out.text_items:
                lines, detected, area = self.text.read(item.text_input)
                out.text_lines.append(lines)
                rows.append(schema.text_features(lines, detected, area))
            out.text_features = np.stack(rows)

    def _finish(self, out: Extracted, objects: list, faces: list) -> Extracted:
        if out.detector_items:
            out.features, out.evidence = self.detectors.assemble(out.prepared, objects, faces)
        return out

    def _objects_and_embeddings(self, out: Extracted) -> list:
        """The onnxruntime stage: object detections (returned) and embeddings (into ``out``)."""
        objects = self.detectors.detect_objects(out.prepared, self.timings, self.model_batch) if out.detector_items else []
        if self.backbone is not None and out.backbone_items:
            out.embeddings = self._embed(out, mirrored=False if self.split_views else None)
        return objects

    def _embed(self, out: Extracted, mirrored: bool | None = None) -> np.ndarray:
        """Embeddings of the batch's backbone items: of the view (None: both images of a flipping
        view, averaged), or of the poster or its mirror image alone."""
        step = self.model_batch or len(out.backbone_items)
        embeddings = []
        with timed(self.timings, "backbone"):
            for s in range(0, len(out.backbone_items), step):
                batch = torch.stack([i.backbone_input for i in out.backbone_items[s : s + step]]).to(self.device)
                embed = self.backbone.embed if mirrored is None else self.backbone.embed_image
                embeddings.append(embed(batch.flip(-1) if mirrored else batch).float().cpu().numpy())
        return np.concatenate(embeddings)


def _split(items: list[Item]) -> Extracted:
    """An empty :class:`Extracted` naming which items each stage has to do."""
    return Extracted(detector_items=[i for i in items if i.detector_input is not None],
                     backbone_items=[i for i in items if i.backbone_input is not None],
                     text_items=[i for i in items if i.text_input is not None])


def create_frozen_models(**spec: Any) -> FrozenModels:
    """The frozen models (:class:`FrozenModels`' keyword arguments), made here and nowhere else in
    the package, so that tests share loaded models by replacing this one function (tests/conftest.py)."""
    return FrozenModels(**spec)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``n`` for the block."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_batch_size(device: torch.device) -> int | None:
    """Posters per NanoDet and backbone call: 1 on a CPU, whole batches on a GPU.

    On a CPU small batches keep activations in the caches and memory low: with the backbone
    ensemble at 260x372, one poster per call instead of 8 took the build from 6.95 to 8.98
    posters/s and its peak memory from 2.2 to 1.4 GB on 2 cores (bench/run.py; the backbone's
    in-build time 152 -> 107 ms/poster). A GPU wants the largest batch.
    ``POSTERFUSION_MODEL_BATCH`` overrides it (0: whole batches).
    """
    override = settings.model_batch_override()
    if override is not None:
        return override or None
    return 1 if device.type == "cpu" else None


def resolve_device(device: str) -> torch.device:
    """'auto' picks the GPU when there is one; an unavailable device is a clear error."""
    from .errors import PosterFusionError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PosterFusionError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PosterFusionError(f"--device {device}: not a device name (use auto, cpu, cuda or cuda:N)") from None


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


def build_cache(paths: list[str], stores: dict[str, "Store"], models: FrozenModels, batch_size: int = 32,
                workers: int | None = None, progress: Progress | None = None) -> BuildSummary:
    """Compute what the stores lack for these posters; each batch is committed as it finishes."""
    summary = BuildSummary()
    for _ in extract_batches(paths, stores, models, summary, batch_size, workers, progress):
        pass
    return summary


def extract_batches(paths: Iterable[str], stores: dict[str, "Store"], models: FrozenModels, summary: BuildSummary,
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


def poster_dataset(stores: dict[str, "Store"], preparer: Preparer | None, backbone: Backbone | None,
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


def commit_batches(results: Iterable[tuple[tuple[list[Item], int], Extracted]], stores: dict[str, "Store"],
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


def _append(store: "Store | None", items: list[Item], values: np.ndarray | None, notes: list[str] | None = None) -> None:
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


class Store(Protocol):
    kind: str
    identity: dict
    columns: list[str]

    def keys(self) -> set[str]: ...
    def append(self, keys: list[str], paths: list[str], values: np.ndarray, notes: list[str] | None = None) -> None: ...
    def read(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]: ...
    def notes(self, keys: list[str]) -> dict[str, str]: ...
    def compact(self) -> None: ...


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
