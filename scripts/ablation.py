"""Ablation table: what each branch and each accuracy lever is worth, on the held-out test split.

Every row is trained like ``fusion train`` (same config, split, early stopping and threshold tuning
on the ``val`` rows) and scored on the manifest's ``test`` rows, which nothing else ever sees. Each
row is repeated for several seed groups (each an ensemble of ``optim.ensemble`` heads) and shown
as mean ± sd, so a lever is kept only where its gain beats the noise. The cost column is the
backbone's measured forward time per poster for the row's view on this machine (detectors: every
row that uses them pays the same, see bench/run.py). A row's CNN is EfficientNet-Lite0 at 224x320 + flip
unless the row names another backbone or view (the ``-big``, ``-lite2`` and ``-pair`` rows).

    fusion manifest split labels.csv --val 0.15 --test 0.15 --seed 0 --out split.csv
    python scripts/ablation.py --manifest split.csv --cache CACHE [--seeds 0,10] [--json ablation.json]
        [--rows prior,detectors-v1,...] [--config configs/default.yaml] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from posterfusion import metrics
from posterfusion.config import default_config, load_config, merge
from posterfusion.detectors import schema
from posterfusion.frozen import resolve_device
from posterfusion.model import predict_proba
from posterfusion.train import (TrainingData, collections, finetuned_embeddings, fit_and_validate, fit_words,
                                prepare_data, read_text, split_positions, weigh_words)

KEYS = ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy")
SQUASH = "224x224"
LITE0 = {"backbone": "efficientnet_lite0", "backbone_view": "224x320+flip"}
"""Every row's CNN and view unless the row names others (the rows before the backbone ensemble)."""
BIG = {"backbone_view": "260x372+flip"}
"""Lite2's own width (260) at the posters' shape."""
LITE2 = {"backbone": "efficientnet_lite2", **BIG}
PAIR = {"backbone": "efficientnet_lite0+efficientnet_lite2", **BIG}
"""Both networks, a head ensemble on each, averaged."""
PAIR_ONE_IMAGE = PAIR | {"backbone_view": "260x372"}
"""The same without the mirror images (half the backbones' work)."""
V1_MASK = np.isin(schema.COLUMNS, schema.V1_COLUMNS).astype(np.float32)
"""Schema v2's other columns are zeroed for the v1 rows (constant: no signal)."""


@dataclass
class Row:
    key: str
    name: str
    overrides: dict = field(default_factory=dict)
    v1_detectors: bool = False
    test_words_from: str = "ocr"  # what the word model reads on the test posters: ocr, or title (its ceiling)
    first_collection_only: bool = False  # train and validate on the manifest's first collection alone


ROWS = [
    Row("detectors-v1", "detectors only, schema v1", {"mode": "detectors"}, v1_detectors=True),
    Row("detectors", "detectors only, schema v2 (+ layout, cast size)", {"mode": "detectors"}),
    Row("cnn-squash", "cnn only, 224x224 squash", {"mode": "cnn", "backbone_view": SQUASH}),
    Row("cnn-noflip", "cnn only, 224x320", {"mode": "cnn", "backbone_view": "224x320"}),
    Row("cnn-view", "cnn only, 224x320 + flip", {"mode": "cnn"}),
    Row("fusion-v1", "fusion, 224x224 squash + schema v1 (v1's model)", {"backbone_view": SQUASH}, v1_detectors=True),
    Row("fusion-squash", "fusion, 224x224 squash + schema v2", {"backbone_view": SQUASH}),
    Row("fusion-noflip", "fusion, 224x320 + schema v2", {"backbone_view": "224x320"}),
    Row("fusion", "fusion, 224x320 + flip + schema v2", {}),
    Row("fusion-posweight-full", "fusion, 224x320 + flip, pos_weight full", {"loss": {"pos_weight": "full"}}),
    Row("cnn-tail", "cnn only, 224x320 + flip, tail fine-tuned", {"mode": "cnn", "finetune": {"enabled": True}}),
    Row("fusion-tail", "fusion, 224x320 + flip, tail fine-tuned", {"finetune": {"enabled": True}}),
    Row("cnn-big", "cnn only, 260x372 + flip", {"mode": "cnn", **BIG}),
    Row("fusion-big", "fusion, 260x372 + flip + schema v2", BIG),
    Row("cnn-lite2", "cnn only, Lite2 260x372 + flip", {"mode": "cnn", **LITE2}),
    Row("fusion-lite2", "fusion, Lite2 260x372 + flip + schema v2", LITE2),
    Row("cnn-pair", "cnn only, Lite0 + Lite2 heads averaged, 260x372 + flip", {"mode": "cnn", **PAIR}),
    Row("fusion-pair", "fusion, Lite0 + Lite2 heads averaged, 260x372 + flip + schema v2", PAIR),
    Row("text", "text only (OCR)", {"mode": "text", "text": True}),
    Row("fusion-text", "fusion + text, 224x320 + flip", {"text": True}),
    Row("fusion-tail-text", "fusion + text, 224x320 + flip, tail fine-tuned", {"text": True, "finetune": {"enabled": True}}),
    Row("cnn-words", "cnn only + word model (titles + OCR)", {"mode": "cnn", "words": {"enabled": True}}),
    Row("fusion-words-titles-only", "fusion + word model learnt from titles only",
        {"words": {"enabled": True, "read_training_posters": False}}),
    Row("fusion-words", "fusion + word model (titles + OCR)", {"words": {"enabled": True}}),
    Row("cnn-words-lite2", "cnn only, Lite2 260x372 + flip, + word model", {"mode": "cnn", "words": {"enabled": True}, **LITE2}),
    Row("fusion-words-lite2", "fusion, Lite2 260x372 + flip, + word model", {"words": {"enabled": True}, **LITE2}),
    Row("fusion-words-big", "fusion, 260x372 + flip, + word model", {"words": {"enabled": True}, **BIG}),
    Row("cnn-words-pair", "cnn only, Lite0 + Lite2 heads averaged, 260x372 + flip, + word model",
        {"mode": "cnn", "words": {"enabled": True}, **PAIR}),
    Row("fusion-words-pair", "fusion, Lite0 + Lite2 heads averaged, 260x372 + flip, + word model: shipped",
        {"words": {"enabled": True}, **PAIR}),
    Row("fusion-words-titles", "fusion + word model fed the true titles at test time",
        {"words": {"enabled": True}}, test_words_from="title"),
    Row("fusion-words-pair-noflip", "fusion, Lite0 + Lite2 heads averaged, 260x372, no mirror image, + word model",
        {"words": {"enabled": True}, **PAIR_ONE_IMAGE}),
    Row("fusion-words-pair-c0.5", "the shipped recipe, word model C 0.5", {"words": {"enabled": True, "C": 0.5}, **PAIR}),
    Row("fusion-words-pair-c2", "the shipped recipe, word model C 2", {"words": {"enabled": True, "C": 2.0}, **PAIR}),
    Row("fusion-words-pair-first", "the shipped recipe trained on the first collection alone",
        {"words": {"enabled": True}, **PAIR}, first_collection_only=True),
]
"""Every row but the word-model ones runs with ``words.enabled: false``: the head alone."""


def merged(config: dict, overrides: dict) -> dict:
    """The config with a row's overrides (on Lite0 unless they name a backbone), checked like a
    config file's."""
    out = copy.deepcopy(config)
    merge(out, LITE0 | overrides, default_config(), "ablation row")
    return out


def backbone_ms(name: str, view: str, paths: list[str], n: int = 96) -> float:
    """The backbone's forward time per poster for a view, in batches of 8 (the ablation table's cost column)."""
    from posterfusion.backbone import create_backbone
    from posterfusion.images import decode_bytes

    backbone = create_backbone(name, view=view, lazy=True).use_onnxruntime()
    batch = torch.stack([backbone.prepare(decode_bytes(Path(p).read_bytes())) for p in paths[:n]])
    with torch.inference_mode():
        backbone.embed(batch[:8])  # warm-up
        start = time.perf_counter()
        for s in range(0, len(batch), 8):
            backbone.embed(batch[s : s + 8])
    return (time.perf_counter() - start) * 1000 / len(batch)


def test_sets(data: TrainingData) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The test posters (positions into the table) and, per collection in manifest order, which of
    them are its own: a combined manifest is scored per collection, so the shared posters' figures
    stay comparable."""
    test = split_positions(data.manifest, data.table.rows, "test")
    source = collections(data.manifest, data.table.rows)[test]
    return test, {name: np.flatnonzero(source == name) for name in dict.fromkeys(source)}


def run_row(row: Row, data: TrainingData, config: dict, seeds: list[int], cache: str, device: torch.device) -> dict:
    test, sets = test_sets(data)
    results: dict[str, list[dict]] = {name: [] for name in sets}
    fine_tunes = []
    train_idx, val_idx = data.train_idx, data.val_idx
    if row.first_collection_only:  # a combined manifest's first collection, as before the others joined it
        source = collections(data.manifest, data.table.rows)
        train_idx, val_idx = train_idx[source[train_idx] == source[0]], val_idx[source[val_idx] == source[0]]
    row_config, word_model = merged(config, row.overrides), None
    if row_config["words"]["enabled"]:  # learnt once (no seed in it), weighed per seed group
        word_model, card, _, docs_val = fit_words(data, train_idx, val_idx, row_config, cache, str(device))
        docs_test = test_docs(data, test, row.test_words_from, cache, str(device))
    for seed in seeds:
        run = row_config | {"seed": seed}
        x = data.table.features.for_mode(run["mode"])
        if not run["text"]:
            x = replace(x, text=None)
        if x.detectors is not None and row.v1_detectors:
            x = replace(x, detectors=x.detectors * V1_MASK)
        if run["finetune"]["enabled"]:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                cnn, _, tuned = finetuned_embeddings(data, run, cache, Path(tmp), device)
                x = replace(x, cnn=cnn)
                fine_tunes.append({"seconds": time.perf_counter() - start, "best_epoch": tuned["best_epoch"],
                                   "joint_val_map": tuned["best_val_map"]})
        model, _, thresholds, val_scores = fit_and_validate(x, data.y, train_idx, val_idx, data.genres, run, device)
        prob = predict_proba(model, x.rows(test))
        if word_model is not None:  # as `fusion train` adds it, then read on the test posters
            head_val = predict_proba(model, x.rows(val_idx))
            mixed_val = weigh_words(word_model, card, data.y[val_idx], head_val, docs_val)
            thresholds = metrics.tune_thresholds(data.y[val_idx], mixed_val)
            val_scores = metrics.evaluate(data.y[val_idx], mixed_val, thresholds, data.genres)
            prob = word_model.mix(prob, docs_test)
            print(f"  word model weight {float(np.mean(word_model.weight)):.2f} (mean over genres): val mAP {card['val_map_head']:.4f} -> "
                  f"{card['val_map_mixed']:.4f}", flush=True)
        for name, rows in sets.items():
            scores = metrics.evaluate(data.y[test[rows]], prob[rows], thresholds, data.genres)
            results[name].append(scores | {"val_map": val_scores["map"]})
        print(f"  {row.key} seed {seed}: test mAP " + ", ".join(f"{Path(n).stem} {r[-1]['map']:.4f}" for n, r in results.items())
              + f"; val mAP {val_scores['map']:.4f}", flush=True)
    return {"results": results, "fine_tunes": fine_tunes}


def test_docs(data: TrainingData, test: np.ndarray, source: str, cache: str, device: str) -> list[str]:
    """The text the word model reads on the test posters: OCR's (computed where the cache lacks it),
    or their true titles."""
    rows = data.table.rows[test]
    if source == "title":
        return data.manifest.table["title"].fillna("").astype(str).iloc[rows].tolist()
    return read_text([data.manifest.paths[r] for r in rows], cache, device)[1]


def summarise(results: list[dict]) -> dict:
    out = {}
    for key in KEYS + ("val_map",):
        values = [r[key] for r in results]
        out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="manifest with a split column holding train, val and test rows")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--seeds", default="0,10", help="first seed of each seed group")
    parser.add_argument("--rows", default=",".join(["prior"] + [r.key for r in ROWS]))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads (default: all cores; 1 trains heads far faster on a busy machine)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, {"mode": "fusion", "words": {"enabled": False}})  # fusion needs both feature sets
    device = resolve_device(args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.rows.split(",")
    datasets: dict[tuple[str, str, bool], TrainingData] = {}
    summary: dict[str, dict] = {}
    costs: dict[tuple[str, str], float] = {}

    def data_for(backbone: str, view: str, text: bool = False) -> TrainingData:
        if (backbone, view, text) not in datasets:
            datasets[backbone, view, text] = prepare_data(
                args.manifest, args.cache, config | {"backbone": backbone, "backbone_view": view, "text": text}, args.device)
        return datasets[backbone, view, text]

    if "prior" in wanted:  # needs no features: the shipped backbone's posters (a cache of them is the usual one)
        data = data_for(config["backbone"], config["backbone_view"])
        thresholds = metrics.tune_thresholds(data.y[data.val_idx], metrics.prior_scores(data.y[data.train_idx], len(data.val_idx)))
        test, sets = test_sets(data)
        summary["genre-frequency prior"] = {"backbone_ms": 0.0, "scores": {
            name: summarise([metrics.evaluate(data.y[test[rows]], metrics.prior_scores(data.y[data.train_idx], len(rows)),
                                              thresholds, data.genres) | {"val_map": 0.0}])
            for name, rows in sets.items()}}
    for row in ROWS:
        if row.key not in wanted:
            continue
        run = merged(config, row.overrides)
        data = data_for(run["backbone"], run["backbone_view"], run["text"])
        print(f"{row.name} ...", flush=True)
        outcome = run_row(row, data, config, seeds, args.cache, device)
        view = run["backbone"], run["backbone_view"]
        uses_cnn = run["mode"] in ("cnn", "fusion")
        if uses_cnn and view not in costs:
            costs[view] = backbone_ms(*view, [data.manifest.paths[i] for i in data.table.rows])
        summary[row.name] = {"scores": {name: summarise(r) for name, r in outcome["results"].items()},
                             "fine_tunes": outcome["fine_tunes"],
                             "backbone_ms": costs[view] if uses_cnn else 0.0,
                             "seeds": outcome["results"]}

    data = next(iter(datasets.values()))
    _, sets = test_sets(data)
    for collection, rows in sets.items():
        print(f"\ntest split of {Path(collection).stem}: {len(rows)} posters, {len(data.genres)} genres; thresholds and early "
              f"stopping on {len(data.val_idx)} val posters; train {len(data.train_idx)}; seed groups {args.seeds} (mean ± sd)\n")
        print("| model | test mAP | micro-F1 | macro-F1 | samples-F1 | top-n acc | val mAP | backbone ms/poster |")
        print("|---|---|---|---|---|---|---|---|")
        for name, entry in summary.items():
            scores = entry["scores"][collection]
            cells = [f"{scores[k]['mean']:.3f}" + (f" ± {scores[k]['sd']:.3f}" if len(seeds) > 1 else "")
                     for k in KEYS + ("val_map",)]
            print(f"| {name} | " + " | ".join(cells) + f" | {entry['backbone_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"seeds": seeds, "test_posters": {n: len(r) for n, r in sets.items()}, "val_posters": len(data.val_idx),
                       "rows": summary}, handle, indent=2, default=float)


if __name__ == "__main__":
    main()
