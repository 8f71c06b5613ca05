"""The fine-tune on several processes under ``torchrun``: one per GPU (NCCL), or several on a CPU (gloo).

torchrun starts N copies of one command with WORLD_SIZE, RANK and LOCAL_RANK set. Every rank
reads the same cache and fits the same starting head; each epoch's training posters are split
between the ranks and their gradients averaged (DistributedDataParallel); validation is split too
and the predictions gathered, so every rank scores the same rows and takes the same
early-stopping decision. Rank 0 alone writes: missing cache rows (before the others read them),
the tuned backbone, the tuned embeddings, the model folder and its card. The other ranks stop
after the fine-tune's last epoch and wait for rank 0 at a barrier.

Without torchrun nothing here does anything: no process group, every helper is the identity, so a
plain ``fusion train`` computes exactly what it always did.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from .errors import PosterFusionError

WAIT = timedelta(hours=1)
"""How long a rank waits for the others at a collective: rank 0 may be computing the cache's
missing rows, or fitting the shipped heads, while they wait."""


def launched_world() -> int:
    """The number of processes torchrun started, 1 without torchrun (no process group needed yet)."""
    return int(os.environ["WORLD_SIZE"]) if _launched() else 1


def _launched() -> bool:
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes (the only process, or rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def session(device: str) -> Iterator[str]:
    """Join torchrun's process group for the block and yield the device this process uses.

    Under torchrun each rank takes the GPU of its LOCAL_RANK (``--device`` says only whether GPUs
    are used) and NCCL, or the CPU and gloo. On success every rank waits for the others before
    leaving the group; on an error it leaves at once and torchrun stops the rest. Without
    torchrun: ``device`` as given, and nothing else.
    """
    if not _launched():
        yield device
        return
    from .frozen import resolve_device

    local = int(os.environ["LOCAL_RANK"])
    if resolve_device(device).type == "cuda":
        if device not in ("auto", "cuda"):
            raise PosterFusionError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; "
                                    "use --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise PosterFusionError(f"torchrun: LOCAL_RANK {local} but {torch.cuda.device_count()} GPU(s) visible; "
                                    "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        device, backend, bound = f"cuda:{local}", "nccl", torch.device("cuda", local)
    else:
        device, backend, bound = "cpu", "gloo", None
    dist.init_process_group(backend, timeout=WAIT, device_id=bound)
    try:
        yield device
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (computing and writing what is missing), the others after it (only reading)."""
    if not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model whose backward averages gradients over the ranks (itself without torchrun).

    Buffers are not broadcast at each step: the fine-tunes keep BatchNorm statistics and the
    head's standardisers frozen, and DDP syncs them once from rank 0 when it wraps the model.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def node_share(workers: int) -> int:
    """A process's part of the decoding workers a machine has room for: its ranks share its cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1
    return max(1, workers // local)


def is_wrapped(model: torch.nn.Module) -> bool:
    """Whether every rank trains ``model`` in step (it came from :func:`wrap` under torchrun)."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def training_share(order: np.ndarray) -> np.ndarray:
    """This rank's part of an epoch's shuffled training rows: every rank gets as many rows (the
    last ``len % world`` are left out this epoch, as DistributedSampler's ``drop_last`` does), so
    all take the same number of steps and none waits at a gradient all-reduce for ever."""
    return order[: len(order) - len(order) % world()][rank() :: world()]


def share(rows: np.ndarray) -> np.ndarray:
    """This rank's part of rows that are scored, not trained on (all of them across the ranks)."""
    return rows[rank() :: world()]


def sampler(dataset: torch.utils.data.Dataset, seed: int) -> torch.utils.data.DistributedSampler | None:
    """This rank's shuffled part of a training DataLoader's dataset, equal in size on every rank
    (call ``set_epoch`` each epoch); None without torchrun (the DataLoader shuffles)."""
    if not active():
        return None
    return torch.utils.data.DistributedSampler(dataset, world(), rank(), shuffle=True, seed=seed, drop_last=True)


def gathered(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every rank's rows of these arrays, concatenated in rank order, on every rank."""
    if not active():
        return arrays
    parts: list = [None] * world()
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(len(arrays)))


def summed(*values: float) -> tuple[float, ...]:
    """These numbers summed over the ranks (e.g. an epoch's loss and its rows)."""
    parts: list = [None] * world()
    dist.all_gather_object(parts, values)
    return tuple(float(sum(part[k] for part in parts)) for k in range(len(values)))


def main_value(value: float) -> float:
    """Rank 0's value on every rank: decisions taken on it (early stopping) are the same everywhere."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
