"""Process-wide settings in one place: the environment variables posterfusion reads, and what it
sets for the whole process before the frozen models run. Their table, for users, is in
docs/architecture.md (Settings). Variables are read when asked for, so a test sets one with
``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: the CLI's start-up reads settings without loading torch
    import torch

ONEDNN_CACHE_CAPACITY = "64"


def weights_override() -> Path | None:
    """``POSTERFUSION_WEIGHTS``, where set."""
    value = os.environ.get("POSTERFUSION_WEIGHTS")
    return Path(value) if value else None


def onnx_cache() -> Path:
    """Where ONNX exports of the frozen models are kept."""
    value = os.environ.get("POSTERFUSION_ONNX_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "posterfusion" / "onnx"


def torch_runtime_forced() -> bool:
    """``POSTERFUSION_RUNTIME=torch``: the frozen models run in PyTorch on a CPU too."""
    return os.environ.get("POSTERFUSION_RUNTIME", "").lower() == "torch"


def model_batch_override() -> int | None:
    """``POSTERFUSION_MODEL_BATCH`` (0: whole batches), or None where unset."""
    value = os.environ.get("POSTERFUSION_MODEL_BATCH")
    return int(value) if value is not None else None


def apply(device: torch.device) -> None:
    """What the frozen models need of the process, applied before they run (by
    :class:`~posterfusion.frozen.FrozenModels`, so the CLI and Python callers alike):

    * oneDNN caches a compiled kernel per convolution shape, 1,024 by default. MTCNN's R-Net and
      O-Net and the expression model see a new batch size (their number of candidate faces) in
      nearly every call, so the cache grew by ~0.8 MB per poster over a build (1.0 -> 1.9 GB in
      1,000 posters); 64 entries keep every recurring shape (the P-Net pyramid) at the same speed,
      with flat memory. A value the user set is kept.
    * On a GPU, no TF32 in the frozen models: cached features must not depend on the hardware.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
