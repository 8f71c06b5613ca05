"""Learning curve: the shipped recipe (words off) trained on more and more posters, scored on each
collection's own held-out test split.

The manifest joins collections (``fusion manifest combine``), each already split. The training
posters of a point are the first N ``train`` rows in a seeded order that takes every poster of the
first collection (the shared posters) before any of the next (the pool), so the first points are
the shared posters alone, as before the pool, and the last is every training poster. Early stopping
and thresholds use every ``val`` row, as ``fusion train`` on the same manifest does; ``test`` rows
are scored per collection and nothing else sees them. Each point is trained per seed group (an
ensemble of ``optim.ensemble`` heads on each network) in fusion and in cnn-only mode: the
difference is what the detector branches (objects, faces, expressions) add.

    fusion manifest split ../shared/data/movieposters/labels.csv --seed 0 --out split.csv
    fusion manifest split POOL/labels.csv --seed 0 --out pool-split.csv
    fusion manifest combine split.csv pool-split.csv --out all.csv
    python scripts/learning_curve.py --manifest all.csv --cache CACHE [--sizes N,N,...] [--seeds 0,10]
        [--json curve.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from posterfusion import metrics
from posterfusion.metrics import mean_sd
from posterfusion.config import load_config
from posterfusion.frozen import resolve_device
from posterfusion.model import predict_proba
from posterfusion.train import collections, fit_and_validate, prepare_data, split_positions

MODES = ("fusion", "cnn")


def default_sizes(counts: list[int]) -> list[int]:
    """Half the first collection's training posters, all of them, then a quarter, half and all of
    the rest."""
    first, rest = counts[0], sum(counts[1:])
    return sorted({first // 2, first} | ({first + rest // 4, first + rest // 2, first + rest} if rest else set()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="combined manifest with 'split' and 'source' columns")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--sizes", default="", help="training posters per point (default: see default_sizes)")
    parser.add_argument("--seeds", default="0,10", help="first seed of each seed group")
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the order training posters are taken in")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    config = load_config(args.config, {"mode": "fusion", "words": {"enabled": False}})
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = prepare_data(args.manifest, args.cache, config, args.device)
    source = collections(data.manifest, data.table.rows)
    names = list(dict.fromkeys(source))  # in manifest order: the first collection first
    rng = np.random.default_rng(args.order_seed)
    train = data.train_idx
    ordered = np.concatenate([rng.permutation(train[source[train] == name]) for name in names])
    counts = [int((source[train] == name).sum()) for name in names]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes(counts)
    test = split_positions(data.manifest, data.table.rows, "test")
    tests = {name: test[source[test] == name] for name in names}

    points = []
    for size in sizes:
        subset = np.sort(ordered[:size])
        point = {"train": size, "train_per_collection": [int((source[subset] == name).sum()) for name in names],
                 "scores": {}}
        for mode in MODES:
            for seed in seeds:
                start = time.perf_counter()
                x = replace(data.table.features.for_mode(mode), text=None)
                model, _, thresholds, _ = fit_and_validate(x, data.y, subset, data.val_idx, data.genres,
                                                           config | {"mode": mode, "seed": seed}, device)
                for name, rows in tests.items():
                    prob = predict_proba(model, x.rows(rows))
                    scores = metrics.evaluate(data.y[rows], prob, thresholds, data.genres)
                    point["scores"].setdefault(f"{mode} {name}", []).append(
                        {k: scores[k] for k in ("map", "macro_f1", "micro_f1")} | {"seconds": time.perf_counter() - start})
                print(f"  {size} posters, {mode}, seed {seed}: " + ", ".join(
                    f"{name} {point['scores'][f'{mode} {name}'][-1]['map']:.4f}" for name in names), flush=True)
        points.append(point)

    label = {name: Path(name).stem for name in names}
    print(f"\n`python {' '.join(sys.argv)}`\n")
    print(f"train: the first N of {sum(counts):,} training posters ({', '.join(f'{label[n]} {c:,}' for n, c in zip(names, counts))}); "
          f"val: {len(data.val_idx):,} posters; test: " + ", ".join(f"{label[n]} {len(r):,}" for n, r in tests.items())
          + f"; seed groups {args.seeds} (mean ± sd)\n")
    header = ["training posters"] + [f"of them {label[n]}" for n in names[1:]]
    for name in names:
        header += [f"{label[name]} test: fusion mAP", "cnn-only mAP", "detectors' gain", "fusion macro-F1"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for point in points:
        cells = [f"{point['train']:,}"] + [f"{c:,}" for c in point["train_per_collection"][1:]]
        for name in names:
            fusion, cnn = point["scores"][f"fusion {name}"], point["scores"][f"cnn {name}"]
            gain = [f["map"] - c["map"] for f, c in zip(fusion, cnn)]
            cells += [mean_sd([s["map"] for s in fusion]), mean_sd([s["map"] for s in cnn]),
                      f"{statistics.fmean(gain):+.3f}", mean_sd([s["macro_f1"] for s in fusion])]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "collections": names, "train_counts": counts,
                                               "points": points}, indent=2) + "\n")


if __name__ == "__main__":
    main()
