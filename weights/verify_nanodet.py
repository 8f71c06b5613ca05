#!/usr/bin/env python
"""Compare the PyTorch NanoDet port with the ORIGINAL TF.js graph, run by TF.js itself.

Why: a port that "finds the bus" can still be subtly wrong (padding, resize centres, channel
order). Here both runtimes get the very same preprocessed float32 tensors of real images
(ultralytics' bus.jpg and zidane.jpg, plus posters) and we report the max abs difference of
the raw outputs: class scores (after sigmoid) and box-bin logits. TF.js runs in node with its
pure-JS CPU backend (``verify_nanodet.mjs``; installed into .cache/tfjs by npm if missing).

usage: python weights/verify_nanodet.py [--model-dir DIR] [--weights FILE] [--posters N]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from posterfusion.detectors.base import COCO_CLASSES  # noqa: E402
from posterfusion.detectors.nanodet import decode, load_nanodet, preprocess  # noqa: E402

TFJS_VERSION = "4.22.0"
TFJS_DIR = REPO / ".cache" / "tfjs"
POSTERS = REPO.parent / "shared" / "data" / "movieposters" / "posters"
OUTPUTS = ("Identity", "Identity_1", "Identity_2", "Identity_3", "Identity_4", "Identity_5")
TOLERANCE = 1e-3  # float32 vs float32 with identical float16 weights: expect ~1e-5


def ultralytics_assets() -> Path:
    spec = importlib.util.find_spec("ultralytics")  # locate without importing (slow, chatty)
    if spec is None or spec.origin is None:
        sys.exit("ultralytics is not installed: its assets/bus.jpg is a reference image")
    return Path(spec.origin).parent / "assets"


def reference_images(n_posters: int, posters_dir: Path = POSTERS) -> list[Path]:
    """bus.jpg, zidane.jpg and ``n_posters`` posters spread evenly over the sorted folder."""
    assets = ultralytics_assets()
    images = [assets / "bus.jpg", assets / "zidane.jpg"]
    posters = sorted(posters_dir.glob("*.jpg")) if posters_dir.is_dir() else []
    if n_posters and not posters:
        print(f"warning: no posters in {posters_dir}; verifying on the two ultralytics images")
    if posters and n_posters:
        idx = np.linspace(0, len(posters) - 1, n_posters).round().astype(int)
        images += [posters[i] for i in idx]
    return images


def ensure_tfjs() -> Path:
    """TF.js (pure JS, no native binary) in .cache/tfjs, via npm's ordinary client."""
    if not (TFJS_DIR / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        TFJS_DIR.mkdir(parents=True, exist_ok=True)
        print(f"npm install @tensorflow/tfjs@{TFJS_VERSION} into {TFJS_DIR} ...", flush=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(TFJS_DIR), "--no-audit", "--no-fund",
             f"@tensorflow/tfjs@{TFJS_VERSION}"],
            check=True,
        )
    return TFJS_DIR


def run_tfjs(model_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original graph's (scores, bins) for a batch, concatenated stride 8, 16, 32."""
    tfjs = ensure_tfjs()
    with tempfile.TemporaryDirectory(prefix="nanodet-verify-") as tmp:
        inp, out = Path(tmp) / "input.f32", Path(tmp) / "out"
        x.astype("<f4").tofile(inp)
        subprocess.run(
            ["node", str(HERE / "verify_nanodet.mjs"), str(tfjs), str(model_dir), str(inp),
             str(len(x)), str(out)],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        outs = [
            [np.fromfile(out / f"{i}_{name}.f32", "<f4") for name in OUTPUTS] for i in range(len(x))
        ]
    scores = np.stack([np.concatenate([o.reshape(-1, 80) for o in img[:3]]) for img in outs])
    bins = np.stack([np.concatenate([o.reshape(-1, 44) for o in img[3:]]) for img in outs])
    return scores, bins


def _summary(det) -> str:
    return ", ".join(f"{COCO_CLASSES[l]} {s:.2f}" for l, s in zip(det.labels, det.scores)) or "-"


def verify(model_dir: Path, weights: Path, n_posters: int = 10) -> float:
    """Print per-image and overall max abs differences; return the overall figure."""
    images = reference_images(n_posters)
    x = torch.stack([preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in images])
    model = load_nanodet(weights)
    with torch.inference_mode():
        scores, bins = (t.numpy() for t in model(x))
    print(f"running the original graph with TF.js (CPU backend) on {len(images)} images ...",
          flush=True)
    ref_scores, ref_bins = run_tfjs(model_dir, x.numpy())
    assert ref_scores.shape == scores.shape and ref_bins.shape == bins.shape

    dets = decode(torch.from_numpy(scores), torch.from_numpy(bins), score_threshold=0.3)
    ref_dets = decode(torch.from_numpy(ref_scores), torch.from_numpy(ref_bins), score_threshold=0.3)
    print(f"{'image':<16} {'max|dscore|':>11} {'max|dbin|':>10}  same dets  detections (>0.3)")
    for i, p in enumerate(images):
        ds = np.abs(scores[i] - ref_scores[i]).max()
        db = np.abs(bins[i] - ref_bins[i]).max()
        a, b = dets[i], ref_dets[i]
        same = (
            len(a) == len(b)
            and (a.labels == b.labels).all()
            and (len(a) == 0 or np.abs(a.boxes - b.boxes).max() < 1e-3)
        )
        print(f"{p.name:<16} {ds:11.2e} {db:10.2e}  {'yes' if same else 'NO ':>9}  {_summary(a)}")
    d_scores = float(np.abs(scores - ref_scores).max())
    d_bins = float(np.abs(bins - ref_bins).max())
    rel = d_bins / float(np.abs(ref_bins).max())
    print(
        f"VERIFICATION PyTorch port vs original TF.js graph, {len(images)} real images: "
        f"max abs diff class scores {d_scores:.2e}, box-bin logits {d_bins:.2e} "
        f"(|bins| up to {np.abs(ref_bins).max():.1f}, relative {rel:.1e})"
    )
    worst = max(d_scores, d_bins)
    if worst > TOLERANCE:
        sys.exit(f"FAILED: difference {worst:.2e} above tolerance {TOLERANCE:g}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path,
                    default=REPO / ".cache" / "npm" / "human-models-3.0.4" / "package" / "models",
                    help="folder with the original nanodet.json + nanodet.bin")
    ap.add_argument("--weights", type=Path, default=HERE / "nanodet_coco.safetensors")
    ap.add_argument("--posters", type=int, default=10)
    args = ap.parse_args()
    if not (args.model_dir / "nanodet.json").is_file():
        sys.exit(f"{args.model_dir}: no nanodet.json; run weights/convert_nanodet.py first")
    verify(args.model_dir, args.weights, args.posters)


if __name__ == "__main__":
    main()
