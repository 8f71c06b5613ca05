"""How useful is ``fusion audit``'s ranking? Labels corrupted on purpose, then found again.

A catalogue's split (``val`` or ``test``; posters the model never trained on) is corrupted the way
real catalogues are: one true genre dropped from 10 % of the posters (among those with two genres or
more, so every record keeps a label), and one wrong genre added to another 10 % (drawn in proportion
to the genres' training frequency, so common genres are added most, as in real mistakes; a
uniform draw would favour rare genres, which are easier to spot). ``fusion audit``'s findings on
the corrupted records are then ranked by score, and precision@k counts the dropped genres among
the top k ``probably missing`` findings and the added ones among the top k ``not conveyed``. The
base rate is what a random pick of a record's unlabelled (labelled) genre finds.

``fusion audit``'s own findings (its scores and cut-offs, see posterfusion.audit) are ranked
first; then, over every candidate pair, other orderings of the same probabilities: the threshold
ratio (p / threshold, both kinds), the probability alone (1 - p for not conveyed) and the lift over
the genre's training frequency (p / base rate). ``val`` is where an ordering is chosen, ``test``
what it is worth. Where the audit reports fewer findings than k, its precision is over those.

    fusion manifest split ../shared/data/movieposters/labels.csv --val 0.15 --test 0.15 --seed 0 --out split.csv
    fusion train --manifest split.csv --cache CACHE --out model-0    # val: early stopping, thresholds
    fusion train --manifest split.csv --cache CACHE --config seed10.yaml --out model-10   # seed: 10
    python scripts/audit_precision.py --manifest split.csv --model model-0 model-10 --cache CACHE [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from posterfusion.audit import MISSING, NOT_CONVEYED, Auditor
from posterfusion.metrics import mean_sd
from posterfusion.manifest import load_manifest
from posterfusion.predict import Predictor

KS = (50, 100, 200)
SHARE = 0.10


def corrupt(labels: list[list[str]], genres: list[str], frequency: np.ndarray, seed: int
            ) -> tuple[list[list[str]], set[tuple[int, str]], set[tuple[int, str]]]:
    """The labels with one true genre dropped from 10 % of the posters and one wrong genre added to
    another 10 %; returns them with the (poster, genre) pairs dropped and added."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    eligible = [i for i, genre_list in enumerate(labels) if len(genre_list) >= 2]
    drop = rng.choice(eligible, size=min(len(eligible), round(SHARE * n)), replace=False)
    rest = np.setdiff1d(np.arange(n), drop)
    add = rng.choice(rest, size=round(SHARE * n), replace=False)
    out = [list(genre_list) for genre_list in labels]
    dropped, added = set(), set()
    for i in drop:
        genre = out[i].pop(rng.integers(len(out[i])))
        dropped.add((int(i), genre))
    for i in add:
        candidates = [k for k, g in enumerate(genres) if g not in out[i]]
        weights = frequency[candidates] / frequency[candidates].sum()
        genre = genres[candidates[rng.choice(len(candidates), p=weights)]]
        out[i].append(genre)
        added.add((int(i), genre))
    return out, dropped, added


def precision_at(ranked: list[tuple[int, str]], truth: set[tuple[int, str]], k: int) -> float:
    """Share of the top k that are in ``truth`` (over the findings there are, where fewer than k)."""
    top = ranked[:k]
    return sum(pair in truth for pair in top) / len(top) if top else float("nan")


def ranked_pairs(scores: np.ndarray, mask: np.ndarray, genres: list[str]) -> list[tuple[int, str]]:
    """(poster, genre) pairs where ``mask``, highest score first."""
    rows, cols = np.nonzero(mask)
    order = np.argsort(-scores[rows, cols], kind="stable")
    return [(int(rows[i]), genres[cols[i]]) for i in order]


def one_corruption(auditor: Auditor, paths: list[str], labels: list[list[str]], frequency: np.ndarray,
                   cache: str | None, seed: int) -> dict[tuple[str, str], list[float]]:
    """Precision@k per (finding kind, ordering) for one corruption of the labels."""
    genres = auditor.genres
    thresholds = auditor.predictor.thresholds
    corrupted, dropped, added = corrupt(labels, genres, frequency, seed)
    audits = [a for batch in auditor.stream(list(zip(paths, corrupted)), cache) for a in batch]
    probs = np.array([[a.probabilities[g] for g in genres] for a in audits])
    labelled = np.array([[g in a.labelled for g in genres] for a in audits])
    found = {kind: [(i, f.genre) for i, a in enumerate(audits) for f in a.findings if f.kind == kind]
             for kind in (MISSING, NOT_CONVEYED)}
    scores = {kind: {(i, f.genre): f.score for i, a in enumerate(audits) for f in a.findings if f.kind == kind}
              for kind in found}
    rows = {}
    for kind, truth, mask, sign in ((MISSING, dropped, ~labelled, 1), (NOT_CONVEYED, added, labelled, -1)):
        by_score = sorted(found[kind], key=lambda pair: -scores[kind][pair])
        orderings = {
            "fusion audit": by_score,
            "threshold ratio, every pair": ranked_pairs(sign * np.log2(np.clip(probs, 1e-6, 1) / thresholds[None]), mask, genres),
            "probability alone": ranked_pairs(sign * probs, mask, genres),
            "lift over base rate": ranked_pairs(sign * np.log(np.clip(probs, 1e-6, 1) / frequency[None]), mask, genres),
        }
        for name, ranked in orderings.items():
            rows[(kind, name)] = [precision_at(ranked, truth, k) for k in KS] + [len(ranked)]
        rows[(kind, "random (base rate)")] = [len(truth) / mask.sum()] * len(KS) + [mask.sum()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="labelled manifest with a 'split' column")
    parser.add_argument("--model", required=True, nargs="+", help="models trained on the manifest's train rows "
                        "(several: other seeds, each audited under every corruption)")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--splits", default="val,test")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the corruptions")
    parser.add_argument("--no-words", action="store_true", help="the model's head alone (no OCR)")
    args = parser.parse_args()

    start = time.perf_counter()
    auditors = [Auditor(Predictor(model, words=not args.no_words)) for model in args.model]
    auditor = auditors[0]
    manifest = load_manifest(args.manifest)
    split = manifest.table["split"].fillna("").str.strip().str.lower()
    print(f"| split | finding | ordering | {' | '.join(f'P@{k}' for k in KS)} | pairs ranked |")
    print("|---|---|---|" + "---|" * (len(KS) + 1))
    for name in args.splits.split(","):
        rows = np.flatnonzero(split.to_numpy() == name)
        paths = [manifest.paths[i] for i in rows]
        labels = [auditor.known(manifest.table["genre_list"].iloc[i]) for i in rows]
        runs = [one_corruption(each, paths, labels, np.asarray(each.predictor.card.train_genre_frequency, np.float64),
                               args.cache, int(seed)) for each in auditors for seed in args.seeds.split(",")]
        for key in runs[0]:
            kind, ordering = key
            cells = [mean_sd([run[key][j] for run in runs]) for j in range(len(KS))]
            count = statistics.fmean(run[key][-1] for run in runs)
            print(f"| {name} ({len(rows)} posters) | {kind} | {ordering} | {' | '.join(cells)} | {count:.0f} |")
    print(f"\n{len(args.seeds.split(','))} corruptions per split and model, models {', '.join(args.model)}, "
          f"words {'off' if args.no_words else 'on'}; {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
