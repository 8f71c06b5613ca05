"""The frozen models (detectors, backbone, OCR) as one bundle on one device, run on prepared batches.

:func:`create_frozen_models` is the one place the package makes them, so tests replace that one
function to share loaded models.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

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

    @property
    def prepared(self) -> list[dict[str, Any]]:
        """The detector items' inputs."""
        return [i.detector_input for i in self.detector_items]

    @property
    def notes(self) -> list[str]:
        """Per text item, the lines read, " / "-joined (kept in the text store, shown as evidence)."""
        return [" / ".join(line.text for line in lines) for lines in self.text_lines]


class Unread:
    """A batch's text items that no thread has taken yet: the two threads share a batch's OCR."""

    def __init__(self, n: int) -> None:
        self._next, self._n, self._lock = 0, n, threading.Lock()

    def take(self) -> int | None:
        """The index of an item to read, or None when every item is taken."""
        with self._lock:
            if self._next >= self._n:
                return None
            self._next += 1
            return self._next - 1


class FrozenModels:
    """The detector set and the backbone, on one device, run on prepared batches.

    On a CPU with two or more cores the models run as two stages side by side, each on half the
    cores: NanoDet + the backbone (onnxruntime, which releases the GIL) in a helper thread, and
    MTCNN + the expression model (PyTorch) in the calling thread. None of them scales linearly
    with threads (on 2 cores, 1 -> 2 threads makes NanoDet 1.8x and MTCNN 1.6x faster), so two
    one-thread stages finish a batch sooner than every model in turn on both cores. Outputs do
    not change: each model sees the same batches, and its results do not depend on its thread
    count (tests/test_speedups.py). ``concurrent=False`` runs them in turn on all cores.

    With the text detector (``text=True``: OCR, about as costly as all the other models together)
    the helper thread reads text instead, and the calling thread runs every other model and then
    joins it on the batch's posters left unread: a poster's OCR is one thread's work, so a lone
    poster costs max(OCR, the rest) instead of OCR + faces + the mirror image, and a run of OCR
    alone (training's reading of text) uses both cores.
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
        self.text = self._helper_text = None
        if text:
            from .detectors.text import TextReader

            self.text = TextReader(self.torch_threads)
            if concurrent:  # the helper thread's own reader (the same networks and settings)
                self._helper_text = TextReader(ort_threads)
        # Without OCR, a flipping view's mirror image runs in the PyTorch stage: with both images
        # the onnxruntime stage (NanoDet + backbone) was the slower one by ~40 % (bench/run.py).
        self.split_views = self.concurrent and not self.text_apart and self.backbone is not None and self.backbone.flip
        self.timings: dict[str, float] = {}
        self.model_batch = model_batch_size(self.device)
        self._helper = None

    @property
    def text_apart(self) -> bool:
        """Whether OCR runs in the helper thread (see the class's docstring)."""
        return self._helper_text is not None

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
                self._read_text(out, Unread(len(out.text_items)))
                yield tag, self._finish(out, objects, faces)
            return
        if self._helper is None:
            from concurrent.futures import ThreadPoolExecutor

            self._helper = ThreadPoolExecutor(1, thread_name_prefix="posterfusion-models")
        stage = torch.inference_mode()(self._helper_stage)
        ahead: collections.deque = collections.deque()
        try:
            for tag, items in batches:
                out = _split(items)
                unread = Unread(len(out.text_items))
                ahead.append((tag, out, unread, self._helper.submit(stage, out, unread)))
                if len(ahead) > 1:
                    yield self._finish_side_by_side(*ahead.popleft())
            while ahead:
                yield self._finish_side_by_side(*ahead.popleft())
        finally:
            for *_, pending in ahead:  # a consumer that stopped early: let the helper go idle
                pending.cancel()

    def _helper_stage(self, out: Extracted, unread: Unread) -> list:
        """The helper thread's share of a batch: its text where OCR runs, else the onnxruntime
        models (whose object detections it returns)."""
        if self.text_apart:
            self._read_text(out, unread, self._helper_text)
            return []
        return self._objects_and_embeddings(out)

    def _finish_side_by_side(self, tag: T, out: Extracted, unread: Unread, pending) -> tuple[T, Extracted]:
        """The calling thread's share of a batch whose helper share is already queued."""
        with torch_threads(self.torch_threads):
            try:
                objects = self._objects_and_embeddings(out) if self.text_apart else None
                faces = self._faces(out)
                self._read_text(out, unread)  # with OCR apart: the text items the helper has not taken
                mirrored = self._embed(out, mirrored=True) if self.split_views and out.backbone_items else None
            finally:
                helped = pending.result()
        if mirrored is not None:
            out.embeddings = (out.embeddings + mirrored) / 2
        return tag, self._finish(out, helped if objects is None else objects, faces)

    def _faces(self, out: Extracted) -> list:
        """The PyTorch stage: faces and their expressions."""
        return self.detectors.detect_faces(out.prepared, self.timings) if out.detector_items else []

    def _read_text(self, out: Extracted, unread: Unread, reader=None) -> None:
        """Text lines and their features (into ``out``) of the batch's ``unread`` text items, read
        by ``reader`` (default: the calling thread's) until no item is left."""
        if self.text is None or not out.text_items:
            return
        from .detectors import schema

        reader = reader or self.text
        with timed(self.timings, "text" if reader is self.text else "text (helper thread)"):
            while (i := unread.take()) is not None:
                lines, detected, area = reader.read(out.text_items[i].text_input)
                out.text_lines[i], out.text_rows[i] = lines, schema.text_features(lines, detected, area)

    def _finish(self, out: Extracted, objects: list, faces: list) -> Extracted:
        if out.text_items:
            out.text_features = np.stack(out.text_rows)
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
