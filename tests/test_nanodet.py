"""NanoDet port: the shipped weights still find the bus, and the pre/post-processing contracts hold.

The numeric check against the original TF.js graph is ``weights/verify_nanodet.py`` (needs node
and ~1.5 min); this file only guards what the rest of the code relies on, fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from posterfusion.detectors.base import COCO_CLASSES, Detections
from posterfusion.detectors.nanodet import (
    INPUT_SIZE,
    NanoDet,
    decode,
    load_nanodet,
    preprocess,
)
from posterfusion.errors import PosterFusionError

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "nanodet_coco.safetensors"
NUM_ANCHORS = 52 * 52 + 26 * 26 + 13 * 13  # strides 8, 16, 32 at 416 px

# The bus in ultralytics' bus.jpg (810x1080), read off the image by eye, as fractions.
BUS_BOX = np.array([0.02, 0.21, 0.98, 0.69])


def _bus_jpg() -> Path:
    spec = importlib.util.find_spec("ultralytics")  # find the assets without importing ultralytics
    if spec is None or spec.origin is None:
        pytest.skip("ultralytics (which ships assets/bus.jpg) is not installed")
    return Path(spec.origin).parent / "assets" / "bus.jpg"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


@pytest.fixture(scope="module")
def model() -> NanoDet:
    torch.set_num_threads(2)
    return load_nanodet(WEIGHTS)


def test_weights_match_their_sha256() -> None:
    expected = (WEIGHTS.parent / "nanodet_coco.sha256").read_text().split()
    assert expected[1] == WEIGHTS.name
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == expected[0]


def test_bus_jpg(model: NanoDet) -> None:
    rgb = np.asarray(Image.open(_bus_jpg()).convert("RGB"))
    with torch.inference_mode():
        scores, dists = model(preprocess(rgb)[None])
    assert scores.shape == (1, NUM_ANCHORS, 80) and dists.shape == (1, NUM_ANCHORS, 44)
    (det,) = decode(scores, dists)
    assert det.boxes.dtype == np.float32 and det.scores.dtype == np.float32
    assert det.labels.dtype == np.int64
    assert (det.boxes >= 0).all() and (det.boxes <= 1).all()

    bus = COCO_CLASSES.index("bus")
    person = COCO_CLASSES.index("person")
    buses = (det.labels == bus) & (det.scores > 0.5)
    assert buses.sum() == 1, list(zip(det.labels, det.scores))
    assert _iou(det.boxes[buses][0], BUS_BOX) > 0.85, det.boxes[buses][0]
    assert ((det.labels == person) & (det.scores > 0.4)).sum() >= 3


def test_preprocess_shape_dtype_and_bgr() -> None:
    red = np.zeros((123, 77, 3), np.uint8)
    red[..., 0] = 255
    x = preprocess(red)
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE) and x.dtype == torch.float32
    # channel order is B, G, R: red ends up in the last channel
    assert torch.allclose(x[2], torch.tensor((255 - 123.675) / 58.395))
    assert torch.allclose(x[0], torch.tensor((0 - 103.53) / 57.375))


def test_decode_all_zero_scores_gives_empty_detections() -> None:
    dets = decode(torch.zeros(2, NUM_ANCHORS, 80), torch.zeros(2, NUM_ANCHORS, 44))
    assert len(dets) == 2
    for d in dets:
        assert isinstance(d, Detections) and len(d) == 0
        assert d.boxes.shape == (0, 4) and d.labels.dtype == np.int64


def test_load_nanodet_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PosterFusionError, match="nope.safetensors"):
        load_nanodet(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(PosterFusionError, match="garbage.safetensors"):
        load_nanodet(garbage)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(PosterFusionError, match="other.safetensors"):
        load_nanodet(other)
