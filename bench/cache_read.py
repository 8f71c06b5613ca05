"""Reading a feature cache in build order against a shuffled order: the cost must not depend on it.

    .venv/bin/python bench/cache_read.py --cache CACHE [--catalogue 100000] [--commands MANIFEST]

* lookup: every row of each store of CACHE read through :class:`posterfusion.cache.StoreLookup` in
  batches of 32, in the order the build stored them and in a seeded shuffle, both as training reads
  (no memory bound: :func:`posterfusion.features.gather`) and as a catalogue stream (the default
  bound, ``fusion predict --cache``); posters/s and the most decoded memory held.
* catalogue: the same for a synthetic store of ``--catalogue`` rows of the backbone's width
  (compacted into one part, as a build leaves it), larger than the stream's memory bound.
* commands (``--commands MANIFEST``, every poster already in CACHE): ``fusion train --mode
  fusion`` without the word model (its OCR is not a cache read), ``fusion evaluate --split test
  --no-words`` and ``fusion predict --cache --no-words``
  on MANIFEST with a split column (``fusion manifest split --seed 0``) as listed and shuffled
  (the same rows, absolute paths): seconds for each, and their ratio.

Prints one table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 32


def read_all(store, keys: list[str], memory_bytes: int | None) -> tuple[float, float]:
    """Posters/s reading ``keys`` in batches, and the most decoded MiB the lookup held."""
    from posterfusion.cache import StoreLookup

    start = time.perf_counter()
    lookup = StoreLookup(store, memory_bytes)
    peak = 0
    for lo in range(0, len(keys), BATCH):
        lookup.rows(keys[lo:lo + BATCH])
        peak = max(peak, lookup.held)
    return len(keys) / (time.perf_counter() - start), peak / 2**20


def lookup_rows(store, label: str) -> list[tuple]:
    from posterfusion.cache import StoreLookup

    built, _ = store.read()  # stored order, each key once
    shuffled = [built[i] for i in np.random.default_rng(0).permutation(len(built))]
    rows = []
    for mode, memory in (("training read (no bound)", None), (f"stream ({StoreLookup.MEMORY_BYTES >> 20} MiB bound)",
                                                               StoreLookup.MEMORY_BYTES)):
        order_rates = {}
        for order, keys in (("build", built), ("shuffled", shuffled)):
            order_rates[order] = read_all(store, keys, memory)
        (fast, fast_mb), (slow, slow_mb) = order_rates["build"], order_rates["shuffled"]
        rows.append((f"{label}, {len(built):,} rows", mode, f"{fast:,.0f}", f"{slow:,.0f}", f"{fast / slow:.2f}",
                     f"{max(fast_mb, slow_mb):.0f}"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def synthetic_store(folder: Path, rows: int, width: int):
    """A backbone store of ``rows`` random embeddings, compacted into one part as a build leaves it
    (written in parts of 1,024 rows: the row groups are the store's own either way)."""
    from posterfusion.cache import FeatureStore

    store = FeatureStore.open(folder, "backbone", {"name": "synthetic", "rows": rows}, [f"e{i}" for i in range(width)])
    rng = np.random.default_rng(0)
    for lo in range(0, rows, 1024):
        keys = [f"{i:064x}" for i in range(lo, min(lo + 1024, rows))]
        store.append(keys, keys, rng.standard_normal((len(keys), width), dtype=np.float32))
    store.compact(force=True)
    return store


def run_commands(manifest: Path, cache: Path, tmp: Path) -> list[tuple]:
    """``fusion train``/``evaluate``/``predict`` on a split manifest as listed and shuffled."""
    import pandas as pd

    fusion = [str(Path(sys.executable).parent / "fusion")]
    table = pd.read_csv(manifest)
    table["poster"] = [str((manifest.parent / p).resolve()) for p in table["poster"]]
    listed = tmp / "listed.csv"
    table.to_csv(listed, index=False)
    subprocess.run(fusion + ["manifest", "split", str(listed), "--seed", "0", "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    shuffled = tmp / "shuffled.csv"
    pd.read_csv(listed).sample(frac=1.0, random_state=0).to_csv(shuffled, index=False)
    no_words = tmp / "no-words.yaml"
    no_words.write_text("words: {enabled: false}\n")
    commands = {
        "fusion train --mode fusion (words off)": lambda m, tag: ["train", "--manifest", str(m), "--cache", str(cache),
                                                                  "--mode", "fusion", "--config", str(no_words),
                                                                  "--out", str(tmp / f"model-{tag}")],
        "fusion evaluate --split test --no-words": lambda m, tag: ["evaluate", "--manifest", str(m), "--cache",
                                                                   str(cache), "--split", "test", "--no-words",
                                                                   "--model", str(tmp / f"model-{tag}")],
        "fusion predict --cache --no-words": lambda m, tag: ["predict", "--manifest", str(m), "--cache", str(cache),
                                                             "--no-words", "--model", str(tmp / f"model-{tag}"),
                                                             "--out", str(tmp / f"predictions-{tag}.csv")],
    }
    rows = []
    for name, args in commands.items():
        seconds = {}
        for tag, m in (("listed", listed), ("shuffled", shuffled)):
            start = time.perf_counter()
            subprocess.run(fusion + args(m, tag), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds[tag] = time.perf_counter() - start
        rows.append((f"{name}, {len(table):,} posters", "end to end (s)", f"{seconds['listed']:.1f}",
                     f"{seconds['shuffled']:.1f}", f"{seconds['shuffled'] / seconds['listed']:.2f}", ""))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a built feature cache")
    parser.add_argument("--catalogue", type=int, default=100_000, help="rows of the synthetic catalogue store (0: none)")
    parser.add_argument("--commands", type=Path, default=None, help="labelled manifest whose posters CACHE holds")
    args = parser.parse_args()

    from posterfusion.cache import list_stores

    rows = []
    for store in list_stores(args.cache):
        rows += lookup_rows(store, f"{store.kind} store ({len(store.columns):,} columns)")
    with tempfile.TemporaryDirectory(prefix="posterfusion-cache-read-") as tmp:
        if args.catalogue:
            width = max((len(s.columns) for s in list_stores(args.cache) if s.kind == "backbone"), default=2560)
            rows += lookup_rows(synthetic_store(Path(tmp) / "catalogue", args.catalogue, width),
                                f"synthetic catalogue ({width:,} columns)")
        if args.commands:
            rows += run_commands(args.commands.resolve(), args.cache, Path(tmp))

    print(f"\n`{' '.join(['python', *sys.argv])}`\n")
    print("| what | read as | build order (posters/s, or s) | shuffled | shuffled slowdown | decoded MiB held |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
