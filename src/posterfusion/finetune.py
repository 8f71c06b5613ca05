"""Fine-tuning end to end: the backbone learns with the fusion head (the GPU path).

It starts from the frozen-feature head (already a good model), then trains backbone and head
together on augmented posters at a small backbone learning rate, with bf16 autocast on a GPU.
Detector features stay frozen and come from the cache. The fine-tuned backbone is saved beside
the head and gets its own identity, so its embeddings never mix with the pretrained one's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import metrics
from .backbone import Backbone, create_backbone
from .images import BadImage, decode_bytes
from .model import FusionHead

BACKBONE_FILE = "backbone.safetensors"


class PosterImages(torch.utils.data.Dataset):
    """Posters with their cached detector features and labels; augmented when training."""

    def __init__(self, paths: list[str], detectors: np.ndarray | None, y: np.ndarray, backbone: Backbone, train: bool) -> None:
        from torchvision.transforms import v2

        self.paths, self.detectors, self.y = paths, detectors, y
        self.prepare = backbone.prepare
        size = backbone.spec.input_size
        # Crops keep a poster's 2:3 shape before the stretch to a square, as at inference.
        self.augment = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.55, 0.8), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.02),
        ]) if train else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            rgb = decode_bytes(Path(self.paths[i]).read_bytes())
        except (OSError, BadImage):  # listed in the cache, so readable once; a vanished file is skipped
            rgb = np.zeros((8, 8, 3), np.uint8)
        image = self.prepare(rgb) if self.augment is None else self.augment(torch.tensor(rgb).permute(2, 0, 1))
        det = torch.from_numpy(self.detectors[i]) if self.detectors is not None else torch.zeros(0)
        return image, det, torch.from_numpy(self.y[i])


class FineTuneModel(torch.nn.Module):
    def __init__(self, backbone: Backbone, head: FusionHead) -> None:
        super().__init__()
        self.backbone, self.net, self.head = backbone, backbone.model, head

    def forward(self, images: torch.Tensor, det: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.backbone.embed(images).float(), det)


def finetune(paths: list[str], det: np.ndarray | None, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
             head: FusionHead, config: dict, device: torch.device, out_dir: Path,
             on_epoch: Callable[[int, float, float], None] | None = None) -> tuple[FusionHead, dict, np.ndarray, Path]:
    """Fine-tune from a fitted head; returns the best head, history, validation probabilities, backbone file."""
    from safetensors.torch import save_file

    settings = config["finetune"]
    torch.manual_seed(config["seed"])
    backbone = create_backbone(config["backbone"]).to(device)
    model = FineTuneModel(backbone, head.to(device))
    amp = settings["mixed_precision"] and device.type == "cuda"

    def loader(idx: np.ndarray, train: bool) -> torch.utils.data.DataLoader:
        dataset = PosterImages([paths[i] for i in idx], det[idx] if det is not None else None, y[idx], backbone, train)
        return torch.utils.data.DataLoader(dataset, batch_size=settings["batch_size"], shuffle=train,
                                           num_workers=min(8, max(1, (torch.get_num_threads() or 2) - 1)),
                                           drop_last=train, generator=torch.Generator().manual_seed(config["seed"]))

    train_loader, val_loader = loader(train_idx, True), loader(val_idx, False)
    optimizer = torch.optim.AdamW([
        {"params": backbone.model.parameters(), "lr": settings["lr_backbone"]},
        {"params": head.parameters(), "lr": settings["lr_head"]},
    ], weight_decay=config["optim"]["weight_decay"])
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def evaluate() -> np.ndarray:
        model.eval()
        out = []
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            for images, d, _ in val_loader:
                out.append(torch.sigmoid(model(images.to(device), d.to(device) if det is not None else None)).float().cpu().numpy())
        return np.concatenate(out)

    best_prob = evaluate()
    best = {"map": metrics.mean_average_precision(y[val_idx], best_prob), "epoch": 0,
            "state": copy.deepcopy(model.state_dict())}
    history = [{"epoch": 0, "val_map": best["map"]}]
    for epoch in range(1, settings["epochs"] + 1):
        model.train()
        _freeze_batchnorm(backbone.model)
        total, seen = 0.0, 0
        for images, d, target in train_loader:
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = model(images.to(device), d.to(device) if det is not None else None)
            loss = loss_fn(logits.float(), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + float(loss.detach()) * len(target), seen + len(target)
        prob = evaluate()
        val_map = metrics.mean_average_precision(y[val_idx], prob)
        history.append({"epoch": epoch, "loss": total / max(seen, 1), "val_map": val_map})
        if on_epoch:
            on_epoch(epoch, total / max(seen, 1), val_map)
        if val_map > best["map"]:
            best = {"map": val_map, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            best_prob = prob
        elif epoch - best["epoch"] >= config["optim"]["patience"]:
            break
    model.load_state_dict(best["state"])
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_file = out_dir / BACKBONE_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}, str(backbone_file))
    return head.cpu().eval(), {"best_epoch": [best["epoch"]], "epochs_run": [len(history) - 1], "history": history}, best_prob, backbone_file


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    """Keep ImageNet BatchNorm statistics: small poster batches would only make them noisier."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
