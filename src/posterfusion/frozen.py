"""The frozen models (detectors, backbone, OCR) as one bundle on one device, run on prepared batches.

:func:`create_frozen_models` is the one place the package makes them, so tests replace that one
function to share loaded models.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from . import onnx_runtime, settings
from .backbone import create_backbone
from .defaults import DEFAULT_BACKBONE, DEFAULT_VIEW
from .detectors import DetectorSet, Evidence
from .timing import timed
from .dataset import Item

T = TypeVar("T")


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
    text_rows: list = field(default_factory=list)  # per text item, its text features
    faces: list = field(default_factory=list)  # per detector item, its faces (a task's output)
    object_parts: list = field(default_factory=list)  # per object-detector call, its detections
    embedding_parts: list = field(default_factory=list)  # per backbone call, its embeddings

    @property
    def prepared(self) -> list[dict[str, Any]]:
        """The detector items' inputs."""
        return [i.detector_input for i in self.detector_items]

    @property
    def notes(self) -> list[str]:
        """Per text item, the lines read, " / "-joined (kept in the text store, shown as evidence)."""
        return [" / ".join(line.text for line in lines) for lines in self.text_lines]


class WorkList:
    """A batch's tasks, each taken once, in order, by whichever thread is free.

    Each task is a callable of the lane (0: the calling thread, 1: the helper) that runs it, so a
    task can use that thread's own OCR reader.
    """

    def __init__(self, tasks: list[Callable[[int], None]]) -> None:
        self._tasks, self._next, self._lock = tasks, 0, threading.Lock()

    def take(self) -> Callable[[int], None] | None:
        """The next task, or None when every task is taken."""
        with self._lock:
            if self._next >= len(self._tasks):
                return None
            self._next += 1
            return self._tasks[self._next - 1]

    def stop(self) -> None:
        """Hand out no more tasks (a lane failed: the batch is lost anyway)."""
        with self._lock:
            self._next = len(self._tasks)


class FrozenModels:
    """The detector set, the backbone and OCR, on one device, run on prepared batches.

    On a CPU with two or more cores two threads share each batch, each on half the cores: a
    batch is a list of tasks (MTCNN + the expression model over the whole batch, then each
    poster's OCR, backbone and object detections), and each thread takes the next task left
    until none is. None of the models scales linearly with threads (on 2 cores, 1 -> 2 threads
    makes NanoDet 1.8x and MTCNN 1.6x faster), so two one-thread lanes finish a batch sooner than
    every model in turn on both cores; and taking tasks from one list keeps both cores busy
    whatever the mix of work (fixed roles, one thread for onnxruntime's models and one for
    PyTorch's, left one idle ~30 % of a build). MTCNN runs once over the whole batch: its integer
    crop windows make its faces depend on the batch (see :meth:`DetectorSet.detect_faces`).
    Outputs do not change with the lanes: each task computes what it did in turn, and no model's
    result depends on its thread count (tests/test_speedups.py). ``concurrent=False`` runs the
    same tasks in turn on all cores (as on a GPU).
    """

    def __init__(self, objects: str | None = "nanodet", backbone: str | None = DEFAULT_BACKBONE,
                 device: str = "auto", backbone_weights: str | Path | None = None,
                 concurrent: bool | None = None, backbone_view: str | None = DEFAULT_VIEW, text: bool = False) -> None:
        self.device = resolve_device(device)
        settings.apply(self.device)
        cores = torch.get_num_threads()
        if concurrent is None:
            concurrent = self.device.type == "cpu" and cores >= 2
        self.concurrent = concurrent
        # Each lane's threads: the calling thread's and the helper's half of the cores.
        self.lane_threads = (cores - cores // 2, max(1, cores // 2)) if concurrent else (cores,)
        ort_threads = self.lane_threads[1] if concurrent else None
        self.detectors = DetectorSet(objects, self.device, ort_threads) if objects else None
        ort = onnx_runtime.enabled(self.device)
        self.backbone = create_backbone(backbone, weights=backbone_weights, lazy=ort, view=backbone_view).to(self.device) if backbone else None
        if self.backbone is not None and ort:
            self.backbone.use_onnxruntime(ort_threads)  # frozen here: the faster CPU runtime, same numbers
        # One OCR reader per lane (the same networks and settings): a reader is not shared.
        self.readers: tuple = ()
        if text:
            from .detectors.text import TextReader

            self.readers = tuple(TextReader(n) for n in self.lane_threads)
        self.timings: dict[str, float] = {}
        self.model_batch = model_batch_size(self.device)
        self._helper = None

    @property
    def text(self):
        """The calling thread's OCR reader (None without OCR)."""
        return self.readers[0] if self.readers else None

    @torch.inference_mode()
    def stream(self, batches: Iterable[tuple[T, list[Item]]]) -> Iterator[tuple[T, Extracted]]:
        """Each ``(tag, items)`` batch with its outputs, in order, as the models finish them.

        NanoDet and the backbone are fed ``model_batch`` posters at a time; MTCNN the whole batch
        (see :meth:`DetectorSet.detect_faces`).
        """
        if self.concurrent and self._helper is None:
            from concurrent.futures import ThreadPoolExecutor

            self._helper = ThreadPoolExecutor(1, thread_name_prefix="posterfusion-models")
        for tag, items in batches:
            out = _split(items)
            work = WorkList(self._tasks(out))
            if self._helper is None:
                self._lane(work, 0)
            else:
                pending = self._helper.submit(torch.inference_mode()(self._lane), work, 1)
                failed = True
                try:
                    self._lane(work, 0)
                    failed = False
                finally:
                    if failed:
                        work.stop()
                    error = pending.exception()  # waits for the helper's last task
                if error is not None:
                    raise error
            yield tag, self._finish(out)

    def _lane(self, work: WorkList, lane: int) -> None:
        """One thread's share of a batch: tasks until none is left."""
        with torch_threads(self.lane_threads[lane]):
            while (task := work.take()) is not None:
                task(lane)

    def _tasks(self, out: Extracted) -> list[Callable[[int], None]]:
        """A batch's work, longest tasks first so that the last ones, which may leave a thread
        idle while the other finishes, are short: faces over the batch, each poster's OCR, then
        the backbone's and the object detector's calls."""
        tasks: list[Callable[[int], None]] = []
        prepared = out.prepared
        if prepared:
            tasks.append(lambda lane: setattr(out, "faces", self.detectors.detect_faces(prepared, self.timings)))
        if self.readers:
            tasks += [functools.partial(self._read_text, out, i) for i in range(len(out.text_items))]
        step = self.model_batch or max(len(out.backbone_items), len(prepared), 1)
        if self.backbone is not None:
            chunks = _chunks(out.backbone_items, step)
            out.embedding_parts = [None] * len(chunks)
            tasks += [functools.partial(self._embed, out, k, chunk) for k, chunk in enumerate(chunks)]
        if prepared:
            chunks = _chunks(prepared, step)
            out.object_parts = [None] * len(chunks)
            tasks += [functools.partial(self._objects, out, k, chunk) for k, chunk in enumerate(chunks)]
        return tasks

    def _objects(self, out: Extracted, k: int, prepared: list, lane: int) -> None:
        out.object_parts[k] = self.detectors.detect_objects(prepared, self.timings)

    def _embed(self, out: Extracted, k: int, items: list[Item], lane: int) -> None:
        with timed(self.timings, "backbone"):
            batch = torch.stack([i.backbone_input for i in items]).to(self.device)
            out.embedding_parts[k] = self.backbone.embed(batch).float().cpu().numpy()

    def _read_text(self, out: Extracted, i: int, lane: int) -> None:
        """Poster ``i``'s text lines and text features, read by the lane's own reader."""
        from .detectors import schema

        with timed(self.timings, "text" if lane == 0 else "text (helper thread)"):
            lines, detected, area = self.readers[lane].read(out.text_items[i].text_input)
            out.text_lines[i], out.text_rows[i] = lines, schema.text_features(lines, detected, area)

    def _finish(self, out: Extracted) -> Extracted:
        if out.text_items:
            out.text_features = np.stack(out.text_rows)
        if out.backbone_items:
            out.embeddings = np.concatenate(out.embedding_parts)
        if out.detector_items:
            objects = [d for part in out.object_parts for d in part]
            out.features, out.evidence = self.detectors.assemble(out.prepared, objects, out.faces)
        return out


def _chunks(items: list, step: int) -> list[list]:
    """``items`` in consecutive runs of ``step`` (one model call each)."""
    return [items[s : s + step] for s in range(0, len(items), step)]


def _split(items: list[Item]) -> Extracted:
    """An empty :class:`Extracted` naming which items each stage has to do."""
    text_items = [i for i in items if i.text_input is not None]
    return Extracted(detector_items=[i for i in items if i.detector_input is not None],
                     backbone_items=[i for i in items if i.backbone_input is not None],
                     text_items=text_items, text_lines=[None] * len(text_items), text_rows=[None] * len(text_items))


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
