"""Detector features through gradient-boosted trees, fused late with the head: does a model that
can learn interactions (gun + car, child + animal) get more out of the detectors than the head?

One HistGradientBoosting classifier per genre is fitted on the training posters' detector features
(schema v2: object counts and confidences, faces, expressions, layout), then mixed with the head's
logits as the word model is, ``(1 - w) * head + w * trees``, with ``w`` chosen per genre on the
validation posters (thresholds re-tuned there); the held-out test split scores it. Rows: cnn-only
and fusion heads of the shipped recipe (words off), each with and without the trees.

    python scripts/detector_trees.py --manifest split.csv --cache CACHE [--seeds 0,10]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.special import expit, logit

from posterfusion import metrics
from posterfusion.config import load_config
from posterfusion.metrics import mean_sd
from posterfusion.model import predict_proba
from posterfusion.train import fit_and_validate, prepare_data, split_positions
from posterfusion.words import WEIGHTS


def tree_probabilities(x: np.ndarray, y: np.ndarray, train: np.ndarray, others: list[np.ndarray]) -> list[np.ndarray]:
    """Each genre's tree ensemble, fitted on ``train`` rows, applied to each of ``others``."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    out = [np.zeros((len(rows), y.shape[1])) for rows in others]
    for g in range(y.shape[1]):
        trees = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True,
                                               validation_fraction=0.15, random_state=0).fit(x[train], y[train, g])
        for o, rows in zip(out, others):
            o[:, g] = trees.predict_proba(x[rows])[:, 1]
    return out


def late_mix(y_val: np.ndarray, head: tuple[np.ndarray, np.ndarray], trees: tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(val, test) probabilities of the per-genre mix whose weight gives the best val AP."""
    as_logit = [logit(np.clip(p, 1e-6, 1 - 1e-6)) for p in (*head, *trees)]
    mixes = [[expit((1 - w) * h + w * t) for h, t in zip(as_logit[:2], as_logit[2:])] for w in WEIGHTS]
    ap = np.stack([metrics.average_precision_per_genre(y_val, val) for val, _ in mixes])
    best = np.argmax(np.nan_to_num(ap, nan=-1.0), axis=0)
    pick = lambda k: np.stack([mixes[b][k][:, g] for g, b in enumerate(best)], axis=1)  # noqa: E731
    return pick(0), pick(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--seeds", default="0,10", help="first seed of each seed group")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(None, {"mode": "fusion", "words": {"enabled": False}})
    data = prepare_data(args.manifest, args.cache, config, "cpu")
    test = split_positions(data.manifest, data.table.rows, "test")
    train, val, y = data.train_idx, data.val_idx, data.y
    start = time.perf_counter()
    trees = tree_probabilities(data.table.features.detectors, y, train, [val, test])
    trees_seconds = time.perf_counter() - start
    alone = metrics.tune_thresholds(y[val], trees[0])
    rows: dict[str, list[dict]] = {"detectors only, trees": [metrics.evaluate(y[test], trees[1], alone, data.genres)]}
    for mode in ("cnn", "fusion"):
        for seed in [int(s) for s in args.seeds.split(",")]:
            x = replace(data.table.features.for_mode(mode), text=None)
            model, _, thresholds, _ = fit_and_validate(x, y, train, val, data.genres, config | {"mode": mode, "seed": seed},
                                                       torch.device("cpu"))
            head = predict_proba(model, x.rows(val)), predict_proba(model, x.rows(test))
            rows.setdefault(f"{mode} head", []).append(metrics.evaluate(y[test], head[1], thresholds, data.genres))
            mixed_val, mixed_test = late_mix(y[val], head, tuple(trees))
            rows.setdefault(f"{mode} head + detector trees, late", []).append(
                metrics.evaluate(y[test], mixed_test, metrics.tune_thresholds(y[val], mixed_val), data.genres))
            print(f"  {mode} seed {seed}: {rows[f'{mode} head'][-1]['map']:.4f} -> "
                  f"{rows[f'{mode} head + detector trees, late'][-1]['map']:.4f}", flush=True)

    print(f"\n`python {' '.join(sys.argv)}`\n\ntest: {len(test):,} posters; train {len(train):,}, val {len(val):,}; "
          f"seed groups {args.seeds} (mean ± sd); the trees (one seed) took {trees_seconds:.0f} s\n")
    print("| model | test mAP | macro-F1 | micro-F1 |\n|---|---|---|---|")
    for name, results in rows.items():
        print(f"| {name} | " + " | ".join(mean_sd([r[k] for r in results]) for k in ("map", "macro_f1", "micro_f1")) + " |")


if __name__ == "__main__":
    main()
