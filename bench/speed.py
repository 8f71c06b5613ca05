"""Where a poster's time goes, and this tree against an earlier release, printed in one run.

    .venv/bin/python bench/speed.py [--baseline REV ...] [--posters 64] [--json OUT]

Two tables, on real posters (by default ../shared/data/movieposters, spread over the manifest):

* **stages**: each stage of the shipped model alone, on one thread (what the pipeline gives each
  model on 2 cores), in ms per poster, for a lone poster (``fusion predict`` of one file) and in
  32-poster batches (a build, where MTCNN takes the whole batch), with each stage's share of the
  sum: decoding, NanoDet, MTCNN, the expression model, each backbone network on the poster (and on
  its mirror image where the view flips), OCR detection, OCR recognition (and per line read), the head, the word model.
* **end to end**, for this tree and for each ``--baseline`` (a git revision, checked out into a
  temporary folder with ``git archive``; the ratio column is this tree against the first), each in its own process, one after the other on the same
  cores: warm ``fusion predict`` of one poster with and without the word model, predict over a
  list of posters (models loaded, start-up excluded), ``detect-cache build`` into a fresh cache
  without and with OCR, and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _build import peak_rss_mb  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO.parent / "shared" / "data" / "movieposters" / "labels.csv"
BUILD_BATCH = 32


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def spread(manifest: Path, n: int, offset: int = 0) -> list[str]:
    """``n`` posters spread evenly over the manifest (eras differ in faces, objects and text)."""
    from posterfusion.manifest import load_manifest

    paths = load_manifest(manifest).paths
    step = max(1, len(paths) // n)
    return [paths[(offset + i * step) % len(paths)] for i in range(n)]


def clock(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000, result


# ------------------------------------------------------------------------------------------------
# Stages, one thread each


def stage_profile(paths: list[str]) -> dict[str, dict[str, float]]:
    """ms per poster of each stage, for a lone poster and in 32-poster batches."""
    import numpy as np
    import torch

    torch.set_num_threads(1)  # before the models: their onnxruntime sessions take PyTorch's count
    from posterfusion.backbone import create_backbone
    from posterfusion.dataset import PosterDataset
    from posterfusion.features import Features
    from posterfusion.frozen import create_frozen_models
    from posterfusion.model import predict_proba
    from posterfusion.predict import Predictor
    from posterfusion.detectors.text import MAX_LINES

    predictor = Predictor(words=True)
    config = predictor.card.config
    models = create_frozen_models(objects=config["objects"], backbone=None, device="cpu", text=True, concurrent=False)
    det, reader = models.detectors, models.text
    members = {name: create_backbone(name, view=config["backbone_view"], lazy=True).use_onnxruntime(1)
               for name in config["backbone"].split("+")}
    dataset = PosterDataset(paths, det.preparer, next(iter(members.values())), read_text=True)
    times: dict[str, dict[str, list[float]]] = {}
    lines_read = []

    def add(kind: str, stage: str, ms: float) -> None:
        times.setdefault(stage, {}).setdefault(kind, []).append(ms)

    def run(kind: str, items: list) -> None:
        n = len(items)
        prepared = [i.detector_input for i in items]
        add(kind, "NanoDet (objects)", clock(lambda: det.detect_objects(prepared, batch=1))[0] / n)
        ms, found = clock(lambda: det.faces.detect(torch.stack([p["canvas"] for p in prepared])))
        add(kind, "MTCNN (faces)", ms / n)
        crops = [det.expressions.crop(p["canvas"].numpy(), boxes) for p, (boxes, _) in zip(prepared, found)]
        add(kind, "expression model", clock(lambda: det.expressions.classify(crops))[0] / n)
        for name, backbone in members.items():
            for view, flip in (("poster", False), ("mirror image", True))[: 1 + backbone.flip]:
                ms = sum(clock(lambda: backbone.embed_image(i.backbone_input[None].flip(-1) if flip else i.backbone_input[None]))[0]
                         for i in items)
                add(kind, f"{name}, {view}", ms / n)
        detect = read = 0.0
        for item in items:
            ms, quads = clock(lambda: reader.detect(item.text_input))
            detect += ms
            read += clock(lambda: reader.recognize(item.text_input, quads))[0]
            if kind == "lone poster":
                lines_read.append(min(len(quads), MAX_LINES))
        add(kind, "OCR detection", detect / n)
        add(kind, "OCR recognition", read / n)
        head = predictor.head
        features = Features(np.zeros((n, head.cnn_dim), np.float32) if head.config.cnn_dim else None,
                            np.zeros((n, head.config.detector_dim), np.float32) if head.config.detector_dim else None)
        ms, probs = clock(lambda: predict_proba(head, features))
        add(kind, "head", ms / n)
        add(kind, "word model", clock(lambda: predictor.words.mix(probs, ["the night of the living dead"] * n))[0] / n)

    with torch.inference_mode():
        items, decode = [], []
        for i in range(len(dataset)):
            ms, item = clock(lambda: dataset[i])
            if not item.error:
                items.append(item)
                decode.append(ms)
        run("lone poster", items[:1])  # warm-up: first calls pick kernels
        times.clear()
        lines_read.clear()
        times["read, decode, resize"] = {"lone poster": decode, "32-poster batch": decode}
        for item in items:
            run("lone poster", [item])
        for s in range(0, len(items) - BUILD_BATCH + 1, BUILD_BATCH):
            run("32-poster batch", items[s : s + BUILD_BATCH])
    means = {stage: {kind: statistics.mean(v) for kind, v in kinds.items()} for stage, kinds in times.items()}
    means["_lines"] = {"per poster": statistics.mean(lines_read) if lines_read else 0.0}
    return means


def stage_table(profile: dict[str, dict[str, float]]) -> str:
    kinds = ["lone poster", "32-poster batch"]
    stages = {k: v for k, v in profile.items() if not k.startswith("_")}
    totals = {kind: sum(v.get(kind, 0.0) for v in stages.values()) for kind in kinds}
    lines = profile["_lines"]["per poster"]
    rows = ["| stage (one thread) | lone poster: ms | share | in a 32-poster batch: ms/poster | share |",
            "|---|---|---|---|---|"]
    for stage, v in stages.items():
        name = stage
        if stage == "OCR recognition" and lines:
            name = f"OCR recognition ({lines:.1f} lines a poster, {v['lone poster'] / lines:.0f} ms a line)"
        rows.append(f"| {name} | " + " | ".join(f"{v.get(k, 0.0):.1f} | {100 * v.get(k, 0.0) / totals[k]:.0f} %" for k in kinds) + " |")
    rows.append("| **all stages, one core** | " + " | ".join(f"**{totals[k]:.0f}** | 100 %" for k in kinds) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# End to end, one tree in its own process


def measure(paths: list[str], single: list[str], build: list[str], model: Path) -> dict[str, float]:
    """The tree on PYTHONPATH with its shipped ``model``: warm predicts, a list predict, two builds."""
    from posterfusion.extract import build_cache, open_stores
    from posterfusion.frozen import create_frozen_models
    from posterfusion.predict import Predictor

    out: dict[str, float] = {}
    for words in (True, False):
        predictor = Predictor(model, words=words)
        predictor.predict(single[:2])  # warm-up
        ms = [clock(lambda: predictor.predict([p]))[0] for p in single]
        out["warm_ms" if words else "warm_no_words_ms"] = statistics.median(ms)
        if words:
            ms, _ = clock(lambda: predictor.predict(paths))
            out["list_posters_per_s"] = len(paths) / (ms / 1000)
        del predictor
    for text in (False, True):
        config = Predictor(model, words=True).card.config
        models = create_frozen_models(objects=config["objects"], backbone=config["backbone"],
                                      backbone_view=config["backbone_view"], device="cpu", text=text)
        with tempfile.TemporaryDirectory() as cache:
            summary = build_cache(build, open_stores(models, cache), models, BUILD_BATCH, None)
        out["build_text_posters_per_s" if text else "build_posters_per_s"] = summary.posters_per_s
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_tree(src: Path, args: argparse.Namespace) -> dict[str, float]:
    """``measure`` in a child process with ``src`` first on PYTHONPATH."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        env = os.environ | {"PYTHONPATH": str(src)}
        cmd = [sys.executable, __file__, "--measure", result.name, "--manifest", str(args.manifest),
               "--posters", str(args.posters), "--model", str(src.parent / "weights" / "default_model")]
        subprocess.run(cmd, env=env, check=True, cwd=src.parent)
        return json.loads(Path(result.name).read_text())


def export_revision(rev: str, into: Path) -> Path:
    """The revision's ``src`` (and what its package reads beside it) in ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src", "weights", "configs"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def end_to_end_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    rows = [("warm `fusion predict`, one poster (ms)", "warm_ms", "{:.0f}", -1),
            ("the same, `--no-words` (ms)", "warm_no_words_ms", "{:.0f}", -1),
            ("predict over a list, models loaded (posters/s)", "list_posters_per_s", "{:.2f}", 1),
            ("`detect-cache build` (posters/s)", "build_posters_per_s", "{:.2f}", 1),
            ("`detect-cache build --text` (posters/s)", "build_text_posters_per_s", "{:.2f}", 1),
            ("peak RSS of the process (MB)", "peak_rss_mb", "{:.0f}", -1)]
    out = ["| | " + " | ".join(names) + (f" | {names[-1]} against {names[0]} |" if len(names) > 1 else " |"),
           "|---" * (len(names) + 1 + (len(names) > 1)) + "|"]
    for label, key, fmt, better in rows:
        cells = [fmt.format(results[n][key]) for n in names]
        if len(names) > 1:
            ratio = results[names[-1]][key] / results[names[0]][key]
            cells.append(f"{ratio if better > 0 else 1 / ratio:.2f}x " + ("less" if key == "peak_rss_mb" else "as fast"))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--posters", type=int, default=64, help="posters per measurement")
    parser.add_argument("--baseline", action="append", default=[],
                        help="git revision to measure beside this tree (repeatable; the ratios are against the first)")
    parser.add_argument("--no-stages", action="store_true", help="skip the stage table")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: write measure()'s JSON here
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)  # child mode: the tree's shipped model
    args = parser.parse_args()

    paths = spread(args.manifest, args.posters)
    if args.measure:
        import posterfusion

        here = Path(posterfusion.__file__).resolve()
        assert here.is_relative_to(Path(os.environ["PYTHONPATH"]).resolve()), f"measuring {here}, not PYTHONPATH's tree"
        single = spread(args.manifest, 14, offset=7)
        build = spread(args.manifest, args.posters, offset=3)
        Path(args.measure).write_text(json.dumps(measure(paths, single, build, args.model)))
        return
    report: dict = {"posters": args.posters, "cpu": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if not args.no_stages:
        log("stages ...")
        report["stages"] = stage_profile(paths)  # one thread here; the trees below run in their own processes
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.baseline:
            log(f"end to end, {rev} ...")
            results[rev] = run_tree(export_revision(rev, Path(tmp) / rev), args)
        log("end to end, this tree ...")
        results["this tree"] = run_tree(REPO / "src", args)
    report["end_to_end"] = results
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.posters} posters from {args.manifest.parent.name}, {os.cpu_count()} cores, {report['date']}\n")
    if "stages" in report:
        print(stage_table(report["stages"]) + "\n")
    print(end_to_end_table(results))


if __name__ == "__main__":
    main()
