"""Feature schema: named, fixed-length, and computed the way its docstrings say."""

from __future__ import annotations

import colorsys

import numpy as np

from posterfusion.detectors import schema
from posterfusion.detectors.base import COCO_CLASSES, EXPRESSIONS, Detections

COL = {c: i for i, c in enumerate(schema.COLUMNS)}
PERSON, CAR = COCO_CLASSES.index("person"), COCO_CLASSES.index("car")


def _vector(objects: Detections, faces: Detections = Detections.empty(), expressions: np.ndarray | None = None) -> np.ndarray:
    expressions = np.zeros((len(faces), 7), np.float32) if expressions is None else expressions
    image = schema.image_features(np.zeros((96, 64, 3), np.uint8))
    return schema.assemble(schema.object_features(objects), schema.face_features(faces, expressions), image)


def test_columns_are_unique_and_fixed() -> None:
    assert len(schema.COLUMNS) == len(set(schema.COLUMNS))
    assert _vector(Detections.empty()).shape == (len(schema.COLUMNS),)


def test_object_counts_confidences_and_person_layout() -> None:
    objects = Detections(
        boxes=np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.1, 0.1, 0.2, 0.2], [0, 0, 0.1, 0.1]], np.float32),
        scores=np.array([0.9, 0.6, 0.2, 0.4], np.float32),
        labels=np.array([PERSON, PERSON, PERSON, CAR]),
    )
    v = _vector(objects)
    assert v[COL["obj_person_count"]] == 2  # the 0.2 detection is below COUNT_THRESHOLD
    assert v[COL["obj_person_maxconf"]] == np.float32(0.9)
    assert v[COL["obj_car_count"]] == 1 and abs(v[COL["obj_car_area"]] - 0.01) < 1e-6
    assert v[COL["person_coverage"]] == 1.0 and v[COL["person_largest_area"]] == 0.5
    assert v[COL["objects_total"]] == 3 and v[COL["object_classes"]] == 2


def test_faces_and_expressions() -> None:
    faces = Detections(np.array([[0.4, 0.1, 0.6, 0.3], [0, 0, 0.1, 0.1]], np.float32), np.array([0.99, 0.95], np.float32), np.zeros(2, np.int64))
    expr = np.zeros((2, 7), np.float32)
    expr[0, EXPRESSIONS.index("happy")] = 1.0
    expr[1, EXPRESSIONS.index("fear")] = 1.0
    v = _vector(Detections.empty(), faces, expr)
    assert v[COL["face_count"]] == 2 and v[COL["face_center_x"]] == np.float32(0.5)
    assert v[COL["expr_happy_mean"]] == 0.5 and v[COL["expr_fear_max"]] == 1.0
    assert v[COL["expr_happy_largest"]] == 1.0 and v[COL["expr_fear_largest"]] == 0.0


def test_colour_statistics() -> None:
    red = np.zeros((96, 64, 3), np.uint8)
    red[..., 0] = 255
    stats = dict(zip(schema.IMAGE_COLUMNS, schema.image_features(red)))
    assert stats["img_saturation"] == 1.0 and stats["img_hue_00"] == 1.0 and stats["img_red"] == 1.0
    dark = dict(zip(schema.IMAGE_COLUMNS, schema.image_features(np.zeros((96, 64, 3), np.uint8))))
    assert dark["img_dark_fraction"] == 1.0 and dark["img_brightness"] == 0.0


def test_hue_matches_colorsys() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((50, 3))
    high, low = rgb.max(1), rgb.min(1)
    ours = schema._hue(rgb[:, 0], rgb[:, 1], rgb[:, 2], high, low)
    assert np.allclose(ours, [colorsys.rgb_to_hsv(*p)[0] for p in rgb], atol=1e-6)
