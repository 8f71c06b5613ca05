"""The fusion head: an MLP over [CNN embedding, standardised detector features, text features].

Each branch is projected on its own before they meet, so the 1280-d embedding cannot drown the
~300 detector columns; ``mode`` keeps one branch alone for the ablations (``cnn``, ``detectors``,
``text``) or all of them (``fusion``). Feature standardisation (log1p for counts, then z-scores fitted on the training split)
lives inside the module as buffers, so the saved weights are the whole model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from .features import Features

MODES = ("cnn", "detectors", "fusion", "text")
"""Which branches a head uses: one alone (the ablations), or ``fusion``: every branch it has features for."""


@dataclass
class HeadConfig:
    mode: str = "fusion"
    cnn_dim: int = 1280
    cnn_offset: int = 0  # where this head's part of the embedding starts (a backbone ensemble's are side by side)
    detector_dim: int = 0
    n_genres: int = 18
    cnn_hidden: int = 256
    detector_hidden: int = 64
    text_dim: int = 0
    text_hidden: int = 64
    hidden: int = 256
    dropout: float = 0.5
    input_dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class Standardizer(nn.Module):
    """log1p on heavy-tailed columns, then z-score with clipping; fitted once on training rows."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("log_mask", torch.zeros(dim, dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: np.ndarray, log_mask: np.ndarray) -> "Standardizer":
        self.log_mask.copy_(torch.as_tensor(log_mask, dtype=torch.bool))
        z = self._log(torch.as_tensor(x, dtype=torch.float32))
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-3))  # constant columns stay at 0 instead of exploding
        return self

    def _log(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.log_mask, torch.log1p(x.clamp_min(0)), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self._log(x) - self.mean) / self.std).clamp(-5.0, 5.0)


class FusionHead(nn.Module):
    """A projected branch per feature group the mode uses (CNN, detectors, text), concatenated, then
    a small MLP to one logit per genre."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {config.mode!r}")
        self.config = config
        self.use_cnn = config.mode in ("cnn", "fusion")
        self.use_detectors = config.mode in ("detectors", "fusion") and config.detector_dim > 0
        self.use_text = config.mode in ("text", "fusion") and config.text_dim > 0
        width = 0
        if self.use_cnn:
            self.cnn_norm = Standardizer(config.cnn_dim)
            self.cnn_branch = nn.Sequential(
                nn.Dropout(config.input_dropout), nn.Linear(config.cnn_dim, config.cnn_hidden), nn.GELU()
            )
            width += config.cnn_hidden
        if self.use_detectors:
            self.detector_norm = Standardizer(config.detector_dim)
            self.detector_branch = nn.Sequential(
                nn.Dropout(config.input_dropout), nn.Linear(config.detector_dim, config.detector_hidden), nn.GELU()
            )
            width += config.detector_hidden
        if self.use_text:
            self.text_norm = Standardizer(config.text_dim)
            self.text_branch = nn.Sequential(
                nn.Dropout(config.input_dropout), nn.Linear(config.text_dim, config.text_hidden), nn.GELU()
            )
            width += config.text_hidden
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(width, config.hidden), nn.GELU(),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, config.n_genres),
        )

    def own_part(self, cnn: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The columns of the embedding this head reads (a backbone ensemble's are side by side)."""
        return cnn[:, self.config.cnn_offset : self.config.cnn_offset + self.config.cnn_dim]

    def fit_standardizers(self, x: Features, log_mask: np.ndarray | None,
                          text_log_mask: np.ndarray | None = None) -> None:
        if self.use_cnn:
            self.cnn_norm.fit(self.own_part(x.cnn), np.zeros(self.config.cnn_dim, bool))
        if self.use_detectors:
            self.detector_norm.fit(x.detectors, log_mask)
        if self.use_text:
            self.text_norm.fit(x.text, text_log_mask)

    def forward(self, cnn: torch.Tensor | None, detectors: torch.Tensor | None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.use_cnn:
            parts.append(self.cnn_branch(self.cnn_norm(self.own_part(cnn))))
        if self.use_detectors:
            parts.append(self.detector_branch(self.detector_norm(detectors)))
        if self.use_text:
            parts.append(self.text_branch(self.text_norm(text)))
        return self.classifier(torch.cat(parts, dim=1))

    def probabilities(self, cnn: torch.Tensor | None, detectors: torch.Tensor | None,
                      text: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(cnn, detectors, text))

    def set_genre_prior(self, frequencies: np.ndarray) -> None:
        """Start the output biases at the genres' log-odds: early epochs need not learn the prior."""
        p = np.clip(frequencies, 1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.classifier[-1].bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))


class FusionEnsemble(nn.Module):
    """Heads trained from different seeds, probabilities averaged: steadier than any one of them.

    Under a backbone ensemble each head reads one network's part of the embedding, so the
    average is over networks as well as seeds.
    """

    def __init__(self, heads: list[FusionHead]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.config = heads[0].config

    @property
    def cnn_dim(self) -> int:
        """Width of the embedding the heads read: every network's part, side by side."""
        return max(h.config.cnn_offset + h.config.cnn_dim for h in self.heads)

    def cnn_training_mean(self) -> np.ndarray:
        """The embedding every head's standardiser maps to zero, part by part."""
        parts = {h.config.cnn_offset: h.cnn_norm.mean.cpu().numpy() for h in self.heads if h.use_cnn}
        return np.concatenate([parts[k] for k in sorted(parts)]).astype(np.float32)

    def probabilities(self, cnn: torch.Tensor | None, detectors: torch.Tensor | None,
                      text: torch.Tensor | None = None) -> torch.Tensor:
        if cnn is not None and self.config.cnn_dim and cnn.shape[1] != self.cnn_dim:
            raise ValueError(f"the heads read {self.cnn_dim}-wide embeddings, not {cnn.shape[1]} "
                             "(features of another backbone)")
        return torch.stack([head.probabilities(cnn, detectors, text) for head in self.heads]).mean(0)


WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


CARD_FORMAT = "posterfusion-model/1"


@dataclass(kw_only=True)
class ModelCard:
    """What a model folder says of its weights (``card.json``): the genres and their thresholds,
    the config it was trained with, which detectors, backbone and text reader made its features (a
    model never runs on others'), the word model, its validation scores and how it was trained.

    Read and written as the same JSON. A card from an older version loads with what it lacks at
    the defaults here; keys this version does not know are kept in ``extra`` and written back."""

    format: str = CARD_FORMAT
    genres: list[str]
    thresholds: list[float]
    train_genre_frequency: list[float] | None = None
    config: dict = field(default_factory=dict)
    feature_schema: dict | None = None  # version and columns of the detector features
    detectors: dict | None = None  # identities of the models that made each feature group
    backbone: dict | None = None
    text: dict | None = None
    words: dict | None = None  # the word model: fitted or why not, its weights per genre
    validation: dict | None = None
    training: dict | None = None
    head: dict | None = None  # the heads' HeadConfig, ...
    ensemble: int = 1  # ... how many there are ...
    cnn_parts: list[list[int]] | None = None  # ... and the part of the embedding each reads (save_model)
    extra: dict = field(default_factory=dict)

    @property
    def has_words(self) -> bool:
        return bool((self.words or {}).get("fitted"))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"} | self.extra

    @classmethod
    def from_json(cls, data: dict) -> "ModelCard":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


def save_model(out_dir, model: FusionEnsemble, card: ModelCard) -> None:
    """Weights as safetensors and everything needed to use them as a JSON model card."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    card.head, card.ensemble = model.config.to_dict(), len(model.heads)
    card.cnn_parts = [[h.config.cnn_offset, h.config.cnn_dim] for h in model.heads]
    (out / CARD_FILE).write_text(json.dumps(card.to_json(), indent=2) + "\n")


def load_model(model_dir) -> tuple[FusionEnsemble, ModelCard]:
    """Read a model folder written by :func:`save_model`; errors name the file at fault."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from .errors import PosterFusionError

    folder = Path(model_dir)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    for path in (card_path, weights_path):
        if not path.is_file():
            raise PosterFusionError(f"{path}: not found; a model folder holds {CARD_FILE} and {WEIGHTS_FILE} (made by 'fusion train')")
    try:
        card = ModelCard.from_json(json.loads(card_path.read_text()))
        head = card.head
        parts = card.cnn_parts or [[0, head["cnn_dim"]]] * card.ensemble  # older cards: one network
        model = FusionEnsemble([FusionHead(HeadConfig(**head | {"cnn_offset": o, "cnn_dim": d})) for o, d in parts])
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise PosterFusionError(f"{folder}: model card and weights do not fit together ({str(exc).splitlines()[0]})") from None
    return model.eval(), card


@torch.inference_mode()
def predict_proba(model: FusionHead | FusionEnsemble, x: Features, batch: int = 4096) -> np.ndarray:
    """Genre probabilities for feature rows, in batches (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.probabilities(*x.rows(slice(s, s + batch)).tensors(device)).float().cpu().numpy()
           for s in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.config.n_genres), np.float32)
