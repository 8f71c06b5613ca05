"""Write the shipped model's probabilities on a few real posters, which tests/test_shipped_model.py
pins: a change meant to keep the numbers (a refactor) must keep them; a change meant to move them
(a new model, a faster numeric path) reruns this in a commit of its own that says why.

    .venv/bin/python bench/make_shipped_pins.py --manifest ../shared/data/movieposters/labels.csv

Posters: every ``len/N``-th row of the manifest, stored by path relative to it, with the shipped
model's probabilities with its word model and without (``--no-words``), one poster per call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "shipped_probabilities.json"


def probabilities(paths: list[str], words: bool) -> list[list[float]]:
    from posterfusion.predict import Predictor

    predictor = Predictor(device="cpu", words=words)
    return [[float(p) for p in predictor.predict([path], batch_size=1)[0].probabilities.values()] for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--posters", type=int, default=4)
    args = parser.parse_args()

    table = pd.read_csv(args.manifest, dtype=str, keep_default_na=False)
    posters = table["poster"].iloc[:: len(table) // args.posters].head(args.posters).tolist()
    paths = [str(args.manifest.parent / p) for p in posters]
    from posterfusion.predict import Predictor

    genres = Predictor(device="cpu", words=False).genres
    pins = {"posters": posters, "genres": genres,
            "words": probabilities(paths, True), "no_words": probabilities(paths, False)}
    OUT.write_text(json.dumps(pins, indent=1) + "\n")
    print(f"{OUT}: {len(posters)} posters")


if __name__ == "__main__":
    main()
