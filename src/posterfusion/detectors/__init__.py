"""Frozen detectors behind one interface, and the set of them that makes the feature vector.

Every detector has ``identity`` (what produced a feature: name and weights checksum), a
worker-side ``prepare`` (resize only; runs beside inference in DataLoader workers) and a batched
``detect``. :class:`DetectorSet` runs objects, then faces -> expressions (two stages that may run
side by side), and assembles the schema's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PosterFusionError
from ..timing import timed
from . import faces as faces_module
from . import schema
from .base import Detections

DEFAULT_OBJECTS = "nanodet"
_THUMB_W, _THUMB_H = 64, 96  # colour statistics need no more pixels than this


@dataclass
class Faces:
    """MTCNN's output for one poster (boxes on its canvas) and each face's expression."""

    boxes: np.ndarray
    probs: np.ndarray
    expressions: np.ndarray  # (n_faces, 7)


@dataclass
class Evidence:
    """What the detectors saw on one poster, for explanations in ``fusion predict``."""

    objects: Detections
    faces: Detections
    expressions: np.ndarray  # (n_faces, 7)


def object_prepare(objects: str):
    """The worker-side preprocessing of an object backend, without loading its model."""
    if objects == "nanodet":
        from .nanodet import resize_input

        return resize_input
    if objects.startswith("yolo:"):
        from .yolo import prepare

        return prepare
    raise PosterFusionError(f"unknown object detector '{objects}'; use 'nanodet' or 'yolo:PATH' to a .pt/.onnx file")


class Preparer:
    """Worker-side work for one poster: every model's input from one decoded array.

    Kept free of models so that DataLoader workers stay light.
    """

    def __init__(self, objects: str) -> None:
        self.objects = objects
        self._objects = object_prepare(objects)

    def __call__(self, rgb: np.ndarray) -> dict[str, Any]:
        from ..images import resize

        canvas, geometry = faces_module.prepare(rgb)
        return {
            "objects": self._objects(rgb),
            "canvas": canvas,
            "geometry": geometry,
            "size": (rgb.shape[1], rgb.shape[0]),
            "image": schema.image_features(resize(rgb, _THUMB_W, _THUMB_H)),
        }


class DetectorSet:
    """Objects + faces + expressions, producing :data:`schema.COLUMNS` per poster."""

    def __init__(self, objects: str = DEFAULT_OBJECTS, device: str | torch.device = "cpu",
                 threads: int | None = None) -> None:
        """``threads``: the onnxruntime threads of the object detector (default: PyTorch's)."""
        from .expressions import ExpressionClassifier

        self.objects_name = objects
        self.device = torch.device(device)
        if objects == "nanodet":
            from .nanodet import NanoDetDetector

            self.objects = NanoDetDetector(self.device, threads)
        elif objects.startswith("yolo:"):
            from .yolo import YoloDetector

            self.objects = YoloDetector(objects[len("yolo:"):], self.device)
        else:
            object_prepare(objects)  # raises the one-line error
        self.faces = faces_module.FaceDetector(self.device)
        self.expressions = ExpressionClassifier(self.device)
        self.preparer = Preparer(objects)
        self.identity = {
            "schema_version": schema.SCHEMA_VERSION,
            "objects": self.objects.identity,
            "faces": self.faces.identity,
            "expressions": self.expressions.identity,
        }
        self.columns = list(schema.COLUMNS)

    def detect_objects(self, prepared: list[dict[str, Any]], timings: dict[str, float] | None = None,
                       batch: int | None = None) -> list[Detections]:
        """Object detections, ``batch`` posters per call (all when None): the detector's outputs do
        not depend on the batch beyond float rounding."""
        with timed(timings, "objects"):
            step = batch or max(len(prepared), 1)
            found: list[Detections] = []
            for s in range(0, len(prepared), step):
                chunk = prepared[s : s + step]
                if isinstance(chunk[0]["objects"], torch.Tensor):
                    found += self.objects.detect(torch.stack([p["objects"] for p in chunk]))
                else:
                    found += self.objects.detect([p["objects"] for p in chunk])
            return found

    def detect_faces(self, prepared: list[dict[str, Any]], timings: dict[str, float] | None = None) -> list[Faces]:
        """Faces and their expressions, MTCNN over the whole batch.

        MTCNN's integer crop windows turn float-rounding differences between batch sizes into
        different faces on ~0.3% of posters, so its batch stays what it always was (``--batch-size``).
        """
        with timed(timings, "faces"):
            found = self.faces.detect(torch.stack([p["canvas"] for p in prepared]))
        with timed(timings, "expressions"):
            crops = [self.expressions.crop(p["canvas"].numpy(), boxes) for p, (boxes, _) in zip(prepared, found)]
            probs = self.expressions.classify(crops)
        return [Faces(boxes, face_probs, expr) for (boxes, face_probs), expr in zip(found, probs)]

    def assemble(self, prepared: list[dict[str, Any]], objects: list[Detections],
                 faces: list[Faces]) -> tuple[np.ndarray, list[Evidence]]:
        """Features (B, len(COLUMNS)) and evidence from both stages' outputs."""
        if not prepared:
            return np.zeros((0, len(self.columns)), np.float32), []
        rows, evidence = [], []
        for item, det, face in zip(prepared, objects, faces):
            found = faces_module.faces_as_detections(face.boxes, face.probs, item["geometry"], item["size"])
            rows.append(schema.assemble(schema.object_features(det), schema.face_features(found, face.expressions), item["image"]))
            evidence.append(Evidence(det, found, face.expressions))
        return np.stack(rows), evidence
