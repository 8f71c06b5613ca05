"""Ablation table: what each branch is worth, on one validation split.

Trains the head in each mode (``cnn`` only, ``detectors`` only, ``fusion``) with the same config,
split and seeds as ``fusion train``, scores each on the validation split, and adds the
genre-frequency prior as the floor. Several seeds show how much of a difference is noise.

    python scripts/ablation.py --manifest ../shared/data/movieposters/labels.csv --cache CACHE \
        [--config configs/default.yaml] [--seeds 0,1,2] [--json ablation.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

from posterfusion import metrics
from posterfusion.extract import resolve_device
from posterfusion.config import load_config
from posterfusion.train import fit_and_validate, prepare_data

KEYS = ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    config = load_config(args.config, {"mode": "fusion"})  # fusion needs both feature sets
    data = prepare_data(args.manifest, args.cache, config, args.device)
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    y_val = data.y[data.val_idx]
    prior = metrics.prior_scores(data.y[data.train_idx], len(data.val_idx))
    rows["genre-frequency prior"] = [metrics.evaluate(y_val, prior, metrics.tune_thresholds(y_val, prior), data.genres)]
    for mode in ("detectors", "cnn", "fusion"):
        results = []
        for seed in seeds:
            run = copy.deepcopy(config) | {"mode": mode, "seed": seed}
            cnn = data.table.cnn if mode in ("cnn", "fusion") else None
            det = data.table.detectors if mode in ("detectors", "fusion") else None
            _, _, _, scores = fit_and_validate(cnn, det, data.y, data.train_idx, data.val_idx, data.genres, run, device)
            results.append(scores)
        rows[f"{mode} only" if mode != "fusion" else "fusion (cnn + detectors)"] = results

    print(f"validation split: {len(data.val_idx)} posters, {len(data.genres)} genres; "
          f"train: {len(data.train_idx)}; seeds {args.seeds} (mean ± sd)\n")
    print("| model | mAP | micro-F1 | macro-F1 | samples-F1 | top-n acc |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, results in rows.items():
        cells, summary[name] = [], {}
        for key in KEYS:
            values = [r[key] for r in results]
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "sd": sd}
            cells.append(f"{mean:.3f}" + (f" ± {sd:.3f}" if len(values) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seeds": seeds, "val_posters": len(data.val_idx), "rows": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
