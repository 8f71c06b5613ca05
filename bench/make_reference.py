"""Write the reference features that tests/test_speedups.py compares the optimised code with.

Run it with the code *before* an optimisation on the import path, e.g. for the commit that
preceded the speed work (a27b2eb... / 1d005f3, PyTorch on the CPU, batch 32, no workers):

    mkdir -p /tmp/pf_ref && git archive 1d005f3 | tar -x -C /tmp/pf_ref
    PYTHONPATH=/tmp/pf_ref/src .venv/bin/python bench/make_reference.py \\
        --manifest ../shared/data/movieposters/labels.csv --out tests/data/speedups_reference.npz

The posters are chosen from the manifest (every ``len/N``-th row, plus rows with faces), and
stored by path relative to the manifest, with their cache keys and float32 features.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--posters", type=int, default=12)
    args = parser.parse_args()

    os.environ["POSTERFUSION_RUNTIME"] = "torch"  # ignored by code that predates the option
    torch.set_num_threads(2)
    from posterfusion.extract import build_cache, open_stores
    from posterfusion.frozen import FrozenModels
    from posterfusion.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    paths = manifest.paths
    step = len(paths) / (args.posters * 8)
    candidates = [paths[int(i * step)] for i in range(args.posters * 8)]
    models = FrozenModels("nanodet", "efficientnet_lite0", "cpu")
    stores = open_stores(models, None)
    summary = build_cache(candidates, stores, models, 32, 0)
    assert summary.failed == 0 and len(set(summary.keys)) == len(candidates), "pick posters that all decode, once each"
    keys, det = stores["detectors"].read(summary.keys)
    _, emb = stores["backbone"].read(summary.keys)
    face_count = det[:, list(stores["detectors"].columns).index("face_count")]
    # Half with faces (expressions, face geometry), half spread over the manifest.
    with_faces = [i for i in np.argsort(-face_count) if face_count[i] > 0][: args.posters // 2]
    rest = [i for i in range(len(keys)) if i not in with_faces][:: max(1, len(keys) // args.posters)]
    chosen = sorted((with_faces + rest)[: args.posters])
    root = args.manifest.resolve().parent
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        posters=np.array([str(Path(candidates[i]).resolve().relative_to(root)) for i in chosen]),
        keys=np.array([keys[i] for i in chosen]),
        detectors=det[chosen],
        embeddings=emb[chosen],
        identity=np.array([str(models.detectors.identity), str(models.backbone.identity)]),
    )
    print(f"{len(chosen)} posters ({int((face_count[chosen] > 0).sum())} with faces) -> {args.out}")


if __name__ == "__main__":
    main()
