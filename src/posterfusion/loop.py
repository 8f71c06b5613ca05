"""The one training loop: epochs, early stopping on validation mAP, the best weights kept.

Head training (frozen features), the tail fine-tune (the backbone's last block on cached maps) and
the end-to-end fine-tune differ only in what a batch is and how validation is scored; they hand
those in as two functions and share everything else, as in torchvision's reference scripts.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from . import distributed

Batch = tuple[tuple, torch.Tensor]  # (model inputs, targets)


@dataclass
class Schedule:
    """How long to train and when to stop."""

    epochs: int
    patience: int  # epochs without a better validation mAP before stopping
    amp_device: str | None = None  # "cuda": bf16 autocast for the forward pass


@dataclass
class FitResult:
    best_epoch: int
    best_map: float
    history: list[dict] = field(default_factory=list)

    @property
    def epochs_run(self) -> int:
        return len([h for h in self.history if h["epoch"] > 0])


def fit(model: torch.nn.Module, batches: Callable[[int], Iterable[Batch]], validate: Callable[[], float],
        loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        on_epoch: Callable[[int, float, float], None] | None = None,
        train_mode: Callable[[torch.nn.Module], None] | None = None, score_start: bool = False) -> FitResult:
    """Train ``model`` on ``batches(epoch)`` until validation stops improving; leaves the best weights in it.

    ``train_mode`` puts the model in training mode (e.g. keeping BatchNorm statistics frozen);
    ``score_start`` scores the starting weights first, so a fine-tune never ends worse than it began.
    A DDP ``model`` (torchrun) is trained by every rank in step, each on its own ``batches``:
    they keep rank 0's validation score, so all stop at the same epoch with the same weights.
    """
    in_step = distributed.is_wrapped(model)

    def score() -> float:
        return distributed.main_value(validate()) if in_step else validate()

    history: list[dict] = []
    best_epoch, best_map, state = -1, -1.0, None
    if score_start:
        best_epoch, best_map, state = 0, score(), copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val_map": best_map})
    autocast = (torch.autocast(schedule.amp_device, torch.bfloat16) if schedule.amp_device
                else contextlib.nullcontext())
    for epoch in range(1, schedule.epochs + 1):
        (train_mode or torch.nn.Module.train)(model)
        total, seen = 0.0, 0
        for inputs, target in batches(epoch):
            with autocast:
                logits = model(*inputs)
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(target), seen + len(target)
        if scheduler is not None:
            scheduler.step()
        if in_step:
            total, seen = distributed.summed(total, seen)
        model.eval()
        val_map = score()
        history.append({"epoch": epoch, "loss": total / max(seen, 1), "val_map": val_map})
        if on_epoch:
            on_epoch(epoch, total / max(seen, 1), val_map)
        if val_map > best_map:
            best_epoch, best_map, state = epoch, val_map, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= schedule.patience:
            break
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    return FitResult(best_epoch, best_map, history)


def pos_weight(y: np.ndarray, config: dict) -> torch.Tensor:
    """(negatives/positives)^power per genre, capped: rare genres are not ignored by BCE."""
    power = {"none": 0.0, "sqrt": 0.5, "full": 1.0}[config["loss"]["pos_weight"]]
    pos = y.sum(0).clip(min=1)
    weight = ((len(y) - pos) / pos) ** power
    return torch.as_tensor(np.minimum(weight, config["loss"]["max_pos_weight"]), dtype=torch.float32)


def loss_function(y_train: np.ndarray, config: dict, device: torch.device) -> torch.nn.Module:
    """BCE with the config's per-genre positive weights: one loss for heads and fine-tunes."""
    return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight(y_train, config).to(device))
