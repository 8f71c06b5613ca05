"""OCR recognition with its lines batched or alone: time, and how much of the titles it reads.

    .venv/bin/python bench/ocr_batch.py [--manifest LABELS.csv] [--posters 150] [--batches 6,3,1]

rapidocr pads every line of a recognition call to the widest one's width. For each batch size this
reads the same detected lines of the same posters (spread over the manifest; one thread, as in the
pipeline) and prints recognition ms per poster (the best of ``--repeats`` passes, taken in turns
so that a busy machine slows every setting alike), the share of posters read exactly as with the
first batch size, and how many of the manifest's title words appear in what was read.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO.parent / "shared" / "data" / "movieposters" / "labels.csv"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="a manifest with a title column")
    parser.add_argument("--posters", type=int, default=150)
    parser.add_argument("--batches", default="6,3,1")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from posterfusion.detectors import text
    from posterfusion.images import decode_bytes
    from posterfusion.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    step = max(1, len(manifest.paths) // args.posters)
    chosen = list(range(0, len(manifest.paths), step))[: args.posters]
    titles = [str(manifest.table["title"].iloc[i]) for i in chosen]
    reader = text.TextReader(1)
    posters = [text.prepare(decode_bytes(Path(manifest.paths[i]).read_bytes())) for i in chosen]
    quads = [reader.detect(bgr) for bgr in posters]
    batches = [int(b) for b in args.batches.split(",")]
    best: dict[int, float] = {}
    read: dict[int, list[list[str]]] = {}
    for _ in range(args.repeats):
        for b in batches:
            reader.engine.text_rec.rec_batch_num = b
            start = time.perf_counter()
            lines = [reader.recognize(bgr, q)[0] for bgr, q in zip(posters, quads)]
            ms = (time.perf_counter() - start) * 1000 / len(posters)
            best[b] = min(best.get(b, ms), ms)
            read[b] = [[line.text for line in poster] for poster in lines]
    first = batches[0]
    n_lines = sum(min(len(q), text.MAX_LINES) for q in quads)
    print(f"{len(posters)} posters of {args.manifest.parent.name}, {n_lines} lines read "
          f"({n_lines / len(posters):.1f} a poster), one thread\n")
    print(f"| lines a recognition call | recognition ms/poster | posters read exactly as with {first} | title words found | whole titles found |")
    print("|---|---|---|---|---|")
    for b in batches:
        same = np.mean([x == y for x, y in zip(read[b], read[first])])
        docs = [" / ".join(poster) for poster in read[b]]
        recall = np.mean([len(words(t) & words(d)) / max(1, len(words(t))) for t, d in zip(titles, docs)])
        whole = np.mean([words(t) <= words(d) for t, d in zip(titles, docs)])
        print(f"| {b} | {best[b]:.0f} | {100 * same:.1f} % | {recall:.3f} | {whole:.3f} |")


if __name__ == "__main__":
    main()
