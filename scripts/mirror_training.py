"""Can the head learn from mirror images so that prediction need not embed them?

The shipped view embeds each poster and its mirror image and averages the two (``260x372+flip``):
half of the backbones' work, 14 % of a poster's, and worth 0.007 test mAP (docs/results.md).
This script asks whether training on the mirror images as extra samples, and predicting from the
poster alone, keeps that accuracy. It needs no new build: a cache holding both views of the same
posters (``detect-cache build --view 260x372+flip`` and ``--view 260x372``) gives each poster's
embedding ``p`` and the average ``a``, so its mirror image's is ``2a - p``. Rows (the fusion heads
of the shipped recipe, words off, on each collection's held-out test split):

* one image: trained and scored on ``p``;
* both images averaged (what ships): trained and scored on ``a``;
* one image, mirror images as training samples: trained on ``p`` and ``2a - p`` (every training
  poster twice, with its labels), validated and scored on ``p``.

    python scripts/mirror_training.py --manifest all.csv --cache CACHE [--seeds 0,10]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch

from posterfusion import metrics
from posterfusion.config import load_config
from posterfusion.features import Features
from posterfusion.metrics import mean_sd
from posterfusion.model import predict_proba
from posterfusion.train import fit_and_validate, prepare_data

from ablation import test_sets  # scripts/ is the script's folder, first on sys.path

VIEW = "260x372"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--cache", required=True, help="a cache holding both views of the manifest's posters")
    parser.add_argument("--seeds", default="0,10", help="first seed of each seed group")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(None, {"mode": "fusion", "words": {"enabled": False}})
    both = prepare_data(args.manifest, args.cache, config | {"backbone_view": f"{VIEW}+flip"}, "cpu")
    one = prepare_data(args.manifest, args.cache, config | {"backbone_view": VIEW}, "cpu")
    if both.table.keys != one.table.keys:
        sys.exit(f"{args.cache}: the two views do not hold the same posters; build both with detect-cache build")
    y, train, val = both.y, both.train_idx, both.val_idx
    test, sets = test_sets(both)

    poster = replace(one.table.features, text=None)
    averaged = replace(both.table.features, text=None)
    mirror = 2 * averaged.cnn[train] - poster.cnn[train]
    augmented = Features(np.concatenate([poster.cnn, mirror]), np.concatenate([poster.detectors, poster.detectors[train]]))
    extra = len(poster) + np.arange(len(train))
    variants = {
        "one image": (poster, y, train),
        "both images averaged (ships)": (averaged, y, train),
        "one image, mirror images as training samples": (augmented, np.concatenate([y, y[train]]), np.concatenate([train, extra])),
    }
    results: dict[str, dict[str, list[dict]]] = {}
    for name, (x, labels, fit_rows) in variants.items():
        for seed in [int(s) for s in args.seeds.split(",")]:
            model, _, thresholds, val_scores = fit_and_validate(x, labels, fit_rows, val, both.genres, config | {"seed": seed},
                                                                torch.device("cpu"))
            prob = predict_proba(model, x.rows(test))
            for collection, rows in sets.items():
                scores = metrics.evaluate(y[test[rows]], prob[rows], thresholds, both.genres) | {"val_map": val_scores["map"]}
                results.setdefault(name, {}).setdefault(collection, []).append(scores)
            print(f"  {name}, seed {seed}: test mAP " + ", ".join(
                f"{c} {results[name][c][-1]['map']:.4f}" for c in sets) + f"; val mAP {val_scores['map']:.4f}", flush=True)

    print(f"\n`python {' '.join(sys.argv)}`\n\ntrain {len(train):,} posters, val {len(val):,}; seed groups {args.seeds} (mean ± sd)")
    for collection, rows in sets.items():
        print(f"\ntest split of {collection}: {len(rows):,} posters\n")
        print("| fusion heads, words off | test mAP | macro-F1 | micro-F1 | val mAP |\n|---|---|---|---|---|")
        for name, per in results.items():
            print(f"| {name} | " + " | ".join(mean_sd([r[k] for r in per[collection]]) for k in ("map", "macro_f1", "micro_f1", "val_map")) + " |")


if __name__ == "__main__":
    main()
