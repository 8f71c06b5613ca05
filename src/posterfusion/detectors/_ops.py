"""torchvision's NMS kernels without importing torchvision.

``import torchvision`` costs ~1.2-3 s on a 2-core CPU, most of it ``torch._dynamo`` pulled in by
``torchvision.ops``: a third of a cold ``fusion predict``. The detectors need only its compiled
``nms`` kernel, so this module loads torchvision's extension library directly
(``torch.ops.load_library``, as ``torchvision.extension`` does) and reproduces ``nms`` and
``batched_nms`` of torchvision 0.29 line for line. Where the library cannot be found this way,
it imports torchvision after all.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_LOADED = False


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
        for name in ("_C_stable", "_C"):
            if folder is None:
                break
            found = sorted(glob.glob(os.path.join(folder, f"{name}.*so")) + glob.glob(os.path.join(folder, f"{name}.*pyd")))
            if found:
                try:
                    torch.ops.load_library(found[0])
                except (OSError, RuntimeError):
                    continue
                if _has_nms():
                    _LOADED = True
                    return
    import torchvision  # noqa: F401  (registers the kernels the usual way)

    _LOADED = True


def _has_nms() -> bool:
    try:
        return hasattr(torch.ops.torchvision, "nms")
    except (AttributeError, RuntimeError):
        return False


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms``: indices kept, in decreasing order of score."""
    _ensure_loaded()
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.batched_nms`` (0.29): NMS within each category of ``idxs``."""
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):
        return _batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def _batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    return nms(boxes_for_nms, scores, iou_threshold)


def _batched_nms_vanilla(boxes, scores, idxs, iou_threshold):
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        curr_indices = torch.where(idxs == class_id)[0]
        curr_keep_indices = nms(boxes[curr_indices], scores[curr_indices], iou_threshold)
        keep_mask[curr_indices[curr_keep_indices]] = True
    keep_indices = torch.where(keep_mask)[0]
    return keep_indices[scores[keep_indices].sort(descending=True)[1]]
