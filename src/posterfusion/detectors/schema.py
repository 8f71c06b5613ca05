"""The detector feature schema: one fixed-length, named vector per poster.

Following Chu & Guo (2017), what the frozen detectors saw is summarised per poster: for every COCO
class the number, best confidence and area of its detections; how much of the poster people
cover and where; how many faces, how large and where; the expressions on them; and a few global
colour statistics (dark, desaturated posters say "horror" before any object does).

Values are stored raw (counts are counts); the model decides how to transform them. Bump
``SCHEMA_VERSION`` whenever a column is added, removed or computed differently: caches and models
carry it, and a mismatch is refused instead of silently mixing features.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from .base import COCO_CLASSES, EXPRESSIONS, Detections

SCHEMA_VERSION = 2

COUNT_THRESHOLD = 0.35
"""Detections at or above this score are counted and their areas summed; max confidence uses all."""

FACE_THRESHOLD = 0.9
"""MTCNN probability kept as a face; 0.77-0.78 false positives were seen on posters."""

HUE_BINS = 12
_GRID_W, _GRID_H = 24, 36  # person-coverage raster: union of boxes without polygon maths
LAYOUT = 3
"""Where people and faces are, on a LAYOUT x LAYOUT grid over the poster: a 224-px CNN sees a
crowd, a lone face at the top or a small figure at the bottom less surely than the detectors do."""
GROUPS = ((1, 1), (2, 2), (3, 5), (6, 10_000))
"""How many people / faces, as groups (one, a couple, a few, a crowd): a poster's cast size."""


def _slug(name: str) -> str:
    return name.replace(" ", "_")


OBJECT_COLUMNS = [
    f"obj_{_slug(c)}_{stat}" for c in COCO_CLASSES for stat in ("count", "maxconf", "area")
]
_CELLS = [f"{r}{c}" for r in range(LAYOUT) for c in range(LAYOUT)]
_GROUP_NAMES = [f"{lo}" if lo == hi else f"{lo}plus" if hi > 1000 else f"{lo}to{hi}" for lo, hi in GROUPS]
PERSON_COLUMNS = (["person_coverage", "person_largest_area", "person_center_x", "person_center_y",
                   "objects_total", "object_classes"]
                  + [f"person_cell_{cell}" for cell in _CELLS] + [f"persons_{g}" for g in _GROUP_NAMES])
FACE_COLUMNS = (["face_count", "face_max_prob", "face_largest_area", "face_total_area",
                 "face_center_x", "face_center_y"]
                + [f"face_cell_{cell}" for cell in _CELLS] + [f"faces_{g}" for g in _GROUP_NAMES])
EXPRESSION_COLUMNS = [
    f"expr_{e}_{stat}" for stat in ("mean", "max", "largest") for e in EXPRESSIONS
]
IMAGE_COLUMNS = (
    ["img_brightness", "img_contrast", "img_saturation", "img_colorfulness", "img_dark_fraction",
     "img_bright_fraction", "img_red", "img_green", "img_blue", "img_aspect"]
    + [f"img_hue_{k:02d}" for k in range(HUE_BINS)]
)
COLUMNS: list[str] = OBJECT_COLUMNS + PERSON_COLUMNS + FACE_COLUMNS + EXPRESSION_COLUMNS + IMAGE_COLUMNS
V1_COLUMNS = [c for c in COLUMNS if not c.startswith(("person_cell_", "persons_", "face_cell_", "faces_"))]
"""Schema v1's columns: v2 added the layout and group columns (for comparisons with v1 features)."""
COUNT_COLUMNS = [c for c in COLUMNS if c.endswith("_count") or c in ("objects_total", "object_classes")]
"""Heavy-tailed columns that a model should log-transform."""

WORD_BUCKETS = 512
"""Words read off a poster are counted into this many hashed buckets (the hashing trick): a fixed
vocabulary-free vector; which words matter is learned by the model on its training split."""
TEXT_COLUMNS = (
    ["text_lines", "text_area", "text_read_lines", "text_chars", "text_words", "text_upper", "text_digits",
     "text_score", "text_title_height", "text_title_width", "text_title_x", "text_title_y"]
    + [f"text_word_{k:03d}" for k in range(WORD_BUCKETS)]
)
"""The text detector's features (a store of their own, see detectors/text.py): how much text and
where the largest line is, then hashed word counts."""
TEXT_COUNT_COLUMNS = ["text_lines", "text_read_lines", "text_chars", "text_words"] + TEXT_COLUMNS[12:]

_N_CLASSES = len(COCO_CLASSES)
_PERSON = COCO_CLASSES.index("person")
_N_EXPR = len(EXPRESSIONS)


def object_features(det: Detections) -> np.ndarray:
    """Per-class count/maxconf/area, then the person and scene summary columns."""
    per_class = np.zeros((_N_CLASSES, 3), np.float32)
    if len(det):
        labels, scores = det.labels, det.scores
        areas = _areas(det.boxes)
        np.maximum.at(per_class[:, 1], labels, scores)
        strong = scores >= COUNT_THRESHOLD
        np.add.at(per_class[:, 0], labels[strong], 1.0)
        np.add.at(per_class[:, 2], labels[strong], areas[strong])
        np.minimum(per_class[:, 2], 1.0, out=per_class[:, 2])
    persons = det.boxes[(det.labels == _PERSON) & (det.scores >= COUNT_THRESHOLD)] if len(det) else det.boxes[:0]
    summary = np.array(
        [
            _coverage(persons),
            float(_areas(persons).max()) if len(persons) else 0.0,
            *_centroid(persons),
            float(per_class[:, 0].sum()),
            float((per_class[:, 0] > 0).sum()),
        ],
        np.float32,
    )
    return np.concatenate([per_class.reshape(-1), summary, _layout(persons), _groups(len(persons))])


def face_features(faces: Detections, expressions: np.ndarray) -> np.ndarray:
    """Face count, size and position, and mean/max/largest-face expression probabilities.

    ``faces`` holds only faces kept by :data:`FACE_THRESHOLD`; ``expressions`` is (n_faces, 7).
    """
    if not len(faces):
        return np.zeros(len(FACE_COLUMNS) + len(EXPRESSION_COLUMNS), np.float32)
    areas = _areas(faces.boxes)
    largest = int(areas.argmax())
    box = faces.boxes[largest]
    geometry = [
        float(len(faces)),
        float(faces.scores.max()),
        float(areas[largest]),
        float(min(areas.sum(), 1.0)),
        float((box[0] + box[2]) / 2),
        float((box[1] + box[3]) / 2),
    ]
    expr = np.concatenate([expressions.mean(0), expressions.max(0), expressions[largest]])
    return np.concatenate([np.asarray(geometry, np.float32), _layout(faces.boxes), _groups(len(faces)),
                           expr.astype(np.float32)])


def image_features(rgb: np.ndarray) -> np.ndarray:
    """Global colour statistics of a poster (expects a small thumbnail, e.g. 64x96)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32) / 255.0
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    high, low = pixels.max(1), pixels.min(1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    rg, yb = r - g, 0.5 * (r + g) - b
    colorfulness = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    hue = _hue(r, g, b, high, low)
    hist = np.bincount(
        np.minimum((hue * HUE_BINS).astype(np.int64), HUE_BINS - 1), weights=saturation, minlength=HUE_BINS
    )
    hist = hist / max(float(saturation.sum()), 1e-6)
    stats = [luma.mean(), luma.std(), saturation.mean(), colorfulness, (luma < 0.2).mean(),
             (luma > 0.8).mean(), r.mean(), g.mean(), b.mean(), rgb.shape[0] / rgb.shape[1]]
    return np.concatenate([np.asarray(stats, np.float32), hist.astype(np.float32)])


def words(text: str) -> list[str]:
    """Lower-cased words of two or more letters, in any script (a non-Latin title still counts)."""
    return re.findall(r"[^\W\d_]{2,}", text.lower())


def text_features(lines: list, detected: int, area: float) -> np.ndarray:
    """Text amount, the largest line's size and place, and hashed word counts for one poster.

    ``lines`` are :class:`~posterfusion.detectors.text.Line` (text, score, box in fractions);
    ``detected`` and ``area`` count every detected line, read or not.
    """
    joined = " ".join(line.text for line in lines)
    letters = [c for c in joined if c.isalpha()]
    tokens = words(joined)
    head = np.zeros(12, np.float32)
    head[:3] = detected, area, len(lines)
    if lines:
        title = max(lines, key=lambda line: line.box[3] - line.box[1])
        x1, y1, x2, y2 = title.box
        head[3:] = [len(joined.replace(" ", "")), len(tokens),
                    sum(c.isupper() for c in letters) / max(len(letters), 1),
                    sum(c.isdigit() for c in joined) / max(len(joined), 1),
                    float(np.mean([line.score for line in lines])), y2 - y1, x2 - x1, (x1 + x2) / 2, (y1 + y2) / 2]
    counts = np.zeros(WORD_BUCKETS, np.float32)
    for token in tokens:
        counts[zlib.crc32(token.encode()) % WORD_BUCKETS] += 1.0
    return np.concatenate([head, counts])


def assemble(objects: np.ndarray, faces: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Concatenate the three parts in schema order, checking the length once."""
    vector = np.concatenate([objects, faces, image]).astype(np.float32)
    assert vector.shape == (len(COLUMNS),), vector.shape
    return vector


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, 1) * np.clip(boxes[:, 3] - boxes[:, 1], 0, 1)


def _coverage(boxes: np.ndarray) -> float:
    return float(_layout(boxes).mean())


def _layout(boxes: np.ndarray) -> np.ndarray:
    """Fraction of each cell of the LAYOUT x LAYOUT grid that the boxes cover (their union)."""
    grid = np.zeros((_GRID_H, _GRID_W), bool)
    for x1, y1, x2, y2 in boxes:
        grid[int(y1 * _GRID_H) : int(np.ceil(y2 * _GRID_H)), int(x1 * _GRID_W) : int(np.ceil(x2 * _GRID_W))] = True
    cells = grid.reshape(LAYOUT, _GRID_H // LAYOUT, LAYOUT, _GRID_W // LAYOUT)
    return cells.mean(axis=(1, 3)).reshape(-1).astype(np.float32)


def _groups(n: int) -> np.ndarray:
    """One-hot group of a count (all zeros for none)."""
    return np.array([lo <= n <= hi for lo, hi in GROUPS], np.float32)


def _centroid(boxes: np.ndarray) -> tuple[float, float]:
    """Area-weighted centre of the boxes; the poster's centre when there are none."""
    if not len(boxes):
        return 0.5, 0.5
    weights = _areas(boxes) + 1e-6
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return float(np.average(cx, weights=weights)), float(np.average(cy, weights=weights))


def _hue(r: np.ndarray, g: np.ndarray, b: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Vectorised HSV hue in [0, 1), matching :func:`colorsys.rgb_to_hsv`."""
    delta = np.maximum(high - low, 1e-6)
    hue = np.where(high == r, (g - b) / delta, np.where(high == g, 2.0 + (b - r) / delta, 4.0 + (r - g) / delta))
    hue = (hue / 6.0) % 1.0
    return np.where(high - low > 0, hue, 0.0)

