"""One `detect-cache build` for the benchmark, in its own process (run by bench/run.py).

It does what the CLI's ``detect-cache build`` does (FrozenModels -> open_stores -> build_cache)
without the progress bar, into a fresh cache folder, and prints one JSON line: throughput as the
CLI reports it (models loaded, posters/s over the build itself), the per-stage seconds the
library accounted, and this process's peak RSS. The parent polls the memory of the whole process
tree (this process and its DataLoader workers) while it runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak RSS. /proc's VmHWM, not getrusage: after fork+exec, ru_maxrss still
    counts the parent's pages that the fork shared (the benchmark's own large process)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", required=True, help="text file, one poster path a line")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    start = time.perf_counter()
    from posterfusion.defaults import DEFAULT_BACKBONE
    from posterfusion.extract import build_cache, open_stores
    from posterfusion.frozen import FrozenModels

    paths = [line for line in open(args.paths).read().splitlines() if line]
    models = FrozenModels("nanodet", DEFAULT_BACKBONE, args.device)
    loaded = time.perf_counter() - start
    summary = build_cache(paths, open_stores(models, args.cache), models, args.batch_size, args.workers)
    if models.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    from posterfusion.dataset import default_workers

    gpu = {}
    if models.device.type == "cuda":
        import torch

        gpu = {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    print(json.dumps({
        **gpu,
        "concurrent": models.concurrent,
        "workers": args.workers if args.workers is not None else default_workers(models.device),
        "posters": len(paths),
        "done": summary.done,
        "failed": summary.failed,
        "seconds": summary.seconds,
        "posters_per_s": summary.posters_per_s,
        "load_s": loaded,
        "wall_s": time.perf_counter() - start,
        "timings": models.timings,
        "maxrss_mb": peak_rss_mb(),
        "device": str(models.device),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
