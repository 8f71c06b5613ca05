"""Faces: facenet-pytorch's MTCNN, whose weights ship inside its wheel (no download).

MTCNN only batches images of one size, so every poster is letterboxed onto the same canvas
(2:3, the shape of a poster) before detection; boxes are mapped back to fractions of the poster.
The canvas is also where expression crops are cut, so faces are decoded once.
"""

from __future__ import annotations

import hashlib
from importlib import metadata

import numpy as np
import torch

from ..images import letterbox
from .base import Detections
from .schema import FACE_THRESHOLD

CANVAS_W, CANVAS_H = 240, 360
MIN_FACE_SIZE = 20


def prepare(rgb: np.ndarray) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Worker side: the poster on the face canvas (uint8 HxWx3) and how it was placed there."""
    canvas, geometry = letterbox(rgb, CANVAS_W, CANVAS_H)
    return torch.from_numpy(canvas), geometry


def to_poster_fractions(boxes_px: np.ndarray, geometry: tuple[float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Map canvas pixel boxes to fractions of the original poster (``size`` = (width, height))."""
    scale, pad_x, pad_y = geometry
    width, height = size
    out = np.empty_like(boxes_px, dtype=np.float32)
    out[:, [0, 2]] = (boxes_px[:, [0, 2]] - pad_x) / scale / width
    out[:, [1, 3]] = (boxes_px[:, [1, 3]] - pad_y) / scale / height
    return np.clip(out, 0.0, 1.0)


class FaceDetector:
    """Batched MTCNN over face canvases; keeps faces with probability >= FACE_THRESHOLD."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from .mtcnn import Mtcnn

        # facenet-pytorch's MTCNN(keep_all=True) networks and weights, run by detectors/mtcnn.py
        # without importing the package (see there); the same boxes and probabilities.
        self.mtcnn = Mtcnn(min_face_size=MIN_FACE_SIZE, device=torch.device(device))
        self.runtime = "torch"
        self.identity = {
            "name": "mtcnn",
            "package": f"facenet-pytorch {metadata.version('facenet-pytorch')}",
            "weights_sha256": _weights_digest(),
            "canvas": [CANVAS_W, CANVAS_H],
            "min_face_size": MIN_FACE_SIZE,
            "threshold": FACE_THRESHOLD,
        }

    def detect(self, canvases: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """uint8 (B, H, W, 3) canvases -> per image (pixel boxes on the canvas, probabilities)."""
        if not len(canvases):
            return []
        from .mtcnn import detect

        # facenet-pytorch's cascade with its per-box crop loops batched: the same boxes and
        # probabilities as self.mtcnn.detect, bit for bit (tests/test_speedups.py).
        results = []
        for image_boxes, image_probs in detect(self.mtcnn, canvases.to(self.mtcnn.device)):
            keep = image_probs >= FACE_THRESHOLD
            results.append((image_boxes[keep], image_probs[keep]))
        return results


def faces_as_detections(boxes_px: np.ndarray, probs: np.ndarray, geometry: tuple[float, float, float], size: tuple[int, int]) -> Detections:
    """Faces in the same form as objects, so features and evidence treat both alike."""
    return Detections(to_poster_fractions(boxes_px, geometry, size), probs, np.zeros(len(probs), np.int64))


def _weights_digest() -> str:
    from .mtcnn import weights_folder

    data = weights_folder()
    digest = hashlib.sha256()
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        digest.update((data / name).read_bytes())
    return digest.hexdigest()
