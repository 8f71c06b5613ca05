"""Fine-tuning the backbone with the fusion head, in two scopes.

* ``tail`` (any machine, minutes on 2 CPU cores): the backbone's trunk stays frozen and its output
  maps are computed once per poster and view (onnxruntime on a CPU); only the last block,
  ``conv_head`` and the head learn, on those maps. Each training step picks the poster or its
  mirror image at random; validation averages both, as inference does.
* ``all`` (the GPU path): backbone and head end to end on augmented posters, bf16 autocast on a GPU.

Both start from a head fitted on frozen embeddings, share the training loop (``loop.fit``) and save
the whole tuned backbone as one safetensors file, which gets its own identity: its embeddings never
mix with the pretrained one's, and ``fusion predict`` runs it like any other backbone. The heads
that ship are then fitted on the tuned backbone's embeddings like any frozen ones (an ensemble,
thresholds on validation), so a fine-tuned model is used exactly like every other.

Under torchrun both scopes train on several processes (``distributed``): each rank takes its
share of every epoch's posters and of the validation posters; rank 0 alone goes on from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed, metrics
from .backbone import Backbone, create_backbone, split_at_last_block
from .dataset import PosterDataset, default_workers, iterate
from .images import BadImage, decode_bytes, read_poster_bytes
from .loop import FitResult, Schedule, fit, loss_function
from .features import Features
from .model import FusionHead

BACKBONE_FILE = "backbone.safetensors"


@dataclass
class Tuned:
    """A fine-tune's outcome: the tuned backbone file, how it went, and (tail scope) the tuned
    backbone's embeddings of every poster, computed from the cached maps (None: compute them)."""

    backbone_file: Path
    fit: dict
    embeddings: np.ndarray | None = None


def finetune(paths: list[str], side: Features, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
             head: FusionHead, config: dict, device: torch.device, out_dir: Path,
             on_epoch: Callable[[int, float, float], None] | None = None) -> Tuned | None:
    """Fine-tune from a fitted head in the config's scope; the backbone file is written to ``out_dir``.
    ``side``: the posters' cached detector and text features (the CNN's come from the backbone
    being tuned).

    None on the ranks other than 0 of a torchrun launch: their part ends with the training.
    """
    backbone = create_backbone(config["backbone"], view=config["backbone_view"]).to(device)
    run = _tail if config["finetune"]["scope"] == "tail" else _end_to_end
    torch.manual_seed(config["seed"])
    fit_result, embeddings = run(backbone, paths, side.detectors, side.text, y, train_idx, val_idx, head.to(device),
                                 config, device, on_epoch)
    if not distributed.is_main():
        return None
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_file = out_dir / BACKBONE_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}, str(backbone_file))
    history = {"best_epoch": fit_result.best_epoch, "best_val_map": fit_result.best_map, "history": fit_result.history}
    return Tuned(backbone_file, history, embeddings)


def _optimizer(backbone_params, head: FusionHead, config: dict) -> torch.optim.Optimizer:
    settings = config["finetune"]
    return torch.optim.AdamW([
        {"params": list(backbone_params), "lr": settings["lr_backbone"]},
        {"params": head.parameters(), "lr": settings["lr_head"]},
    ], weight_decay=config["optim"]["weight_decay"])


def _train_mode_frozen_bn(model: torch.nn.Module) -> None:
    """Training mode, but ImageNet BatchNorm statistics kept: small poster batches would only make them noisier."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


# --- tail: the last block on cached trunk maps ------------------------------------------------


class TailModel(torch.nn.Module):
    """The backbone's tail and the head over trunk maps of shape (B, views, C, H, W).

    In training each poster shows one view at random; otherwise the views' embeddings are
    averaged, as :meth:`Backbone.embed` does.
    """

    def __init__(self, tail: torch.nn.Module, head: FusionHead) -> None:
        super().__init__()
        self.tail, self.head = tail, head

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        if self.training:
            pick = torch.randint(maps.shape[1], (len(maps),), device=maps.device)
            return self.tail(maps[torch.arange(len(maps), device=maps.device), pick].float())
        return torch.stack([self.tail(maps[:, v].float()) for v in range(maps.shape[1])]).mean(0)

    def forward(self, maps: torch.Tensor, det: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.embed(maps), det, text)


_last_maps: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def trunk_maps(backbone: Backbone, paths: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Trunk output maps (N, views, C, H, W) as float16 for readable posters, and which were readable.

    Readable once is not readable now: a poster that vanished or broke since its features were
    cached is left out of the fine-tune rather than trained on as a blank image. The last result
    is kept (~0.5 GB for 10,000 posters), so fine-tunes of several seeds in one process
    (scripts/ablation.py) compute the maps once.
    """
    key = (backbone.weights_sha256, backbone.width, backbone.height, backbone.flip, tuple(paths))
    if key not in _last_maps:
        _last_maps.clear()
        _last_maps[key] = _compute_trunk_maps(backbone, paths, batch_size)
    return _last_maps[key]


def _compute_trunk_maps(backbone: Backbone, paths: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from . import onnx_runtime

    trunk, _ = split_at_last_block(backbone.model)
    trunk_runtime = None
    if onnx_runtime.enabled(backbone._device):
        trunk_runtime = onnx_runtime.load(
            lambda: onnx_runtime.WithInputNormalization(trunk, backbone._mean, backbone._std),
            f"{backbone.name}-trunk-uint8", backbone.weights_sha256, (1, 3, backbone.height, backbone.width),
            input_dtype=torch.uint8,
        )
    network = trunk_runtime or (lambda batch: trunk(backbone.normalize(batch.to(backbone._device))).cpu())
    dataset = PosterDataset(paths, None, backbone)
    maps: list[np.ndarray] = []
    ok = np.zeros(len(paths), bool)
    position = 0
    with torch.inference_mode():
        for items in iterate(dataset, batch_size, default_workers() if len(paths) > batch_size else 0):
            good = [i for i in items if not i.error]
            ok[position : position + len(items)] = [not i.error for i in items]
            position += len(items)
            if not good:
                continue
            batch = torch.stack([i.backbone_input for i in good])
            views = [batch, batch.flip(-1)] if backbone.flip else [batch]
            maps.append(torch.stack([network(v) for v in views], 1).to(torch.float16).numpy())
    return (np.concatenate(maps) if maps else np.zeros((0,), np.float16)), ok


def _tail(backbone: Backbone, paths, det, text, y, train_idx, val_idx, head: FusionHead, config: dict,
          device: torch.device, on_epoch) -> tuple[FitResult, np.ndarray]:
    settings = config["finetune"]
    maps, ok = trunk_maps(backbone, paths)
    where = np.cumsum(ok) - 1  # row in ``maps`` of each readable poster
    train_idx, val_idx = train_idx[ok[train_idx]], val_idx[ok[val_idx]]
    _, tail = split_at_last_block(backbone.model)
    model = TailModel(tail, head).to(device)
    maps_t = torch.from_numpy(maps)
    det_t = torch.from_numpy(det) if det is not None else None
    text_t = torch.from_numpy(text) if text is not None else None
    y_t = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(config["seed"])

    def rows(idx: np.ndarray) -> tuple[tuple, torch.Tensor]:
        inputs = (maps_t[where[idx]].to(device), det_t[idx].to(device) if det_t is not None else None,
                  text_t[idx].to(device) if text_t is not None else None)
        return inputs, y_t[idx].to(device)

    def batches(epoch: int):
        order = distributed.training_share(train_idx[torch.randperm(len(train_idx), generator=generator).numpy()])
        for start in range(0, len(order), settings["batch_size"]):
            yield rows(order[start : start + settings["batch_size"]])

    @torch.inference_mode()
    def validate() -> float:
        mine = distributed.share(val_idx)
        out = [torch.sigmoid(model(*rows(mine[s : s + 512])[0])).float().cpu().numpy()
               for s in range(0, len(mine), 512)]
        return metrics.mean_average_precision(*distributed.gathered(y[mine], np.concatenate(out)))

    optimizer = _optimizer(tail.parameters(), head, config)
    result = fit(distributed.wrap(model, device), batches, validate, loss_function(y[train_idx], config, device),
                 optimizer, Schedule(settings["epochs"], config["optim"]["patience"]), on_epoch=on_epoch,
                 train_mode=_train_mode_frozen_bn, score_start=True)
    if not distributed.is_main():
        return result, None
    with torch.inference_mode():
        tuned = np.concatenate([model.embed(maps_t[s : s + 512].to(device)).float().cpu().numpy()
                                for s in range(0, len(maps_t), 512)])
    embeddings = np.full((len(paths), tuned.shape[1]), np.nan, np.float32)
    embeddings[ok] = tuned
    return result, embeddings


# --- all: end to end on augmented posters (the GPU path) ----------------------------------------


class PosterImages(torch.utils.data.Dataset):
    """Posters with their cached side features (detectors, text; None where unused) and labels,
    augmented when training. A poster that cannot be read any more is dropped from its batch."""

    def __init__(self, paths: list[str], side: tuple[np.ndarray | None, ...], y: np.ndarray, backbone: Backbone,
                 train: bool) -> None:
        from torchvision.transforms import v2

        self.paths, self.side, self.y = paths, side, y
        self.prepare = backbone.prepare
        # Crops keep a poster's shape before the resize to the view, as at inference.
        self.augment = v2.Compose([
            v2.RandomResizedCrop((backbone.height, backbone.width), scale=(0.6, 1.0), ratio=(0.55, 0.8), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
        ]) if train else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            rgb = decode_bytes(read_poster_bytes(self.paths[i]))
        except BadImage:
            return None
        image = self.prepare(rgb) if self.augment is None else self.augment(torch.tensor(rgb).permute(2, 0, 1))
        side = [torch.from_numpy(a[i]) if a is not None else torch.zeros(0) for a in self.side]
        return image, *side, torch.from_numpy(self.y[i])


def collate_readable(samples: list) -> tuple:
    return torch.utils.data.default_collate([s for s in samples if s is not None])


class FineTuneModel(torch.nn.Module):
    def __init__(self, backbone: Backbone, head: FusionHead) -> None:
        super().__init__()
        self.backbone, self.net, self.head = backbone, backbone.model, head

    def forward(self, images: torch.Tensor, det: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.backbone.embed(images).float(), det, text)


def _end_to_end(backbone: Backbone, paths, det, text, y, train_idx, val_idx, head: FusionHead, config: dict,
                device: torch.device, on_epoch) -> tuple[FitResult, None]:
    settings = config["finetune"]
    model = FineTuneModel(backbone, head)
    amp = settings["mixed_precision"] and device.type == "cuda"
    side = (det, text)

    def loader(idx: np.ndarray, train: bool) -> torch.utils.data.DataLoader:
        dataset = PosterImages([paths[i] for i in idx], tuple(None if a is None else a[idx] for a in side), y[idx],
                               backbone, train)
        sampler = distributed.sampler(dataset, config["seed"]) if train else None
        workers = distributed.node_share(default_workers(device))
        seed = config["seed"] + distributed.rank()  # each rank's workers draw their own augmentations
        return torch.utils.data.DataLoader(dataset, batch_size=settings["batch_size"], sampler=sampler,
                                           shuffle=train and sampler is None, num_workers=workers,
                                           collate_fn=collate_readable, drop_last=train,
                                           generator=torch.Generator().manual_seed(seed))

    train_loader, val_loader = loader(train_idx, True), loader(distributed.share(val_idx), False)

    def inputs(images: torch.Tensor, *features: torch.Tensor) -> tuple:
        return (images.to(device), *(f.to(device) if a is not None else None for f, a in zip(features, side)))

    def batches(epoch: int):
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        for *batch, target in train_loader:
            yield inputs(*batch), target.to(device)

    def validate() -> float:
        out, truth = [], []
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            for *batch, target in val_loader:
                out.append(torch.sigmoid(model(*inputs(*batch))).float().cpu().numpy())
                truth.append(target.numpy())
        return metrics.mean_average_precision(*distributed.gathered(np.concatenate(truth), np.concatenate(out)))

    optimizer = _optimizer(backbone.model.parameters(), head, config)
    result = fit(distributed.wrap(model, device), batches, validate, loss_function(y[train_idx], config, device),
                 optimizer, Schedule(settings["epochs"], config["optim"]["patience"], "cuda" if amp else None),
                 on_epoch=on_epoch, train_mode=_train_mode_frozen_bn, score_start=True)
    return result, None
