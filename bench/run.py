"""Throughput benchmark: per-stage costs, the models' floor, end-to-end build, predict, train.

    .venv/bin/python bench/run.py [--posters 384] [--device cpu|cuda|auto] [--json OUT]

Everything runs through the library's own code paths (FrozenModels, build_cache, open_stores,
Predictor, the ``fusion`` CLI), on real posters (by default ../shared/data/movieposters):

* stages: median ms per poster of each model's bare forward on pre-decoded, pre-resized (and
  pre-normalised) tensors, at several batch sizes, and of the decode + resize done per poster;
* floor: the sum of the bare forwards at the best batch size, as posters/s;
* build: ``detect-cache build`` end to end (fresh cache, real DataLoader workers) in a child
  process, at two poster counts, with the peak memory of the whole process tree;
* predict: one poster warm (in process) against the sum of its models' forwards at batch 1 (and,
  for a model with a word model, warm with ``--no-words``), one poster cold (a new ``fusion
  predict`` process), and a batch of 256;
* predict memory: a catalogue run (``fusion predict --manifest LIST --out FILE.csv``) in a child
  process at two sizes (``--predict-sizes``, default 500 and 5,000), peak memory of its process tree;
* train: ``fusion train`` on a cached manifest (by default the 10,000-poster cache);
* fine-tune images/s (GPU, or ``--finetune``): backbone + head forward/backward, bf16 autocast.

Prints a table and, with ``--json``, writes the figures (keys floor_posters_per_s,
build_posters_per_s, predict_warm_ms, predict_models_ms, predict_cold_s, predict_peak_mb, help_s,
train_s, peak_mb, and the details).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO.parent / "shared" / "data" / "movieposters" / "labels.csv"
DEFAULT_TRAIN_CACHE = Path("/work/cache/gpu10k")
CLI = "import sys; from posterfusion.cli import {app}; sys.exit({app}())"


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------
# Processes: timing a command, polling a process tree's memory


def cli(app: str, *args: str) -> list[str]:
    """The console script ``app`` as ``python -c``: works where the package is only on PYTHONPATH."""
    return [sys.executable, "-c", CLI.format(app=app), *args]


def run_timed(cmd: list[str], poll_memory: bool = False) -> tuple[float, str, float]:
    """Wall seconds, stdout, and peak proportional memory (MiB) of the process tree if polled.

    Without psutil the peak is the largest child's max RSS (getrusage), not the tree's sum.
    """
    try:
        import psutil
    except ImportError:
        psutil, poll_memory = None, False
    import resource

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = [0.0]
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        info = p.memory_full_info()
                        total += getattr(info, "pss", info.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak[0] = max(peak[0], total / 2**20)
            except psutil.NoSuchProcess:
                break
            done.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True) if poll_memory else None
    if poller:
        poller.start()
    out, err = proc.communicate()
    done.set()
    if poller:
        poller.join()
    seconds = time.perf_counter() - start
    if psutil is None:
        peak[0] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, out, peak[0]


# ------------------------------------------------------------------------------------------------
# Posters


def pick_posters(manifest: Path, n: int) -> list[str]:
    """``n`` posters spread evenly over the manifest (eras differ in faces and objects)."""
    from posterfusion.manifest import load_manifest

    paths = load_manifest(manifest).paths
    if n >= len(paths):
        return paths
    step = len(paths) / n
    return [paths[int(i * step)] for i in range(n)]


def prepare_items(models, paths: list[str]) -> tuple[list, list[float]]:
    """Worker-side work (read, hash, decode, every model's resize) per poster, timed."""
    from posterfusion.dataset import PosterDataset

    dataset = PosterDataset(paths, models.detectors.preparer, models.backbone)
    items, ms = [], []
    for i in range(len(dataset)):
        start = time.perf_counter()
        item = dataset[i]
        ms.append((time.perf_counter() - start) * 1000)
        if not item.error:
            items.append(item)
    return items, ms


# ------------------------------------------------------------------------------------------------
# Bare model forwards


class Forwards:
    """The bare forward of each model on ready-made inputs (what the floor is made of)."""

    def __init__(self, models, head=None) -> None:
        import torch

        self.torch = torch
        self.models = models
        self.det = models.detectors
        self.head = head
        self.device = models.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def inputs(self, items: list) -> dict:
        """Everything the models take, already decoded, resized, normalised and on the device."""
        from posterfusion.detectors.mtcnn import detect as mtcnn_detect

        torch = self.torch
        out: dict = {"face_counts": [0] * len(items)}
        with torch.inference_mode():
            if self.det is not None:  # uint8, as the workers ship them: normalising is the model's
                out["objects"] = torch.stack([i.detector_input["objects"] for i in items]).to(self.device)
                out["canvases"] = torch.stack([i.detector_input["canvas"] for i in items]).to(self.device)
                found = mtcnn_detect(self.det.faces.mtcnn, out["canvases"])
                crops = [self.det.expressions.crop(i.detector_input["canvas"].numpy(), boxes)
                         for i, (boxes, _) in zip(items, found)]
                out["faces"] = torch.cat(crops).to(self.device)
                out["face_counts"] = [len(c) for c in crops]
            if self.models.backbone is not None:
                out["backbone"] = torch.stack([i.backbone_input for i in items]).to(self.device)
        return out

    def run(self, inputs: dict, lo: int, hi: int) -> dict[str, float]:
        """Seconds of each bare forward for posters lo..hi of ``inputs``."""
        from posterfusion.detectors.mtcnn import detect as mtcnn_detect

        torch = self.torch
        out = {}
        first = sum(inputs["face_counts"][:lo])
        n_faces = sum(inputs["face_counts"][lo:hi])
        steps = {}
        if self.det is not None:  # each model in the runtime the pipeline uses
            steps["objects"] = lambda: self.det.objects.forward(inputs["objects"][lo:hi])
            steps["faces"] = lambda: mtcnn_detect(self.det.faces.mtcnn, inputs["canvases"][lo:hi])
            steps["expressions"] = lambda: self.det.expressions.model(inputs["faces"][first:first + n_faces]) if n_faces else None
        if self.models.backbone is not None:
            steps["backbone"] = lambda: self.models.backbone.embed(inputs["backbone"][lo:hi])
        with torch.inference_mode():
            for name, step in steps.items():
                self.sync()
                start = time.perf_counter()
                step()
                self.sync()
                out[name] = time.perf_counter() - start
            if self.head is not None:  # the head as predict runs it, on feature rows
                import numpy as np

                from posterfusion.features import Features
                from posterfusion.model import predict_proba

                config = self.head.config
                cnn = np.zeros((hi - lo, self.head.cnn_dim), np.float32) if config.cnn_dim else None
                det = np.zeros((hi - lo, config.detector_dim), np.float32) if config.detector_dim else None
                self.sync()
                start = time.perf_counter()
                predict_proba(self.head, Features(cnn, det))
                self.sync()
                out["head"] = time.perf_counter() - start
        return out


def runtimes(models) -> dict[str, str]:
    out = {}
    if models.detectors is not None:
        out["objects"] = getattr(models.detectors.objects, "runtime", "torch")
        out["faces"] = getattr(models.detectors.faces, "runtime", "torch")
    if models.backbone is not None:
        out["backbone"] = models.backbone.runtime
    return out


def compare_runtimes(models, items: list, batch_sizes: list[int]) -> dict:
    """Median ms/poster of the models that run in onnxruntime, in it and in PyTorch."""
    import torch

    from posterfusion.detectors.mtcnn import detect as mtcnn_detect

    fw = Forwards(models)
    inputs = fw.inputs(items)
    det, backbone = models.detectors, models.backbone
    from posterfusion.detectors.nanodet import normalize

    pairs = {  # both from the same uint8 input, normalisation included
        "objects": (lambda x: det.objects.model(normalize(x)), lambda x: det.objects.forward(x), "objects"),
        "backbone": (lambda x: backbone.model(backbone.normalize(x)), lambda x: backbone.embed(x), "backbone"),
    }
    out: dict = {}
    with torch.inference_mode():
        for name, (torch_fn, pipeline_fn, key) in pairs.items():
            for b in batch_sizes:
                n = min(len(items), 16 if b == 1 else 4 * b)
                row = out.setdefault(f"{name} batch {b}", {})
                for runtime, fn in (("torch", torch_fn), ("onnxruntime", pipeline_fn)):
                    fn(inputs[key][:b])
                    times = []
                    for lo in range(0, n - b + 1, b):
                        start = time.perf_counter()
                        fn(inputs[key][lo:lo + b])
                        times.append((time.perf_counter() - start) * 1000 / b)
                    row[runtime] = median(times)
                log(f"  {name} batch {b}: torch {row['torch']:.1f}, onnxruntime {row['onnxruntime']:.1f} ms/poster")
    return out


def stage_table(models, items: list, batch_sizes: list[int], head=None) -> dict:
    """Median ms per poster of each bare forward, per batch size (one warm-up batch each), and
    under ``"mean_sum"`` all forwards' time over all posters: the floor's throughput. (MTCNN's
    cost grows with the faces and face-like regions in a batch, so its median batch is cheaper
    than its average one; a floor from medians would overstate what the models sustain.)"""
    fw = Forwards(models, head)
    inputs = fw.inputs(items)
    result = {}
    for b in batch_sizes:
        n = len(items) if b > 1 else min(len(items), 24)
        if b > n:
            continue
        fw.run(inputs, 0, b)  # warm-up: oneDNN/cuDNN pick and cache kernels per shape
        per = {}
        for lo in range(0, n - b + 1, b):
            for name, seconds in fw.run(inputs, lo, lo + b).items():
                per.setdefault(name, []).append(seconds * 1000 / b)
        result[b] = {name: median(v) for name, v in per.items()}
        result[b]["sum"] = sum(result[b].values())
        result[b]["mean_sum"] = sum(sum(v) / len(v) for v in per.values())
        log(f"  batch {b:>3}: " + ", ".join(f"{k} {v:.1f}" for k, v in result[b].items()) + " ms/poster")
    return result


# ------------------------------------------------------------------------------------------------
# The parts of the benchmark


def bench_help(repeats: int = 5) -> float:
    return median([run_timed(cli("fusion_app", "--help"))[0] for _ in range(repeats)])


def bench_build(paths: list[str], batch_size: int, workers: int | None, device: str, tmp: Path) -> dict:
    listing = tmp / f"paths-{len(paths)}.txt"
    listing.write_text("\n".join(paths) + "\n")
    cache = tempfile.mkdtemp(prefix="cache-", dir=tmp)
    cmd = [sys.executable, str(REPO / "bench" / "_build.py"), "--paths", str(listing), "--cache", cache,
           "--batch-size", str(batch_size), "--device", device]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    wall, out, peak = run_timed(cmd, poll_memory=True)
    result = json.loads(out.strip().splitlines()[-1])
    result.update(process_wall_s=wall, peak_pss_mb=peak)
    return result


def bench_train(manifest: Path, cache: Path, device: str, out: Path) -> dict:
    seconds, stdout, peak = run_timed(
        cli("fusion_app", "train", "--manifest", str(manifest), "--cache", str(cache), "--out", str(out), "--device", device),
        poll_memory=True,
    )
    card = json.loads((out / "card.json").read_text())
    return {"seconds": seconds, "card_seconds": card.training["seconds"], "posters": card.training["posters_used"],
            "epochs": card.training["epochs_run"], "val_map": card.validation["map"], "peak_pss_mb": peak}


def bench_predict(model_dir: Path, paths: list[str], device: str, repeats: int = 12, cold_repeats: int = 3) -> dict:
    import torch

    from posterfusion.frozen import FrozenModels
    from posterfusion.predict import Predictor

    result: dict = {}
    result["cold_s"] = median([
        run_timed(cli("fusion_app", "predict", paths[i], "--model", str(model_dir), "--device", device))[0]
        for i in range(cold_repeats)
    ])
    predictor = Predictor(model_dir, device)
    # Its models' forwards are timed as the floor's are: each on all cores, in turn.
    m = predictor.models
    fw = Forwards(FrozenModels(m.detectors.objects_name if m.detectors else None,
                               m.backbone.name if m.backbone else None, device, concurrent=False,
                               backbone_view=predictor.card.config.get("backbone_view")), predictor.head)
    for p in paths[:2]:
        predictor.predict([p])  # warm-up
    warm, bare = [], []
    from posterfusion.dataset import PosterDataset

    detectors = predictor.models.detectors
    dataset = PosterDataset(paths, detectors.preparer if detectors else None, predictor.models.backbone)
    for i in range(repeats):
        path = paths[2 + i]
        fw.sync()
        start = time.perf_counter()
        predictor.predict([path])
        fw.sync()
        warm.append((time.perf_counter() - start) * 1000)
        inputs = fw.inputs([dataset[2 + i]])
        bare.append(sum(fw.run(inputs, 0, 1).values()) * 1000)
    result["warm_ms"], result["models_ms"] = median(warm), median(bare)
    if predictor.words is not None:  # the same posters without the word model (and its OCR): predict --no-words
        head_only = Predictor(model_dir, device, words=False)
        head_only.predict([paths[0]])
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            head_only.predict([paths[2 + i]])
            times.append((time.perf_counter() - start) * 1000)
        result["warm_no_words_ms"] = median(times)
    batch = paths[: min(256, len(paths))]
    start = time.perf_counter()
    predictor.predict(batch)
    fw.sync()
    result["batch_posters"] = len(batch)
    result["batch_s"] = time.perf_counter() - start
    return result


def bench_predict_memory(model_dir: Path, paths: list[str], sizes: list[int], batch_size: int, device: str,
                         tmp: Path) -> dict:
    """``fusion predict --manifest LIST --out FILE.csv`` (a catalogue run) in a child process per
    size, with the peak memory of its process tree: flat across sizes when nothing accumulates."""
    runs = {}
    for n in sizes:
        listing = tmp / f"predict-{n}.txt"
        listing.write_text("\n".join(paths[:n]) + "\n")
        out = tmp / f"predict-{n}.csv"
        log(f"fusion predict --out, {n} posters ...")
        wall, _, peak = run_timed(cli("fusion_app", "predict", "--manifest", str(listing), "--model", str(model_dir),
                                      "--out", str(out), "--batch-size", str(batch_size), "--device", device),
                                  poll_memory=True)
        rows = len(out.read_text().splitlines()) - 1
        runs[str(n)] = {"posters": n, "rows": rows, "seconds": wall, "posters_per_s": n / wall, "peak_pss_mb": peak}
        log(f"  {rows} rows, {n / wall:.2f} posters/s (model load included), peak {peak:.0f} MiB (tree PSS)")
    return runs


def bench_finetune(models, items: list, steps: int, batch: int = 64) -> float:
    """Images/s of backbone + head forward and backward (bf16 autocast on a GPU)."""
    import torch

    device = models.device
    backbone = models.backbone
    head = torch.nn.Linear(backbone.dim, 25).to(device)
    backbone.model.train()
    params = list(backbone.model.parameters()) + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.stack([items[i % len(items)].backbone_input for i in range(batch)]).to(device)
    target = (torch.rand(batch, 25, device=device) > 0.8).float()
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = head(backbone.embed(images).float())
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    backbone.model.eval()
    for p in params:
        p.requires_grad_(False)
    return rate


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posters", type=int, default=384, help="posters in the end-to-end build (default 384)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="manifest of real posters")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="build batch size (default 32 on CPU, 128 on a GPU)")
    parser.add_argument("--workers", type=int, default=None, help="build decoding workers (default: the library's)")
    parser.add_argument("--stage-posters", type=int, default=None, help="posters for the stage table and floor (default 256 CPU, 512 GPU)")
    parser.add_argument("--train-manifest", type=Path, default=None, help="labelled manifest for fusion train (default --manifest)")
    parser.add_argument("--train-cache", type=Path, default=None,
                        help="its feature cache (default /work/cache/gpu10k for the default manifest, else the build's)")
    parser.add_argument("--model", type=Path, default=None, help="model folder for predict (default: the one trained here)")
    parser.add_argument("--finetune", action="store_true", help="also measure fine-tune images/s (always on a GPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: help,stages,build,train,predict,predict_memory,finetune")
    parser.add_argument("--predict-sizes", default="500,5000", help="posters per `fusion predict --out` run whose peak memory is measured")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON (after every part)")
    parser.add_argument("--sweep-workers", default="", help="also build --posters with these worker counts, e.g. 4,8,12")
    args = parser.parse_args()

    import torch

    from posterfusion.defaults import DEFAULT_BACKBONE
    from posterfusion.frozen import FrozenModels, resolve_device

    skip = {s for s in args.skip.split(",") if s}
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batch_size = args.batch_size or (128 if gpu else 32)
    stage_posters = args.stage_posters or (512 if gpu else 256)
    tmp = Path(tempfile.mkdtemp(prefix="posterfusion-bench-"))
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "batch_size": batch_size,
        "posters": args.posters,
        "stage_posters": stage_posters,
    }
    log(f"device {report['device']}, torch {torch.__version__}, {report['torch_threads']} threads, "
        f"load average {report['load_before'][0]:.2f}")

    report["errors"] = {}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    def attempt(part: str, fn) -> None:
        """Run one part; a failure is reported and the other parts still run."""
        if part in skip:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            report["errors"][part] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            log(f"{part} failed: {report['errors'][part]}")
        save()  # a run cut short still leaves what it measured

    def do_help() -> None:
        report["help_s"] = bench_help(3 if gpu else 5)
        log(f"fusion --help: {report['help_s']:.2f} s")

    attempt("help", do_help)

    train_manifest = args.train_manifest or args.manifest
    model_dir = args.model

    def do_train() -> None:
        nonlocal model_dir
        cache = args.train_cache or (DEFAULT_TRAIN_CACHE if train_manifest == DEFAULT_MANIFEST and DEFAULT_TRAIN_CACHE.is_dir() else None)
        if cache is None:  # build the train manifest's cache first (e.g. on the GPU machine)
            log(f"building the cache for {train_manifest} ...")
            cache = tmp / "train-cache"
            seconds, out, _ = run_timed(cli("detect_cache_app", "build", str(train_manifest), "--cache", str(cache),
                                            "--batch-size", str(batch_size), "--device", str(device)))
            report["train_cache_build"] = {"seconds": seconds, "output": out.strip().splitlines()[-1:]}
            log(f"  {seconds:.1f} s: {out.strip().splitlines()[-1:]}")
        log(f"fusion train on {cache} ...")
        report["train"] = bench_train(train_manifest, cache, str(device), tmp / "model")
        report["train_s"] = report["train"]["seconds"]
        model_dir = model_dir or tmp / "model"
        log(f"  {report['train_s']:.1f} s ({report['train']['posters']} posters, {report['train']['epochs']} epochs)")

    attempt("train", do_train)

    predict_sizes = [int(n) for n in args.predict_sizes.split(",") if n]
    paths = pick_posters(args.manifest, max(args.posters, stage_posters, 256 + 16, *predict_sizes))
    # The floor: every model on all cores in turn (each at its fastest), not the build's
    # side-by-side stages.
    models = FrozenModels("nanodet", DEFAULT_BACKBONE, str(device), concurrent=False)
    # The floor's posters spread over the largest build's, so that both see the same mix of eras
    # (MTCNN's cost follows the faces and face-like regions a poster holds).
    build_paths = paths[: max(args.posters, stage_posters)]
    stage_paths = build_paths[:: max(1, len(build_paths) // stage_posters)][:stage_posters]
    items, prep_ms = prepare_items(models, stage_paths)
    report["decode_resize_ms"] = median(prep_ms)
    head = None
    if model_dir is not None:
        from posterfusion.model import load_model

        try:
            head = load_model(model_dir)[0].to(device)
        except Exception as exc:  # the head is the smallest stage: measure the rest regardless
            log(f"(head not measured: {exc})")
    def do_stages() -> None:
        log(f"bare forwards on {len(items)} prepared posters ({runtimes(models)}):")
        sizes = [1, 8, 32, 64] if not gpu else [1, 32, 128, 256]
        report["runtimes"] = runtimes(models)
        report["stages"] = {str(b): v for b, v in stage_table(models, items, sizes, head).items()}
        best = min(report["stages"], key=lambda b: report["stages"][b]["mean_sum"])
        report["floor_batch"] = int(best)
        report["floor_posters_per_s"] = 1000 / report["stages"][best]["mean_sum"]
        if not gpu:
            report["runtime_comparison"] = compare_runtimes(models, items, [1, int(best)])

    def do_finetune() -> None:
        if gpu or args.finetune:
            report["finetune_images_per_s"] = bench_finetune(models, items, steps=20 if gpu else 3)
            log(f"fine-tune: {report['finetune_images_per_s']:.0f} images/s")

    attempt("stages", do_stages)
    attempt("finetune", do_finetune)
    del models, items

    def do_build() -> None:
        runs = {}
        for n in sorted({max(args.posters // 4, batch_size), args.posters}):
            log(f"detect-cache build, {n} posters ...")
            runs[n] = bench_build(paths[:n], batch_size, args.workers, str(device), tmp)
            log(f"  {runs[n]['posters_per_s']:.2f} posters/s, peak {runs[n]['peak_pss_mb']:.0f} MiB (tree PSS)")
        report["build_runs"] = {str(n): r for n, r in runs.items()}
        big = runs[max(runs)]
        report["build_posters_per_s"] = big["posters_per_s"]
        report["peak_mb"] = max(r["peak_pss_mb"] for r in runs.values())
        if "floor_posters_per_s" in report:
            report["floor_ratio"] = report["build_posters_per_s"] / report["floor_posters_per_s"]

    def do_predict() -> None:
        if model_dir is None:
            raise RuntimeError("no model: train one (drop --skip train) or pass --model")
        log("fusion predict ...")
        report["predict"] = bench_predict(model_dir, paths, str(device), cold_repeats=2 if gpu else 3)
        report["predict_warm_ms"] = report["predict"]["warm_ms"]
        report["predict_models_ms"] = report["predict"]["models_ms"]
        report["predict_cold_s"] = report["predict"]["cold_s"]

    def do_predict_memory() -> None:
        if model_dir is None:
            raise RuntimeError("no model: train one (drop --skip train) or pass --model")
        report["predict_memory"] = bench_predict_memory(model_dir, paths, predict_sizes, batch_size, str(device), tmp)
        report["predict_peak_mb"] = {n: run["peak_pss_mb"] for n, run in report["predict_memory"].items()}

    def do_sweep() -> None:
        for w in [int(x) for x in args.sweep_workers.split(",") if x]:
            log(f"detect-cache build, {args.posters} posters, {w} workers ...")
            run = bench_build(paths[: args.posters], batch_size, w, str(device), tmp)
            report.setdefault("worker_sweep", {})[str(w)] = run
            stages = ", ".join(f"{k} {v / run['done'] * 1000:.2f}" for k, v in run["timings"].items())
            log(f"  {run['posters_per_s']:.1f} posters/s (main ms/poster: {stages})")

    attempt("build", do_build)
    attempt("predict", do_predict)
    attempt("predict_memory", do_predict_memory)
    attempt("sweep", do_sweep)

    report["load_after"] = os.getloadavg()
    save()
    print(format_table(report))


def format_table(r: dict) -> str:
    lines = [f"posterfusion benchmark: {r['device']}, {r['torch_threads']} torch threads, "
             f"load average {r['load_before'][0]:.2f} before / {r['load_after'][0]:.2f} after",
             f"command: {r['command']}", ""]
    if "stages" in r:
        sizes = list(r["stages"])
        names = [n for n in ("objects", "faces", "expressions", "backbone", "head") if n in r["stages"][sizes[0]]]
        label = {"objects": "object detector (NanoDet)", "faces": "face detector (MTCNN)",
                 "expressions": "expression model", "backbone": "CNN embedding (the backbone)", "head": "head (MLP)"}
        lines.append("| stage, median ms/poster | " + " | ".join(f"batch {b}" for b in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        lines.append(f"| decode + resize (per poster, one worker) | {r['decode_resize_ms']:.1f} |" + " |" * (len(sizes) - 1))
        for n in names:
            lines.append(f"| {label[n]} | " + " | ".join(f"{r['stages'][b][n]:.1f}" for b in sizes) + " |")
        lines.append("| **sum of bare forwards** | " + " | ".join(f"**{r['stages'][b]['sum']:.1f}**" for b in sizes) + " |")
        lines.append("| sum of mean ms/poster (the floor) | " + " | ".join(f"{r['stages'][b].get('mean_sum', r['stages'][b]['sum']):.1f}" for b in sizes) + " |")
        lines.append("")
    if r.get("runtime_comparison"):
        lines.append("| PyTorch vs onnxruntime, median ms/poster | PyTorch | onnxruntime |")
        lines.append("|---|---:|---:|")
        for name, row in r["runtime_comparison"].items():
            lines.append(f"| {name} | {row['torch']:.1f} | {row['onnxruntime']:.1f} |")
        lines.append("")
    rows = []
    if r.get("runtimes"):
        rows.append(("runtimes", ", ".join(f"{k}: {v}" for k, v in r["runtimes"].items())))
    if "floor_posters_per_s" in r:
        rows.append((f"floor (bare forwards, mean over {r.get('stage_posters', '?')} posters, batch {r['floor_batch']})",
                     f"{r['floor_posters_per_s']:.2f} posters/s"))
    if "build_posters_per_s" in r:
        runs = r["build_runs"]
        big = runs[max(runs, key=int)]
        rows.append((f"detect-cache build, end to end ({big['posters']} posters, batch {r['batch_size']})",
                     f"{r['build_posters_per_s']:.2f} posters/s"))
        if "floor_ratio" in r:
            rows.append(("floor / end-to-end", f"{r['floor_ratio']:.0%} (overhead {1 - r['floor_ratio']:.0%})"))
        stages = ", ".join(f"{k} {v / big['done'] * 1000:.1f}" for k, v in big["timings"].items())
        where = ("stage ms/poster (objects+backbone ran beside faces+expressions, 1 thread each per 2 cores)"
                 if big.get("concurrent") else "main-process ms/poster")
        rows.append((f"  build, {where}", stages))
        for n, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
            gpu = f"; GPU {run['gpu_peak_mb']:.0f} MiB" if "gpu_peak_mb" in run else ""
            rows.append((f"peak memory, build of {n} posters ({run.get('workers', '?')} workers)",
                         f"{run['peak_pss_mb']:.0f} MiB (process tree PSS; main peak RSS {run['maxrss_mb']:.0f} MiB{gpu})"))
    for w, run in r.get("worker_sweep", {}).items():
        stages = ", ".join(f"{k} {v / run['done'] * 1000:.2f}" for k, v in run["timings"].items())
        rows.append((f"build with {w} workers", f"{run['posters_per_s']:.1f} posters/s (main ms/poster: {stages})"))
    if "predict" in r:
        p = r["predict"]
        rows.append(("fusion predict, 1 poster warm", f"{p['warm_ms']:.0f} ms (its models' forwards: {p['models_ms']:.0f} ms, x{p['warm_ms'] / p['models_ms']:.2f})"))
        if "warm_no_words_ms" in p:
            rows.append(("  the same, --no-words (no OCR, no word model)", f"{p['warm_no_words_ms']:.0f} ms"))
        rows.append(("fusion predict, 1 poster cold (new process)", f"{p['cold_s']:.2f} s"))
        rows.append((f"fusion predict, batch of {p['batch_posters']}", f"{p['batch_s']:.1f} s ({p['batch_posters'] / p['batch_s']:.2f} posters/s)"))
    for n, run in sorted(r.get("predict_memory", {}).items(), key=lambda kv: int(kv[0])):
        rows.append((f"peak memory, fusion predict --out over {n} posters",
                     f"{run['peak_pss_mb']:.0f} MiB (process tree PSS; {run['posters_per_s']:.2f} posters/s with model loading)"))
    if "help_s" in r:
        rows.append(("fusion --help", f"{r['help_s']:.2f} s"))
    if "train" in r:
        t = r["train"]
        rows.append((f"fusion train ({t['posters']} cached posters, {t['epochs']} epochs)", f"{t['seconds']:.1f} s (peak {t['peak_pss_mb']:.0f} MiB)"))
    if "finetune_images_per_s" in r:
        rows.append(("fine-tune (backbone + head, batch 64, fwd+bwd)", f"{r['finetune_images_per_s']:.0f} images/s"))
    for part, error in r.get("errors", {}).items():
        rows.append((f"{part}: FAILED", error.splitlines()[-1][:200] if error else ""))
    lines.append("| measure | value |")
    lines.append("|---|---|")
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
