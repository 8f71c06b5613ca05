"""Posters -> prepared model inputs, in batches, with one read and one decode per poster.

DataLoader workers read each file once, hash it (the cache key), skip it if the cache already has
it, decode it and prepare every model's input. Batches are cut from the input in order, so a
resumed run forms the same batches as an uninterrupted one.
"""

from __future__ import annotations

import gc
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .backbone import Backbone
from .detectors import Preparer
from .images import BadImage, content_key, decode_bytes, read_poster_bytes


@dataclass
class Item:
    """One poster after the worker: its key, and model inputs or the reason it failed."""

    path: str
    key: str = ""
    error: str = ""
    cached: bool = False
    detector_input: dict[str, Any] | None = None
    backbone_input: torch.Tensor | None = None
    text_input: np.ndarray | None = None


class PosterDataset(torch.utils.data.Dataset):
    """Reads, hashes, decodes and prepares posters; runs inside DataLoader workers."""

    def __init__(self, paths: list[str], preparer: Preparer | None, backbone: Backbone | None,
                 detector_done: frozenset[str] = frozenset(), backbone_done: frozenset[str] = frozenset(),
                 read_text: bool = False, text_done: frozenset[str] = frozenset()) -> None:
        self.paths = paths
        self.preparer = preparer
        self.backbone_prepare = backbone.prepare if backbone is not None else None
        self.read_text = read_text
        self.detector_done = detector_done
        self.backbone_done = backbone_done
        self.text_done = text_done

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | str) -> Item:
        """The poster at ``index`` in ``paths``, or the one at the path ``index`` (what a run over a
        stream of paths sends its workers, the paths being read as it goes)."""
        item = Item(self.paths[index] if isinstance(index, int) else index)
        try:
            data = read_poster_bytes(item.path)
        except BadImage as exc:
            item.error = str(exc)
            return item
        item.key = content_key(data)
        need_detectors = self.preparer is not None and item.key not in self.detector_done
        need_backbone = self.backbone_prepare is not None and item.key not in self.backbone_done
        need_text = self.read_text and item.key not in self.text_done
        if not (need_detectors or need_backbone or need_text):
            item.cached = True
            return item
        try:
            rgb = decode_bytes(data)
        except BadImage as exc:
            item.error = str(exc)
            return item
        if need_detectors:
            item.detector_input = self.preparer(rgb)
        if need_backbone:
            item.backbone_input = self.backbone_prepare(rgb)
        if need_text:
            from .detectors import text

            item.text_input = text.prepare(rgb)
        return item


def _collate(items: list[Item]) -> list[Item]:
    """In a worker: each kind of model input in one tensor for the batch, the items holding views.

    Every tensor a worker sends crosses in its own shared-memory segment and file descriptor
    (~0.5 ms each, paid by the main process); one per kind instead of three per poster cuts the
    main process's wait for a batch of 32 from ~55 ms to a few.
    """
    detector_inputs = [i.detector_input for i in items if i.detector_input is not None]
    for name in ("objects", "canvas"):  # fixed-size uint8 tensors (YOLO's inputs are arrays)
        holders = [d for d in detector_inputs if isinstance(d[name], torch.Tensor)]
        for d, view in zip(holders, _one_tensor([d[name] for d in holders])):
            d[name] = view
    holders = [i for i in items if i.backbone_input is not None]
    for item, view in zip(holders, _one_tensor([i.backbone_input for i in holders])):
        item.backbone_input = view
    return items


def _one_tensor(tensors: list[torch.Tensor]) -> torch.Tensor | list:
    return torch.stack(tensors) if tensors else []


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only resize; the models get the cores


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding workers: one per spare core, at least one so decoding overlaps inference.

    On a CPU the models need the cores (at most 4 workers); a GPU is fed by the CPU, so there
    every core but two (the main process and its writer) decodes, up to 12.
    """
    cores = os.cpu_count() or 2
    if torch.device(device).type == "cuda":
        return max(1, min(12, cores - 2))
    return max(1, min(4, cores - 1))


def iterate(dataset: PosterDataset, batch_size: int, workers: int,
            stream: Iterable[str] | None = None) -> Iterator[list[Item]]:
    """Batches of prepared items in manifest order, decoded in parallel with inference; given
    ``stream``, of its paths instead, taken from it only as the workers need them (one pool of
    workers for a whole run, however long: a worker forked again later would copy the pages the
    models have written since, ~0.7 GB each time)."""
    indices = iter(stream if stream is not None else range(len(dataset)))
    if workers <= 0:
        while batch := [dataset[i] for i in itertools.islice(indices, batch_size)]:
            yield batch
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=False,
    )
    # Forked workers share the parent's pages until they write to them, and Python's collector
    # writes to every object it scans; frozen, the parent's objects are never scanned there
    # (4 workers, 1,600 posters: each grew by ~25 MB instead of ~45 MB).
    gc.freeze()
    try:
        batches = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()
    yield from batches
