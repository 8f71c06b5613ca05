"""Genres for posters from a trained model: features (cached or on the fly) -> head -> thresholds.

A model only runs on features from exactly the detectors, backbone and schema it was trained on;
anything else is refused with a message that says what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .detectors import schema
from .detectors.base import COCO_CLASSES, EXPRESSIONS
from .errors import PosterFusionError
from . import frozen
from .extract import Progress
from .features import FeatureTable, stream_features
from .model import CARD_FILE, ModelCard, load_model, predict_proba
from .weights import objects_from_card, weights_dir
from .words import WordModel

DEFAULT_MODEL = "default_model"


def default_model_dir() -> Path:
    return weights_dir() / DEFAULT_MODEL


def sample_images() -> list[Path]:
    """The images that ship inside posterfusion (samples/README.md): a demo that needs no data of
    one's own."""
    from importlib import resources

    return sorted(Path(str(resources.files("posterfusion") / "samples")).glob("*.jpg"))


@dataclass
class Prediction:
    path: str
    genres: list[str] = field(default_factory=list)  # above their thresholds, most probable first
    probabilities: dict[str, float] = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    error: str = ""

    def top(self, k: int) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


class Predictor:
    """A trained model with the frozen models it needs, loaded once, used for many posters."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "auto", objects: str | None = None,
                 words: bool = True) -> None:
        """``objects``: the user's object detector, needed where the card names a file (see
        :func:`~posterfusion.weights.objects_from_card`). ``words`` False leaves a model's word
        model out, with the head's own thresholds: no OCR (unless the head has a text branch), so
        ~3x faster on a CPU, for the accuracy the word model adds."""
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.head, self.card = load_model(self.model_dir)
        config = self.card.config
        use_words = self.card.has_words and words
        weights_file = (self.card.backbone or {}).get("weights_file")  # a fine-tuned backbone
        self.models = frozen.create_frozen_models(
            objects=objects_from_card(config["objects"], objects, self.model_dir / CARD_FILE) if self.card.detectors else None,
            backbone=config["backbone"] if self.card.backbone else None,
            device=device,
            backbone_weights=self.model_dir / weights_file if weights_file else None,
            backbone_view=config.get("backbone_view"),
            text=bool(self.card.text) and (use_words or self.head.config.text_dim > 0),
        )
        check_compatible(self.card, self.models, self.model_dir)
        self.words = WordModel.load(self.model_dir) if use_words else None
        self.genres: list[str] = self.card.genres
        thresholds = self.card.words["head_thresholds"] if self.card.has_words and not use_words else self.card.thresholds
        self.thresholds = np.asarray(thresholds, np.float32)

    def stream(self, paths: Iterable[str], cache_dir: str | Path | None = None, batch_size: int = 32,
               progress: Progress | None = None) -> Iterator[list[Prediction]]:
        """A list of :class:`Prediction` per batch of ``paths``, in input order, as soon as the models
        have done the batch; unreadable posters carry their error.

        ``paths`` may be lazy (a folder walk, a pipe): they are read as the run goes, and nothing
        of a batch is kept once it is handed over, so memory does not grow with the posters.
        """
        for table in stream_features(paths, self.models, cache_dir, batch_size, progress=progress):
            yield self.predictions(table)

    def predict(self, paths: Iterable[str], cache_dir: str | Path | None = None, batch_size: int = 32,
                progress: Progress | None = None) -> list[Prediction]:
        """One :class:`Prediction` per path, in order (:meth:`stream`, joined)."""
        return [p for batch in self.stream(paths, cache_dir, batch_size, progress) for p in batch]

    def probabilities(self, table: FeatureTable) -> np.ndarray:
        """Genre probabilities of a batch's posters with features: the head's, moved by the word
        model's reading of their text where the model has one."""
        if not len(table.rows):
            return np.zeros((0, len(self.genres)), np.float32)
        probs = predict_proba(self.head, table.features)
        return probs if self.words is None else self.words.mix(probs, table.text_read)

    def predictions(self, table: FeatureTable) -> list[Prediction]:
        """The model and the thresholds on one batch of features, a :class:`Prediction` per poster
        the batch covers (unreadable ones with their error)."""
        probs = self.probabilities(table)
        out = [Prediction(p) for p in table.paths]
        for position, reason in table.errors().items():
            out[position - table.start].error = reason
        for r, row in enumerate(table.rows):
            pred = out[row - table.start]
            pred.probabilities = {g: float(p) for g, p in zip(self.genres, probs[r])}
            chosen = [g for g, p, t in zip(self.genres, probs[r], self.thresholds) if p >= t]
            # Every poster has some genre: if none clears its threshold, take the most probable.
            pred.genres = sorted(chosen, key=lambda g: -pred.probabilities[g]) or [self.genres[int(probs[r].argmax())]]
            if table.features.detectors is not None:
                pred.evidence = evidence_from_features(table.features.detectors[r])
            if table.text_read is not None:
                pred.evidence["read"] = table.text_read[r]
        return out


def check_compatible(card: ModelCard, models: frozen.FrozenModels, where: Path) -> None:
    """Refuse a model whose features would come from other detectors, backbone or schema."""
    if card.detectors and card.detectors != models.detectors.identity:
        raise PosterFusionError(
            f"{where}: model was trained on detector features {_short(card.detectors)}, "
            f"but this installation produces {_short(models.detectors.identity)}; retrain with 'fusion train'"
        )
    trained = {k: v for k, v in (card.backbone or {}).items() if k not in ("weights_file", "fine_tuned_from")}
    if trained and trained != models.backbone.identity:
        raise PosterFusionError(
            f"{where}: model was trained on backbone {card.backbone.get('name')} "
            f"({card.backbone.get('weights_sha256', '')[:12]}), not {models.backbone.identity['name']} "
            f"({models.backbone.identity['weights_sha256'][:12]}); retrain with 'fusion train'"
        )
    if card.text and models.text is not None and card.text != models.text.identity:
        raise PosterFusionError(
            f"{where}: model was trained on text read by {card.text.get('name')} with other settings than "
            f"this installation's ({models.text.identity.get('package')}); retrain with 'fusion train'"
        )
    if card.feature_schema and card.feature_schema["version"] != schema.SCHEMA_VERSION:
        raise PosterFusionError(
            f"{where}: model uses feature schema v{card.feature_schema['version']}, this installation v{schema.SCHEMA_VERSION}"
        )


def _short(identity: dict) -> str:
    from .cache import identity_digest

    return f"{identity.get('objects', {}).get('name', '?')}/schema v{identity.get('schema_version')} ({identity_digest(identity)})"


_COL = {name: i for i, name in enumerate(schema.COLUMNS)}


def evidence_lines(evidence: dict) -> list[str]:
    """What the detectors saw and OCR read, in words ("saw: person x2; 1 face (sad)", "read: ..."):
    the terminal's lines, and the audit report's."""
    lines = []
    if "objects" in evidence:
        objs = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in list(evidence["objects"].items())[:6]) or "no objects"
        faces = evidence["faces"]
        expr = f" ({evidence['expression']})" if faces else ""
        lines.append(f"saw: {objs}; {faces} face{'s' if faces != 1 else ''}{expr}")
    if "read" in evidence:
        lines.append(f"read: {evidence['read'] or '(no text)'}")
    return lines


def evidence_from_features(row: np.ndarray) -> dict:
    """What the detectors saw, read back from the feature vector (so cached posters explain too)."""
    objects = {}
    for cls in COCO_CLASSES:
        count = int(row[_COL[f"obj_{cls.replace(' ', '_')}_count"]])
        if count:
            objects[cls] = count
    faces = int(row[_COL["face_count"]])
    evidence: dict = {"objects": dict(sorted(objects.items(), key=lambda kv: -kv[1])), "faces": faces}
    if faces:
        means = np.array([row[_COL[f"expr_{e}_mean"]] for e in EXPRESSIONS])
        evidence["expression"] = EXPRESSIONS[int(means.argmax())]
        evidence["expression_probability"] = round(float(means.max()), 3)
    return evidence
