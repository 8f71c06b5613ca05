"""The command line: a thin typer layer over the library.

Heavy imports (torch, pandas, the models) happen inside the commands so that ``--help`` is instant.
User mistakes arrive as :class:`PosterFusionError` and leave as one line on stderr, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import typer

from .defaults import DEFAULT_BACKBONE, DEFAULT_VIEW
from .errors import PosterFusionError, user_errors
from .manifest_cli import manifest_app

detect_cache_app = typer.Typer(
    help="Precompute frozen detector features and CNN embeddings for posters into a cache.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
fusion_app = typer.Typer(
    help="Train, run and evaluate the poster genre model (CNN fused with detector features).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

fusion_app.add_typer(manifest_app, name="manifest")

DEFAULT_CACHE = Path("posterfusion-cache")


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _RichProgress:
    """A progress bar that prints failures above itself as they happen."""

    def __init__(self, total: int | None, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=_console())
        self.task = self.bar.add_task(description, total=total, rate="")
        self.start = None

    def __enter__(self) -> "_RichProgress":
        import time

        self.start = time.perf_counter()
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        import time

        done = self.bar.tasks[0].completed + n
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:.1f} posters/s")

    def failure(self, path: str, reason: str) -> None:
        # soft_wrap: one line per failure even when the path is wider than the terminal
        self.bar.console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)


@detect_cache_app.command("build")
@user_errors
def build(
    source: Path = typer.Argument(..., help="Manifest CSV (poster, genres) or a folder of images."),
    cache: str = typer.Option(str(DEFAULT_CACHE), "--cache",
                              help="Cache folder (created if new); with --ray also a URI: s3://, gs://, hdfs://..."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N posters."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Posters per model batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    objects: str = typer.Option("nanodet", "--objects", help="Object detector: nanodet, or yolo:PATH to a local .pt/.onnx."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone",
                                 help="CNN whose embeddings are cached too (several joined with '+'), or 'none'."),
    view: str = typer.Option(DEFAULT_VIEW, "--view", help="The CNN's input: WIDTHxHEIGHT, +flip to average in the mirror image."),
    text: bool = typer.Option(False, "--text", help="Also read text off the posters (OCR; ~3x the build's cost)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Decoding workers (default: spare cores); with --ray, decoding tasks in flight."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="Run on Ray: local (start one here), auto (the running one), HOST:PORT or ray://HOST:PORT."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", min=1,
                                              help="With --ray: model actors (default: one per GPU, else per CPU)."),
) -> None:
    """Build (or complete) the feature cache for a manifest or a folder of posters."""
    from .cache import is_uri
    from .manifest import load_manifest

    if is_uri(cache) and ray is None:
        raise PosterFusionError(f"--cache {cache}: a URI needs --ray; give a local folder")
    manifest = load_manifest(source).head(limit)
    backbone_name = None if backbone == "none" else backbone
    if ray is not None:
        from .ray_build import RayBuild

        with RayBuild(cache, ray, objects, backbone_name, view, text, device, ray_workers, workers) as on_ray:
            with _RichProgress(len(manifest), "detect-cache") as progress:
                summary = on_ray.run(manifest.paths, batch_size, progress)
        where = str(on_ray)
    else:
        from . import extract, frozen

        models = frozen.create_frozen_models(objects=objects, backbone=backbone_name, device=device,
                                              backbone_view=view, text=text)
        with _RichProgress(len(manifest), "detect-cache") as progress:
            summary = extract.build_cache(manifest.paths, extract.open_stores(models, cache), models, batch_size,
                                          workers, progress)
        where = models.device
    typer.echo(
        f"{len(manifest)} posters: {summary.done} done, {summary.cached} cached, {summary.skipped} skipped "
        f"(duplicates), {summary.failed} failed; {summary.posters_per_s:.1f} posters/s on {where} -> {cache}"
    )


@detect_cache_app.command("info")
@user_errors
def info(
    cache: Path = typer.Option(DEFAULT_CACHE, "--cache", help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for programs."),
) -> None:
    """Say what a cache holds: posters, the models' identities, the feature columns."""
    from .cache import describe_cache

    report = describe_cache(cache)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{cache}: {report['posters']} posters with detector features, schema {report['schema_version']}")
    for store in report["stores"]:
        typer.echo(f"  {store['kind']:<9} {store['posters']:>7} rows  {store['folder']}  {store['summary']}")


@fusion_app.command("train")
@user_errors
def train_command(
    manifest: Path = typer.Option(..., "--manifest", help="Labelled manifest CSV (poster, genres[, split])."),
    cache: Path = typer.Option(DEFAULT_CACHE, "--cache", help="Feature cache; missing rows are computed."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (defaults: configs/default.yaml)."),
    out: Path = typer.Option(Path("runs/model"), "--out", help="Folder for model.safetensors and card.json."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Override the config: fusion, cnn or detectors."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the config's seed."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Train the fusion head on cached features and save the model with its card.

    A fine-tune runs on several processes under torchrun (one per GPU):
    torchrun --nproc-per-node N $(which fusion) train ... ; rank 0 reports and writes the model.
    """
    from . import distributed
    from .config import load_config
    from .files import check_writable_folder
    from .train import train

    overrides = {k: v for k, v in (("mode", mode), ("seed", seed)) if v is not None}
    settings = load_config(config, overrides)
    check_writable_folder(out, "--out")
    if distributed.launched_world() > 1 and not settings["finetune"]["enabled"]:
        raise PosterFusionError("torchrun: only a fine-tune runs on several processes (finetune.enabled: true "
                                "in --config); train heads with a plain 'fusion train'")
    console = _console()

    def on_epoch(epoch: int, loss: float, val_map: float) -> None:
        console.print(f"epoch {epoch:3d}  loss {loss:.4f}  val mAP {val_map:.4f}", highlight=False)

    with distributed.session(device) as device:
        main = distributed.is_main()
        with _RichProgress(None, "features") if main else contextlib.nullcontext() as progress:
            card = train(manifest, cache, settings, out, device, progress, on_epoch if main else None)
    if card is None:  # a torchrun rank other than 0
        return
    v, t = card.validation, card.training
    typer.echo(
        f"trained {settings['mode']} on {t['train_posters']} posters (best epochs {t['best_epoch']} of {t['epochs_run']}, "
        f"{t['seconds']:.0f} s): val mAP {v['map']:.3f} (prior {v['prior_map']:.3f}), micro-F1 {v['micro_f1']:.3f}, "
        f"macro-F1 {v['macro_f1']:.3f}, top-n {v['top_n_accuracy']:.3f} -> {out}"
    )
    words = card.words
    if words and words["fitted"]:
        learnt = " and ".join({"title": "the titles", "ocr": "the training posters' text"}[k] for k in words["fitted_on"])
        typer.echo(f"word model: {words['vocabulary']} terms from {learnt}, weight {min(words['weight']):.2f}-"
                   f"{max(words['weight']):.2f} by genre "
                   f"(val mAP {words['val_map_head']:.3f} without it, {words['val_map_mixed']:.3f} with it)")
    elif words:
        typer.echo(f"no word model: {words['why']}")


class _FailureReport:
    """``fusion predict``'s and ``fusion audit``'s stderr: the progress bar where there is one, and each unreadable
    poster's one-line report, printed above the bar so neither garbles the other."""

    def __init__(self, bar: _RichProgress | None) -> None:
        self.bar = bar
        self.failed = 0

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(n)

    def failure(self, path: str, reason: str) -> None:
        self.failed += 1
        if self.bar is not None:
            self.bar.bar.console.print(f"{path}: skipped: {reason}", highlight=False, markup=False, soft_wrap=True)
        else:
            typer.echo(f"{path}: skipped: {reason}", err=True)


@fusion_app.command("predict")
@user_errors
def predict_command(
    posters: Optional[list[Path]] = typer.Argument(None, help="Poster files and/or folders of posters."),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="More posters: a manifest CSV, a text file of paths one per line, or - for standard input."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Read/extend this feature cache instead of computing in memory."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Probabilities shown per poster."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines for programs."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV for programs."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write results to this .csv, .jsonl or .parquet file as they come; a rerun skips the posters already in it."),
    show_progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar on stderr (default: when stderr is a terminal)."),
    annotate: Optional[Path] = typer.Option(None, "--annotate", help="Write an annotated PNG per poster into this folder (boxes, heat map, genre bars); --json then carries the explanation."),
    samples: bool = typer.Option(False, "--samples", help="Predict the sample images shipped with installed packages."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    objects: Optional[str] = typer.Option(None, "--objects", help="The model's object detector file, yolo:PATH, where its card names one (a card alone never makes posterfusion load a file)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    words: bool = typer.Option(True, "--words/--no-words", help="Apply the model's word model (OCR on every poster); --no-words: the head alone, ~3x faster on a CPU."),
) -> None:
    """Predict genres for posters, with probabilities and what the detectors saw.

    Results are printed (or written to --out) batch by batch as the models finish them.
    """
    import itertools
    import sys

    from .files import check_writable, check_writable_folder
    from .manifest import poster_list, walk_images
    from .outputs import PredictionLayout, Printed, check_format, open_results
    from .predict import Predictor, sample_images

    if out is not None and (as_json or as_csv):
        raise PosterFusionError("--out writes the format its name ends in (.csv, .jsonl, .parquet); drop --json/--csv")
    check_writable(out, "--out")
    if out is not None:
        check_format(out)
    if annotate is not None:
        check_writable_folder(annotate, "--annotate")

    def inputs() -> Iterator[str]:
        """Every poster asked for, found as the run needs them (folders walked, lists read lazily)."""
        if samples:
            yield from (str(p) for p in sample_images())
        for p in posters or []:
            yield from (str(f) for f in walk_images(p)) if p.is_dir() else (str(p),)
        if manifest is not None:
            yield from poster_list(manifest)

    source = inputs()
    first = list(itertools.islice(source, 1))  # a missing list or no posters: an error before any model loads
    if not first:
        raise PosterFusionError("no posters given; name poster files or folders, use --manifest, or --samples")
    predictor = Predictor(model, device, objects, words)
    annotations = None
    if annotate is not None:
        from .annotate import AnnotationFolder

        annotations = AnnotationFolder(predictor, annotate)
    if out is not None:
        sink = open_results(out, PredictionLayout(predictor.genres, top_k))
        done = sink.done
    else:
        sink, done = Printed("json" if as_json else "csv" if as_csv else "text", PredictionLayout(predictor.genres, top_k)), set()
    todo = (p for p in itertools.chain(first, source) if p not in done)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    # The bar's total takes a second walk of the inputs (fast next to the models); standard input
    # can only be read once, so there the bar counts without a total.
    total = sum(1 for p in inputs() if p not in done) if show_progress and manifest != "-" else None
    predicted = 0
    try:
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(_RichProgress(total, "predict")) if show_progress else None
            report = _FailureReport(bar)
            stack.callback(sink.close)
            for batch in predictor.stream(todo, cache, batch_size, report):
                if annotations is not None:
                    annotations.write(batch)
                sink.write(batch)
                predicted += sum(1 for p in batch if not p.error)
    except BrokenPipeError:  # `fusion predict big/ --csv | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    where = f" -> {out} ({len(done)} already there)" if out is not None else ""
    typer.echo(f"{predicted} posters predicted, {report.failed} skipped (model: {predictor.model_dir}){where}", err=True)


@fusion_app.command("audit")
@user_errors
def audit_command(
    manifest: Path = typer.Argument(..., help="Labelled manifest (poster, genres) of the catalogue to check."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Read/extend this feature cache instead of computing in memory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write a record per poster to this .csv, .jsonl or .parquet file as they come; a rerun skips the posters already in it."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a self-contained HTML page of the findings, ranked, with thumbnails and evidence."),
    top: int = typer.Option(100, "--top", min=1, help="Posters shown per kind of finding in the report."),
    show_progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar on stderr (default: when stderr is a terminal)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    objects: Optional[str] = typer.Option(None, "--objects", help="The model's object detector file, yolo:PATH, where its card names one."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    words: bool = typer.Option(True, "--words/--no-words", help="Apply the model's word model (OCR on every poster); --no-words: the head alone, ~3x faster on a CPU."),
) -> None:
    """Check a labelled catalogue against its posters: labelled genres a poster does not convey,
    and genres a record probably misses, each scored and explained.

    Without --out the posters with findings are printed; the summary line ends the run.
    """
    import collections
    import dataclasses
    import sys

    from .audit import AuditLayout, Auditor, catalogue_records, read_audits
    from .files import check_writable
    from .outputs import Printed, check_format, open_results
    from .predict import Predictor

    check_writable(out, "--out")
    check_writable(report, "--report")
    if out is not None:
        check_format(out)
    records = catalogue_records(manifest)
    auditor = Auditor(Predictor(model, device, objects, words))
    unknown = auditor.unknown(records)
    if unknown:
        typer.echo(f"{manifest}: genres the model does not know, left out: "
                   + ", ".join(f"{g} ({n} posters)" for g, n in unknown.items()), err=True)
    layout = AuditLayout(auditor.genres)
    if out is not None:
        sink = open_results(out, layout)
        done = sink.done
    else:
        sink, done = Printed("text", layout), set()
    todo = [r for r in records if r[0] not in done]
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    kept = []  # for a report without --out: the records less their probabilities, which it does not show
    counts = collections.Counter()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_RichProgress(len(todo), "audit")) if show_progress else None
        failures = _FailureReport(bar)
        stack.callback(sink.close)
        for batch in auditor.stream(todo, cache, batch_size, failures):
            sink.write(batch)
            counts.update(["posters"] * len(batch) + [f.kind for a in batch for f in a.findings])
            if report is not None and out is None:
                kept.extend(dataclasses.replace(a, probabilities={}) for a in batch)
    if report is not None:
        from .audit_report import write_audit_report

        everything = read_audits(out) if out is not None else kept
        write_audit_report(report, everything, auditor.genres, f"posterfusion audit: {manifest.name}", top, unknown)
    where = f" -> {out} ({len(done)} already there)" if out is not None else ""
    typer.echo(f"{counts['posters'] - failures.failed} posters audited: {counts['not conveyed']} labelled genres not "
               f"conveyed, {counts['probably missing']} probably missing; {failures.failed} skipped{where}", err=True)


@fusion_app.command("evaluate")
@user_errors
def evaluate_command(
    manifest: Path = typer.Option(..., "--manifest", help="Labelled manifest of posters the model has not seen."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache to read/extend."),
    split: Optional[str] = typer.Option(None, "--split", help="Only rows whose 'split' column has this value (e.g. test)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a precision-recall PNG here."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a self-contained HTML report here (metrics, plot, per-genre thumbnails)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    objects: Optional[str] = typer.Option(None, "--objects", help="The model's object detector file, yolo:PATH, where its card names one (a card alone never makes posterfusion load a file)."),
    words: bool = typer.Option(True, "--words/--no-words", help="Apply the model's word model (OCR on every poster); --no-words: the head alone, ~3x faster on a CPU."),
) -> None:
    """Measure a model on labelled posters: mAP, F1s, top-n accuracy, per-genre table."""
    from .evaluate import evaluate_manifest
    from .files import check_writable, write_text_atomic
    from .metrics import format_table
    from .predict import Predictor

    check_writable(json_out, "--json")
    check_writable(plot, "--plot")
    check_writable(report, "--report")
    predictor = Predictor(model, device, objects, words)
    with _RichProgress(None, "features") as progress:
        result = evaluate_manifest(manifest, predictor, cache, split, plot, progress, report)
    typer.echo(format_table(result))
    if result["unknown_genres"]:
        typer.echo(f"ignored genres the model does not know: {', '.join(result['unknown_genres'])}")
    if result["unreadable_posters"]:
        typer.echo(f"{len(result['unreadable_posters'])} posters could not be read and were left out")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2) + "\n")
    prior = f" (genre prior {result['prior_map']:.3f})" if "prior_map" in result else ""
    typer.echo(f"evaluated {result['n_posters']} posters: mAP {result['map']:.3f}{prior}, micro-F1 {result['micro_f1']:.3f}, "
               f"macro-F1 {result['macro_f1']:.3f}, top-n {result['top_n_accuracy']:.3f}")


@fusion_app.command("serve")
@user_errors
def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; only this machine by default (0.0.0.0: every network)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    objects: Optional[str] = typer.Option(None, "--objects", help="The model's object detector file, yolo:PATH, where its card names one."),
    max_files: int = typer.Option(16, "--max-files", min=1, help="Posters per request."),
    max_mb: int = typer.Option(20, "--max-mb", min=1, help="Largest poster file accepted, in MB."),
    queue: int = typer.Option(4, "--queue", min=1, help="Requests admitted at once (computing or waiting); the next gets 503 with Retry-After. Bodies held: at most queue x max-files x max-mb."),
    timeout: float = typer.Option(60.0, "--timeout", min=0.1, help="Seconds a request may wait for the model before it is answered 503."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Posters of requests waiting together that go through the models as one batch, at most."),
) -> None:
    """A local web page to drop posters on, and a JSON API (POST /predict, GET /health).

    The model is loaded once, before the server starts listening.
    """
    from .predict import Predictor
    from .serve import Limits, serve

    predictor = Predictor(model, device, objects)
    typer.echo(f"model {predictor.model_dir} loaded; open http://{host}:{port}/ (Ctrl+C stops)", err=True)
    serve(predictor, host, port, Limits(max_files, max_mb * 2**20, queue, timeout, max_batch))
