"""`detect-cache build --ray`: the build on a Ray cluster (Ray Data), into the same stores.

The manifest's batches, cut as the local build cuts them (MTCNN's faces depend slightly on which
posters share its batch, so the same batches give the same features), are the rows of a Ray
Dataset. Ray tasks read, hash, decode and prepare each batch's posters (:class:`PosterDataset`,
what the local build's DataLoader workers run); an actor pool runs the frozen models (one
:class:`FrozenModels` per actor, with one GPU where the cluster has GPUs, else one CPU); the driver
takes the outputs in manifest order and commits them through the local build's own accounting and
writer (:func:`take_todo`, :func:`commit_batches`). Stores, parts, keys, progress and the closing
summary are therefore the local build's, and either build completes what the other began.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Iterator

from . import dataset, extract, frozen
from .defaults import DEFAULT_BACKBONE, DEFAULT_VIEW
from .errors import PosterFusionError
from .dataset import Item
from .extract import BuildSummary, Progress, commit_batches, take_todo
from .frozen import Extracted

LOCAL = "local"
"""``--ray local``: a Ray started on this machine for the run (or the one this process is already in)."""


class RayBuild:
    """A build on the Ray cluster at ``address``, set up (stores opened, cluster joined) before
    any work, so that set-up mistakes are one line before the progress bar; a context manager
    that stops the Ray it started."""

    def __init__(self, cache: str | Path, address: str = LOCAL, objects: str | None = "nanodet",
                 backbone: str | None = DEFAULT_BACKBONE, view: str | None = DEFAULT_VIEW,
                 text: bool = False, device: str = "auto", workers: int | None = None,
                 decoders: int | None = None) -> None:
        """``cache``: a folder or a filesystem URI; ``workers``: model actors (default: one per GPU,
        else one per CPU of the cluster); ``decoders``: preparing tasks in flight (default: the
        cluster's CPUs)."""
        from .backbone import create_backbone
        from .detectors import Preparer

        # The stores' identities, and the one-line errors for unknown models, before Ray starts.
        models = frozen.create_frozen_models(objects=objects, backbone=backbone, device="cpu", backbone_view=view,
                                              text=text)
        self.stores = extract.open_stores(models, cache)
        del models  # the actors load their own
        self.dataset = extract.poster_dataset(self.stores, Preparer(objects) if objects else None,
                                              create_backbone(backbone, lazy=True, view=view) if backbone else None, text)
        self.ray, self.started = _connect(address)
        try:
            resources = self.ray.cluster_resources()
            cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
            device = _actor_device(device, gpus)
        except BaseException:
            self.close()
            raise
        self.on_gpu = device == "cuda"
        self.workers = workers or (gpus if self.on_gpu else max(1, cpus))
        self.decoders = decoders or max(1, cpus)
        self.spec = {"objects": objects, "backbone": backbone, "device": device, "backbone_view": view, "text": text}

    def __enter__(self) -> "RayBuild":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __str__(self) -> str:
        return f"{self.workers} Ray {'gpu' if self.on_gpu else 'cpu'} worker{'s' * (self.workers > 1)}"

    def run(self, paths: list[str], batch_size: int = 32, progress: Progress | None = None) -> BuildSummary:
        """Compute what the stores lack for ``paths``; each batch is committed as it comes back."""
        summary = BuildSummary()
        start = time.perf_counter()
        batches = _taken(self._batches(paths, batch_size), summary, progress)
        for _ in commit_batches(batches, self.stores, summary, progress, {}, start):
            pass
        return summary

    def _batches(self, paths: list[str], batch_size: int) -> Iterator[bytes]:
        """Each batch's pickled ``(items, outputs)``, in manifest order, as the actors finish them."""
        rows = [{"paths": [os.path.abspath(p) for p in paths[s : s + batch_size]], "given": paths[s : s + batch_size]}
                for s in range(0, len(paths), batch_size)]
        if not rows:
            return
        data = self.ray.data.from_items(rows, override_num_blocks=len(rows))  # a batch a block: a task each
        # Preparing is a tenth of the models' cost, and holds no CPU of Ray's: a pool that takes
        # every CPU must not starve it. Its tasks in flight are bounded instead.
        data = data.map(_prepare, fn_kwargs={"poster_set": self.dataset}, num_cpus=0,
                        compute=self.ray.data.TaskPoolStrategy(size=self.decoders))
        data = data.map(_ModelWorker, fn_constructor_kwargs={"spec": self.spec},
                        compute=self.ray.data.ActorPoolStrategy(size=self.workers), num_cpus=1,
                        num_gpus=1 if self.on_gpu else 0)
        data.context.execution_options.preserve_order = True
        data.context.enable_progress_bars = False
        for row in data.iter_rows():
            yield row["result"]


def _connect(address: str):
    """Ray, joined to the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or
    started here (:data:`LOCAL`), and whether this call started it; a process already in a Ray
    cluster stays in it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PosterFusionError("--ray: Ray is not installed; pip install 'posterfusion[ray]'") from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(None if address == LOCAL else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PosterFusionError(f"--ray {address}: cannot join a Ray cluster there ({str(exc).splitlines()[0]})") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the progress bar and failures are ours
    return ray, True


def _actor_device(device: str, gpus: int) -> str:
    """The actors' device: a GPU each where asked for (``auto``: where the cluster has GPUs)."""
    if device == "auto":
        return "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if not gpus:
            raise PosterFusionError(f"--device {device}: the Ray cluster has no GPU; use --device cpu")
        return "cuda"  # Ray gives each actor its own GPU as cuda:0
    return str(frozen.resolve_device(device))  # cpu, or the one-line error for a bad name


def _prepare(row: dict[str, Any], poster_set: dataset.PosterDataset) -> dict[str, Any]:
    """A Ray task: one batch's posters read, hashed, decoded and prepared (paths as given kept)."""
    items = [poster_set[str(path)] for path in row["paths"]]
    for item, given in zip(items, row["given"]):
        item.path = str(given)
    return {"items": pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)}


class _ModelWorker:
    """A Ray actor: the frozen models, loaded once, run on prepared batches."""

    def __init__(self, spec: dict) -> None:
        self.models = frozen.create_frozen_models(**spec)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        items: list[Item] = pickle.loads(row["items"])
        # Posters met twice in this batch run once, as in the local build; across batches the
        # driver sees it (each batch runs alone here).
        todo = take_todo(items, BuildSummary(keys=None), seen=set())
        ((_, result),) = list(self.models.stream([(None, todo)]))
        for item in items:  # the inputs have done their work: only keys and paths go back
            item.detector_input = item.backbone_input = item.text_input = None
        result.evidence = []
        return {"result": pickle.dumps((items, result), protocol=pickle.HIGHEST_PROTOCOL)}


def _taken(batches: Iterator[bytes], summary: BuildSummary,
           progress: Progress | None) -> Iterator[tuple[tuple[list[Item], int], Extracted]]:
    """Each batch counted as the local build counts it; a poster already computed in an earlier
    batch of this run is a duplicate, its rows dropped."""
    seen: set[str] = set()
    for blob in batches:
        items, result = pickle.loads(blob)
        todo = take_todo(items, summary, progress, seen)
        yield (items, len(todo)), _only(result, todo)


def _only(result: Extracted, todo: list[Item]) -> Extracted:
    """``result`` with only the rows of ``todo``'s items."""
    keep = {id(item) for item in todo}

    def rows(items: list[Item], values, lines: list | None = None):
        mask = [id(item) in keep for item in items]
        if all(mask):
            return items, values, lines
        kept = [item for item, m in zip(items, mask) if m]
        return kept, (values[mask] if values is not None else None), ([x for x, m in zip(lines, mask) if m] if lines else lines)

    result.detector_items, result.features, _ = rows(result.detector_items, result.features)
    result.backbone_items, result.embeddings, _ = rows(result.backbone_items, result.embeddings)
    result.text_items, result.text_features, result.text_lines = rows(result.text_items, result.text_features,
                                                                       result.text_lines)
    return result
