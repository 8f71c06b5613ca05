"""Text lever, late fusion: a linear word model fused with the fusion ensemble, on the held-out test split.

The word model (TF-IDF over words, one logistic regression per genre) is fitted on the *titles*
of the training posters (the manifest's ``title`` column), so only the val and test posters need
OCR; at val and test time it reads what OCR found on the poster, as it would for a user's poster.
Its logits are mixed with the fusion ensemble's, ``(1 - w) * image + w * text``, ``w`` and the
per-genre thresholds chosen on val; test is scored once. The same model fed the true titles at
test time is printed too, as the ceiling a perfect title reader would reach.

    fusion manifest split labels.csv --val 0.15 --test 0.15 --seed 0 --out split.csv
    detect-cache build split.csv --cache CACHE                    # features of every poster
    detect-cache build valtest.csv --cache CACHE --text           # OCR of split.csv's val and test rows
    python scripts/text_late_fusion.py --manifest split.csv --cache CACHE [--seeds 0,10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from scipy.special import expit, logit
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from posterfusion import metrics
from posterfusion.config import load_config
from posterfusion.detectors.schema import words
from posterfusion.extract import FrozenModels, open_stores
from posterfusion.train import fit_and_validate, predict_proba, prepare_data, split_positions

WEIGHTS = np.arange(0.0, 0.61, 0.05)


def mixed(w: float, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Probabilities from the two models' logits, ``(1 - w) * image + w * text``."""
    return expit((1 - w) * logit(image.clip(1e-6, 1 - 1e-6)) + w * logit(text.clip(1e-6, 1 - 1e-6)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="split manifest with a title column")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--seeds", default="0,10")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regressions")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(None, {"mode": "fusion"})
    data = prepare_data(args.manifest, args.cache, config, "cpu")
    table, y, train, val = data.table, data.y, data.train_idx, data.val_idx
    test = split_positions(data.manifest, table.rows, "test")
    read = open_stores(FrozenModels(None, None, "cpu", text=True), args.cache)["text"].notes(table.keys)
    missing = sum(table.keys[i] not in read for i in np.concatenate([val, test]))
    if missing:
        raise SystemExit(f"{args.cache}: {missing} val/test posters have no OCR yet; run detect-cache build --text on them")
    ocr = [read.get(k, "") for k in table.keys]
    titles = data.manifest.table["title"].fillna("").astype(str).iloc[table.rows].tolist()

    vectorizer = TfidfVectorizer(analyzer=words, min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform([titles[i] for i in train])
    word_model = OneVsRestClassifier(LogisticRegression(C=args.C, max_iter=3000)).fit(x_train, y[train])

    def text_proba(docs: list[str], rows: np.ndarray) -> np.ndarray:
        return word_model.predict_proba(vectorizer.transform([docs[i] for i in rows]))

    inputs = {"OCR": (text_proba(ocr, val), text_proba(ocr, test)),
              "true titles (ceiling)": (text_proba(titles, val), text_proba(titles, test))}
    print(f"text alone: test mAP {metrics.mean_average_precision(y[test], inputs['OCR'][1]):.3f} from OCR, "
          f"{metrics.mean_average_precision(y[test], inputs['true titles (ceiling)'][1]):.3f} from true titles")
    rows: dict[str, list[dict]] = {"fusion": []} | {f"fusion + words ({k})": [] for k in inputs}
    for seed in [int(s) for s in args.seeds.split(",")]:
        model, _, thresholds, _ = fit_and_validate(table.cnn, table.detectors, y, train, val, data.genres,
                                                   config | {"seed": seed}, torch.device("cpu"))
        image_val, image_test = (predict_proba(model, table.cnn[r], table.detectors[r]) for r in (val, test))
        rows["fusion"].append(metrics.evaluate(y[test], image_test, thresholds, data.genres))
        for name, (text_val, text_test) in inputs.items():
            w = max(WEIGHTS, key=lambda w: metrics.mean_average_precision(y[val], mixed(w, image_val, text_val)))
            tuned = metrics.tune_thresholds(y[val], mixed(w, image_val, text_val))
            result = metrics.evaluate(y[test], mixed(w, image_test, text_test), tuned, data.genres)
            rows[f"fusion + words ({name})"].append(result | {"w": float(w)})
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['map']:.4f}" for k, v in rows.items()), flush=True)

    print(f"\ntest split: {len(test)} posters; w and thresholds on {len(val)} val posters (mean ± sd over seed groups)\n")
    print("| model | test mAP | micro-F1 | macro-F1 | w |\n|---|---|---|---|---|")
    for name, results in rows.items():
        cells = [f"{statistics.fmean(r[k] for r in results):.3f} ± {statistics.stdev(r[k] for r in results) if len(results) > 1 else 0.0:.3f}"
                 for k in ("map", "micro_f1", "macro_f1")]
        weights = ", ".join(f"{r['w']:.2f}" for r in results) if "w" in results[0] else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {weights} |")


if __name__ == "__main__":
    main()
