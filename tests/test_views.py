"""Poster-shaped backbone views and the schema's layout columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import write_poster
from posterfusion.backbone import create_backbone, parse_view, split_at_last_block
from posterfusion.detectors import schema
from posterfusion.detectors.base import Detections
from posterfusion.errors import PosterFusionError
from posterfusion.images import decode_bytes


@pytest.mark.parametrize("text, expected", [
    ("224x320+flip", (224, 320, True)),
    ("224x320", (224, 320, False)),
    (" 260 x 390 + flip ", (260, 390, True)),
])
def test_parse_view(text: str, expected: tuple) -> None:
    assert parse_view(text) == expected


@pytest.mark.parametrize("text", ["224", "224x", "flip", "8x8", "224x320+mirror", "5000x5000"])
def test_bad_view_is_a_clear_error(text: str) -> None:
    with pytest.raises(PosterFusionError, match="WIDTHxHEIGHT"):
        parse_view(text)


def test_view_is_part_of_the_identity_and_the_square_keeps_v1s() -> None:
    square = create_backbone(lazy=True, view="224x224")
    poster = create_backbone(lazy=True, view="224x320")
    flipped = create_backbone(lazy=True, view="224x320+flip")
    assert square.identity == create_backbone(lazy=True).identity  # caches of the square view stay valid
    assert "flip" not in square.identity
    assert len({str(b.identity) for b in (square, poster, flipped)}) == 3
    assert poster.identity["input_size"] == [224, 320] and flipped.identity["flip"] is True


def test_prepare_keeps_the_views_shape(tmp_path) -> None:
    rgb = decode_bytes(write_poster(tmp_path / "p.jpg", size=(182, 268)).read_bytes())
    assert tuple(create_backbone(lazy=True, view="224x320").prepare(rgb).shape) == (3, 320, 224)
    assert tuple(create_backbone(lazy=True, view="224x224").prepare(rgb).shape) == (3, 224, 224)


def test_flip_view_averages_the_mirror_image() -> None:
    """With +flip a poster and its mirror image have the same embedding, the mean of both views'."""
    backbone = create_backbone(view="224x320+flip")
    plain = create_backbone(view="224x320")
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (2, 3, 320, 224), dtype=np.uint8))
    with torch.inference_mode():
        both = backbone.embed(batch)
        mirrored = backbone.embed(batch.flip(-1))
        expected = (plain.embed(batch) + plain.embed(batch.flip(-1))) / 2
    torch.testing.assert_close(both, mirrored, rtol=0, atol=1e-5)
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(plain.embed(batch), plain.embed(batch.flip(-1)), atol=1e-3)


def test_trunk_and_tail_compose_to_the_network() -> None:
    model = create_backbone(view="224x320").model
    trunk, tail = split_at_last_block(model)
    x = torch.randn(2, 3, 320, 224)
    with torch.inference_mode():
        torch.testing.assert_close(tail(trunk(x)), model(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in tail.parameters()) < sum(p.numel() for p in model.parameters()) / 2


def _row(features: np.ndarray, columns: list[str], prefix: str) -> dict[str, float]:
    return {c: float(v) for c, v in zip(columns, features) if c.startswith(prefix)}


def test_layout_columns_place_people_and_faces() -> None:
    # one person on the left third, top to bottom; one small face in the top right cell
    persons = Detections(np.array([[0.0, 0.0, 1 / 3, 1.0]], np.float32), np.array([0.9], np.float32), np.array([0]))
    objects = schema.object_features(persons)
    cells = _row(objects, schema.OBJECT_COLUMNS + schema.PERSON_COLUMNS, "person_cell_")
    assert cells["person_cell_00"] == cells["person_cell_10"] == cells["person_cell_20"] == 1.0
    assert sum(cells.values()) == 3.0
    groups = _row(objects, schema.OBJECT_COLUMNS + schema.PERSON_COLUMNS, "persons_")
    assert groups == {"persons_1": 1.0, "persons_2": 0.0, "persons_3to5": 0.0, "persons_6plus": 0.0}

    face = Detections(np.array([[0.8, 0.05, 0.95, 0.2]], np.float32), np.array([0.99], np.float32), np.array([0]))
    faces = schema.face_features(face, np.full((1, 7), 1 / 7))
    face_cells = _row(faces, schema.FACE_COLUMNS, "face_cell_")
    assert face_cells["face_cell_02"] > 0 and sum(v > 0 for v in face_cells.values()) == 1
    assert _row(faces, schema.FACE_COLUMNS, "faces_")["faces_1"] == 1.0


def test_crowds_fall_in_the_crowd_group() -> None:
    boxes = np.tile(np.array([[0.1, 0.1, 0.2, 0.2]], np.float32), (7, 1))
    crowd = Detections(boxes, np.full(7, 0.9, np.float32), np.zeros(7, np.int64))
    groups = _row(schema.object_features(crowd), schema.OBJECT_COLUMNS + schema.PERSON_COLUMNS, "persons_")
    assert groups["persons_6plus"] == 1.0 and sum(groups.values()) == 1.0
    empty = schema.object_features(Detections.empty())
    assert sum(_row(empty, schema.OBJECT_COLUMNS + schema.PERSON_COLUMNS, "person").values()) == 1.0  # centre x/y only
