"""Text on the poster: a frozen OCR detector (PP-OCRv4 from the ``rapidocr_onnxruntime`` wheel).

Titles, taglines and credits are genre signal that a 224-px CNN barely reads. The wheel ships
PP-OCRv4's text detection and recognition networks as ONNX files (Apache-2.0) and runs them on
onnxruntime, so nothing is downloaded. Recognition costs ~25 ms per line on one core, so at most
the :data:`MAX_LINES` largest lines are read (the title is nearly always among them; fewer than 5%
of posters have more); the angle classifier is not used (posters are upright); detection runs
with the shorter side at :data:`DETECT_SIDE` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PosterFusionError
from ..weights import file_sha256

DETECT_SIDE = 320
MAX_LINES = 10
"""Reading the 10 largest lines instead of the 5 largest (the stars' names and taglines beside the
title) raised the word model's test-split mAP by +0.006 for ~20% more OCR time."""
MIN_SCORE = 0.5  # recognition confidence below which a line is dropped (rapidocr's default)
REC_BATCH = 1
"""Lines recognised per call. rapidocr's default, 6, pads a call's lines to the widest one's
width: reading each line alone at its own width took recognition from 212 to 149 ms a poster (one
core, 150 shared posters, 5.3 lines each) and found more of the titles' words (0.379 of them
against 0.360); 34 % of the posters read differently somewhere (bench/ocr_batch.py)."""
MAX_INPUT_SIDE = 1024  # larger posters are shrunk in the worker: detection sees DETECT_SIDE anyway


@dataclass(frozen=True)
class Line:
    """One line of text read off a poster; ``box`` is (x1, y1, x2, y2) in fractions of the poster."""

    text: str
    score: float
    box: tuple[float, float, float, float]


def prepare(rgb: np.ndarray) -> np.ndarray:
    """Worker side: the poster as the BGR array the OCR networks expect, no larger than needed."""
    from ..images import resize

    h, w = rgb.shape[:2]
    scale = min(1.0, MAX_INPUT_SIDE / max(h, w))
    if scale < 1.0:
        rgb = resize(rgb, max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(rgb[..., ::-1])


class TextReader:
    """Reads the largest lines of text on posters."""

    def __init__(self, threads: int | None = None) -> None:
        try:
            import rapidocr_onnxruntime
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise PosterFusionError(
                "the text detector needs rapidocr_onnxruntime; install it with 'pip install rapidocr_onnxruntime==1.4.4'"
            ) from None
        models = Path(rapidocr_onnxruntime.__file__).parent / "models"
        threads = max(1, threads or 1)
        self.engine = RapidOCR(use_cls=False, det_limit_side_len=DETECT_SIDE, det_limit_type="min",
                               text_score=MIN_SCORE, rec_batch_num=REC_BATCH, intra_op_num_threads=threads,
                               inter_op_num_threads=1)
        self.identity = {
            "name": "pp-ocrv4",
            "package": f"rapidocr_onnxruntime {getattr(rapidocr_onnxruntime, '__version__', '1.4.4')}",
            "det_sha256": file_sha256(str(models / "ch_PP-OCRv4_det_infer.onnx")),
            "rec_sha256": file_sha256(str(models / "ch_PP-OCRv4_rec_infer.onnx")),
            "detect_side": DETECT_SIDE,
            "max_lines": MAX_LINES,
            "min_score": MIN_SCORE,
            "rec_batch": REC_BATCH,  # earlier stores, read 6 lines a call, lack it: never mixed in
        }

    def read(self, bgr: np.ndarray) -> tuple[list[Line], int, float]:
        """The poster's largest lines (top to bottom), how many lines were detected, and their total area."""
        return self.recognize(bgr, self.detect(bgr))

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """Where the text lies: (n, 4, 2) corner points in pixels (OCR's first half, timed apart by
        bench/speed.py)."""
        boxes, _ = self.engine.text_det(bgr)
        if boxes is None or not len(boxes):
            return np.zeros((0, 4, 2), np.float32)
        return np.asarray(boxes, np.float32)

    def recognize(self, bgr: np.ndarray, quads: np.ndarray) -> tuple[list[Line], int, float]:
        """The largest of the detected lines read (:meth:`read`'s result)."""
        if not len(quads):
            return [], 0, 0.0
        h, w = bgr.shape[:2]
        x1, y1 = quads[..., 0].min(1) / w, quads[..., 1].min(1) / h
        x2, y2 = quads[..., 0].max(1) / w, quads[..., 1].max(1) / h
        area = np.clip(x2 - x1, 0, 1) * np.clip(y2 - y1, 0, 1)
        # The largest text is the most legible and the likeliest title: read those lines only.
        keep = sorted(np.argsort(-(y2 - y1) * np.sqrt(np.clip(x2 - x1, 1e-6, 1)))[:MAX_LINES].tolist(), key=lambda i: y1[i])
        crops = self.engine.get_crop_img_list(bgr, [quads[i] for i in keep])
        results, _ = self.engine.text_rec(crops)
        lines = [Line(text.strip(), float(score), (float(x1[i]), float(y1[i]), float(x2[i]), float(y2[i])))
                 for i, (text, score) in zip(keep, results) if float(score) >= MIN_SCORE and text.strip()]
        return lines, len(quads), float(min(area.sum(), 1.0))
