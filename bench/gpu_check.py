"""Are features computed on a GPU comparable with CPU ones? (run on the GPU machine)

    python bench/gpu_check.py --reference .gpu/cpu_reference.npz --root .gpu/chunk0 [--json OUT]

The reference holds features of some posters computed on a CPU (bench/make_reference.py). This
recomputes them with FrozenModels on the GPU, as ``detect-cache build`` does, and reports the
largest differences; then again with PyTorch's fp32 precision for convolutions and matmuls forced
to IEEE through the newer ``fp32_precision`` settings (and deterministic cuDNN algorithms), in case
the legacy ``allow_tf32 = False`` flags that FrozenModels sets do not reach every kernel: on an H100
with torch 2.11 they read back as ``cudnn.conv.fp32_precision == 'none'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def features(paths: list[str], ieee: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    from posterfusion.extract import build_cache, open_stores
    from posterfusion.frozen import FrozenModels

    models = FrozenModels("nanodet", "efficientnet_lite0", "cuda")
    if ieee:  # after FrozenModels: its legacy allow_tf32 flags reset these (seen as 'none')
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    stores = open_stores(models, None)
    summary = build_cache(paths, stores, models, 32, 0)  # the reference's batch (MTCNN depends on it)
    keys, det = stores["detectors"].read(summary.keys)
    _, emb = stores["backbone"].read(summary.keys)
    return keys, det, emb


def compare(ref: dict, keys: list[str], det: np.ndarray, emb: np.ndarray) -> dict:
    from posterfusion.detectors import schema

    assert keys == list(ref["keys"])
    dd, de = np.abs(det - ref["detectors"]), np.abs(emb - ref["embeddings"])
    worst = np.unravel_index(dd.argmax(), dd.shape)
    return {
        "detectors_max_abs": float(dd.max()),
        "detectors_posters_over_1e-4": int((dd.max(1) > 1e-4).sum()),
        "detectors_worst_column": schema.COLUMNS[worst[1]],
        "embeddings_max_abs": float(de.max()),
        "embeddings_median_poster_max_abs": float(np.median(de.max(1))),
        "posters": len(keys),
    }


def precision_settings() -> dict:
    out = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32, "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for name, obj in (("cudnn.conv", getattr(torch.backends.cudnn, "conv", None)), ("cuda.matmul", torch.backends.cuda.matmul)):
        if obj is not None and hasattr(obj, "fp32_precision"):
            out[f"{name}.fp32_precision"] = obj.fp32_precision
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="folder the reference's poster paths are relative to")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data = np.load(args.reference)
    ref = {k: data[k] for k in ("keys", "detectors", "embeddings")}
    paths = [str(args.root / p) for p in data["posters"]]

    report = {"device": torch.cuda.get_device_name(0)}
    keys, det, emb = features(paths)
    report["settings_pipeline"] = precision_settings()
    report["pipeline_vs_cpu"] = compare(ref, keys, det, emb)
    print("pipeline:", report["settings_pipeline"], report["pipeline_vs_cpu"], flush=True)
    try:
        keys, det, emb = features(paths, ieee=True)
        report["settings_ieee"] = precision_settings()
        report["ieee_vs_cpu"] = compare(ref, keys, det, emb)
        print("ieee:", report["settings_ieee"], report["ieee_vs_cpu"], flush=True)
    except (AttributeError, RuntimeError) as exc:
        report["ieee_error"] = str(exc)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
