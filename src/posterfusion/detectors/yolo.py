"""COCO objects through an ultralytics YOLO model read from a local ``.pt`` or ``.onnx`` file.

Ultralytics downloads its weights on first use, which cannot work offline; this backend therefore
takes only a path to a file the user already has, and says so when the file is missing. Its own
letterbox preprocessing runs inside ``predict``; workers hand it the decoded poster as BGR.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..weights import file_sha256
from ..errors import PosterFusionError
from .base import COCO_CLASSES, Detections

SCORE_THRESHOLD = 0.05  # low on purpose: features keep each class's best score, weak ones included
IOU_THRESHOLD = 0.5
IMAGE_SIZE = 640


def prepare(rgb: np.ndarray) -> np.ndarray:
    """Worker side: ultralytics expects BGR arrays and letterboxes them itself."""
    return np.ascontiguousarray(rgb[:, :, ::-1])


class YoloDetector:
    """Any ultralytics detection model whose classes are (a subset of) COCO's 80."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(weights)
        if not path.is_file():
            raise PosterFusionError(
                f"{path}: YOLO weights file not found; ultralytics cannot download weights offline. "
                "Copy a COCO .pt or .onnx file (e.g. yolo11n.pt) to this machine and pass "
                "--objects yolo:PATH, or use the offline default --objects nanodet"
            )
        os.environ.setdefault("YOLO_OFFLINE", "1")
        try:
            from ultralytics import YOLO
        except ImportError:
            raise PosterFusionError(f"{path}: --objects yolo:PATH needs ultralytics (AGPL-3.0), an optional extra: "
                                    "pip install 'posterfusion[yolo]'") from None

        try:
            self.model = YOLO(str(path), task="detect")
        except Exception as exc:  # ultralytics raises many types for a bad file
            raise PosterFusionError(f"{path}: not a loadable YOLO model: {exc}") from None
        names = self.model.names
        unknown = [n for n in names.values() if n not in COCO_CLASSES]
        if unknown:
            raise PosterFusionError(
                f"{path}: model classes are not COCO's (e.g. {unknown[0]!r}); the feature schema needs COCO"
            )
        self._to_coco = np.array([COCO_CLASSES.index(names[i]) for i in range(len(names))], np.int64)
        self.device = str(device)
        self.identity = {"name": "yolo", "file": path.name, "weights_sha256": file_sha256(str(path))}

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """BGR uint8 arrays of any sizes -> COCO detections with boxes as fractions."""
        if not images:
            return []
        results = self.model.predict(
            images, conf=SCORE_THRESHOLD, iou=IOU_THRESHOLD, imgsz=IMAGE_SIZE, device=self.device, verbose=False
        )
        out = []
        for result in results:
            boxes = result.boxes
            out.append(
                Detections(
                    boxes.xyxyn.cpu().numpy().astype(np.float32),
                    boxes.conf.cpu().numpy().astype(np.float32),
                    self._to_coco[boxes.cls.cpu().numpy().astype(np.int64)],
                )
            )
        return out
