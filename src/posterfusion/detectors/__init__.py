"""Frozen detectors behind one interface, and the set of them that makes the feature vector.

Every detector has ``identity`` (what produced a feature: name and weights checksum), a
worker-side ``prepare`` (resize only; runs beside inference in DataLoader workers) and a batched
``detect``. :class:`DetectorSet` chains objects -> faces -> expressions -> schema.
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

    def __init__(self, objects: str = DEFAULT_OBJECTS, device: str | torch.device = "cpu") -> None:
        from .expressions import ExpressionClassifier

        self.objects_name = objects
        self.device = torch.device(device)
        if objects == "nanodet":
            from .nanodet import NanoDetDetector

            self.objects = NanoDetDetector(self.device)
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

    def run(self, prepared: list[dict[str, Any]], timings: dict[str, float] | None = None,
            object_batch: int | None = None) -> tuple[np.ndarray, list[Evidence]]:
        """Features (B, len(COLUMNS)) and evidence for prepared posters, every model batched.

        The object detector takes ``object_batch`` posters at a time (all when None): its outputs
        do not depend on the batch beyond float rounding. MTCNN always takes the whole batch: its
        integer crop windows turn rounding differences between batch sizes into different faces
        on ~0.3% of posters, so its batch stays what it always was (``--batch-size``).
        """
        if not prepared:
            return np.zeros((0, len(self.columns)), np.float32), []
        with timed(timings, "objects"):
            step = object_batch or len(prepared)
            objects = []
            for s in range(0, len(prepared), step):
                chunk = prepared[s : s + step]
                if isinstance(chunk[0]["objects"], torch.Tensor):
                    object_input = torch.stack([p["objects"] for p in chunk])
                else:
                    object_input = [p["objects"] for p in chunk]
                objects += self.objects.detect(object_input)
        with timed(timings, "faces"):
            found = self.faces.detect(torch.stack([p["canvas"] for p in prepared]))
        with timed(timings, "expressions"):
            crops = [self.expressions.crop(p["canvas"].numpy(), boxes) for p, (boxes, _) in zip(prepared, found)]
            probs = self.expressions.classify(crops)
        rows, evidence = [], []
        for item, det, (boxes, face_probs), expr in zip(prepared, objects, found, probs):
            faces = faces_module.faces_as_detections(boxes, face_probs, item["geometry"], item["size"])
            rows.append(schema.assemble(schema.object_features(det), schema.face_features(faces, expr), item["image"]))
            evidence.append(Evidence(det, faces, expr))
        return np.stack(rows), evidence

