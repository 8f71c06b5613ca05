"""The build on Ray against the local build: `detect-cache build` on the same posters, locally and
with `--ray local --ray-workers N` for each N, each a fresh cache in its own process.

    .venv/bin/python bench/ray_scaling.py [--posters 300] [--workers 1,2] [--batch-size 32] [--json OUT]

Prints a table: the whole command's wall time (start-up and model loading included: Ray's start,
its actors loading their models), the rate the command reports (local: over the build, models
loaded; Ray: from the pipeline's start, the actors' start-up included), and the peak memory of
the process tree (psutil where installed; `--ray local` starts Ray's processes, actors included,
as the command's descendants, so they are in it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DEFAULT_MANIFEST, cli, log, pick_posters, run_timed  # noqa: E402

RATE = re.compile(r"(\d+) done, .*?; ([\d.]+) posters/s on (.+) ->")


def build(paths_file: Path, cache: Path, batch_size: int, ray_workers: int | None) -> dict:
    args = ["build", str(paths_file), "--cache", str(cache), "--batch-size", str(batch_size)]
    if ray_workers:
        args += ["--ray", "local", "--ray-workers", str(ray_workers)]
    wall, out, peak = run_timed(cli("detect_cache_app", *args), poll_memory=True)
    done, rate, where = RATE.search(out).groups()
    return {"wall_s": wall, "done": int(done), "reported_posters_per_s": float(rate), "on": where,
            "wall_posters_per_s": int(done) / wall, "peak_pss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posters", type=int, default=300)
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--workers", default="1,2", help="Ray model workers to try, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="posterfusion-ray-bench-"))
    folder = tmp / "posters"
    folder.mkdir()
    for i, path in enumerate(pick_posters(args.manifest, args.posters)):  # a folder: what a user would pass
        os.symlink(path, folder / f"{i:05d}{Path(path).suffix}")
    runs = {}
    load = [os.getloadavg()[0]]
    for workers in [None, *[int(w) for w in args.workers.split(",") if w]]:
        name = "local build" if workers is None else f"Ray, {workers} worker{'s' * (workers > 1)}"
        log(f"{name}, {args.posters} posters ...")
        runs[name] = build(folder, tmp / f"cache-{workers or 'local'}", args.batch_size, workers)
        load.append(os.getloadavg()[0])
        log(f"  {runs[name]}")
    lines = [f"{args.posters} posters, batch {args.batch_size}, {os.cpu_count()} cores; load average "
             + " / ".join(f"{x:.2f}" for x in load) + " (before / after each run)", "",
             "| build | wall s (with start-up) | posters/s, wall | posters/s, reported | peak MiB (tree PSS) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} ({r['on']}) | {r['wall_s']:.1f} | {r['wall_posters_per_s']:.2f} | {r['reported_posters_per_s']:.2f} "
              f"| {r['peak_pss_mb']:.0f} |" for name, r in runs.items()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
