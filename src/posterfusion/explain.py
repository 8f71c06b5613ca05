"""Why a poster got its genres: the boxes behind the evidence, an occlusion heat map over the
picture, and how much each group of detector features moved each genre.

``fusion predict`` reports counts ("person x4, 1 face (sad)") read back from the cached feature
vector; drawing them needs the detections themselves, so :func:`explain` runs the detectors on
the decoded poster once more. The heat map hides one cell of the poster at a time from the CNN
branch (the detector and text features stay as they are) and records how far each top genre's
probability falls: occlusion needs no gradients, so it works on the onnxruntime backbone the CPU
uses. Contributions replace one group of features (a COCO class, the faces, the expressions, the
colours, the text, the CNN embedding) by its training mean, where the head's standardisation puts
it at zero, and record the change: positive means the poster's own value pushed the genre up.
Where the model has a word model, "words read" is the change it makes to the final probability
(the words OCR read against none read).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .detectors import schema
from .detectors.base import COCO_CLASSES, EXPRESSIONS, Detections
from .features import Features
from .model import predict_proba
from .predict import Prediction, Predictor

GRID_ROWS, GRID_COLS = 6, 4
"""Occlusion cells over the poster: about square on a 2:3 poster, 24 CNN passes per poster."""
OCCLUSION_BATCH = 4
"""Occluded posters embedded per call: bounds the explanation's memory (fusion serve's peak)."""
TOP_GENRES = 3
"""Genres explained per poster: the most probable ones."""
TOP_CONTRIBUTIONS = 5
"""Feature groups listed per genre, the largest changes either way."""


@dataclass
class TextBox:
    text: str
    score: float
    box: tuple[float, float, float, float]  # fractions of the poster, like Detections


@dataclass
class Explanation:
    """What :func:`explain` found for one poster; boxes are fractions of the poster."""

    objects: Detections
    faces: Detections
    expressions: np.ndarray  # (n_faces, 7) probabilities
    text: list[TextBox] = field(default_factory=list)
    heat: dict[str, np.ndarray] = field(default_factory=dict)  # genre -> (GRID_ROWS, GRID_COLS) probability drop
    contributions: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # genre -> [(group, change)]

    def to_json(self) -> dict:
        """The explanation as ``predict --json`` and the API return it (rounded for reading)."""
        return {
            "objects": [{"label": COCO_CLASSES[int(c)], "score": round(float(s), 3), "box": _rounded(b)}
                        for b, s, c in zip(self.objects.boxes, self.objects.scores, self.objects.labels)],
            "faces": [{"score": round(float(s), 3), "expression": EXPRESSIONS[int(e.argmax())], "box": _rounded(b)}
                      for b, s, e in zip(self.faces.boxes, self.faces.scores, self.expressions)],
            "text": [{"text": t.text, "score": round(t.score, 3), "box": _rounded(t.box)} for t in self.text],
            "heat_map": {g: np.round(h.astype(np.float64), 4).tolist() for g, h in self.heat.items()},
            "contributions": {g: [{"feature": name, "change": round(change, 4)} for name, change in items]
                              for g, items in self.contributions.items()},
        }


def _rounded(box) -> list[float]:
    return [round(float(v), 4) for v in box]


def feature_groups() -> dict[str, np.ndarray]:
    """Detector columns grouped the way a person names them: one group per COCO class, then the
    people layout, the faces, their expressions and the colours."""
    index = {name: i for i, name in enumerate(schema.COLUMNS)}
    groups = {c: np.array([index[f"obj_{c.replace(' ', '_')}_{s}"] for s in ("count", "maxconf", "area")])
              for c in COCO_CLASSES}
    for name, columns in (("people layout", schema.PERSON_COLUMNS), ("faces", schema.FACE_COLUMNS),
                          ("expressions", schema.EXPRESSION_COLUMNS), ("colours", schema.IMAGE_COLUMNS)):
        groups[name] = np.array([index[c] for c in columns])
    return groups


@torch.inference_mode()
def explain(predictor: Predictor, rgb: np.ndarray, prediction: Prediction) -> Explanation:
    """Boxes, heat maps and contributions for one decoded poster and its prediction."""
    models = predictor.models
    objects, faces, expressions, detector_row = Detections.empty(), Detections.empty(), np.zeros((0, len(EXPRESSIONS))), None
    if models.detectors is not None:
        prepared = [models.detectors.preparer(rgb)]
        detector_row, evidence = models.detectors.assemble(prepared, models.detectors.detect_objects(prepared),
                                                           models.detectors.detect_faces(prepared))
        objects, faces, expressions = _counted(evidence[0].objects), evidence[0].faces, evidence[0].expressions
    text_boxes, text_row = [], None
    if models.text is not None:
        from .detectors import text as text_module

        lines, detected, area = models.text.read(text_module.prepare(rgb))
        text_boxes = [TextBox(line.text, line.score, line.box) for line in lines]
        text_row = schema.text_features(lines, detected, area)[None]
    cnn_row, prepared_cnn = None, None
    if models.backbone is not None:
        prepared_cnn = models.backbone.prepare(rgb)
        cnn_row = models.backbone.embed(prepared_cnn[None].to(models.device)).float().cpu().numpy()
    genres = [g for g, _ in prediction.top(TOP_GENRES)]
    columns = [predictor.genres.index(g) for g in genres]
    result = Explanation(objects, faces, expressions, text_boxes)
    poster = Features(cnn_row, detector_row, text_row)
    if prepared_cnn is not None:
        base = predict_proba(predictor.head, poster)[0, columns]
        heat = _occlusion(predictor, prepared_cnn, poster)[:, columns]
        result.heat = {g: (base[k] - heat[:, k]).reshape(GRID_ROWS, GRID_COLS) for k, g in enumerate(genres)}
    read = " / ".join(t.text for t in text_boxes) if models.text is not None else None
    result.contributions = contributions(predictor, poster, read, genres)
    return result


def _counted(found: Detections) -> Detections:
    """The detections the features count (the weaker ones only enter as a class's best score)."""
    keep = found.scores >= schema.COUNT_THRESHOLD
    return Detections(found.boxes[keep], found.scores[keep], found.labels[keep])


def _occlusion(predictor: Predictor, prepared: torch.Tensor, poster: Features) -> np.ndarray:
    """Genre probabilities with each grid cell of the CNN's input greyed out, (cells, genres)."""
    backbone, device = predictor.models.backbone, predictor.models.device
    _, height, width = prepared.shape
    ys = np.linspace(0, height, GRID_ROWS + 1).round().astype(int)
    xs = np.linspace(0, width, GRID_COLS + 1).round().astype(int)
    grey = prepared.float().mean(dim=(1, 2)).round().to(torch.uint8)[:, None, None]
    hidden = prepared[None].repeat(GRID_ROWS * GRID_COLS, 1, 1, 1)
    for r in range(GRID_ROWS):
        for c in range(GRID_COLS):
            hidden[r * GRID_COLS + c, :, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = grey
    # A few cells at a time: all 24 at once (x2 views, two networks) held ~2 GB of activations.
    embeddings = np.concatenate([backbone.embed(hidden[s : s + OCCLUSION_BATCH].to(device)).float().cpu().numpy()
                                 for s in range(0, len(hidden), OCCLUSION_BATCH)])
    tiled = poster.rows(np.zeros(len(embeddings), np.int64))  # the poster's other groups, once per cell
    return predict_proba(predictor.head, Features(embeddings, tiled.detectors, tiled.text))


def _bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log2(p / (1 - p))


def _training_mean(norm) -> np.ndarray:
    """The raw feature values a head's :class:`~posterfusion.model.Standardizer` maps to zero."""
    mean = norm.mean.cpu().numpy()
    return np.where(norm.log_mask.cpu().numpy(), np.expm1(mean), mean).astype(np.float32)


def contributions(predictor: Predictor, poster: Features, read: str | None, genres: list[str],
                  top: int = TOP_CONTRIBUTIONS, log_odds: bool = False) -> dict[str, list[tuple[str, float]]]:
    """Per genre, the ``top`` feature groups whose own values moved its probability most, with the
    change (positive: the poster's value pushed the genre up). Works from one poster's feature rows
    alone, so cached posters are explained without decoding them again.
    ``read``: the text OCR read, for the word model's part (the final probability with it against
    with none read); None leaves the words out. ``log_odds``: changes in bits of log-odds instead of
    probability, which still tell apart what moved a genre the model is nearly sure of (or nearly
    sure is not there), where probabilities barely move."""
    head = predictor.head.heads[0]  # every head of an ensemble is standardised on the same rows
    columns = [predictor.genres.index(g) for g in genres]
    names, variants = [""], [poster]  # the poster as it is, then with one group at its training mean
    if poster.detectors is not None and head.use_detectors:
        mean = _training_mean(head.detector_norm)
        for name, idx in feature_groups().items():
            changed = poster.detectors.copy()
            changed[0, idx] = mean[idx]
            names.append(name)
            variants.append(replace(poster, detectors=changed))
    if poster.text is not None and head.use_text:
        names.append("text read")
        variants.append(replace(poster, text=_training_mean(head.text_norm)[None]))
    if poster.cnn is not None and head.use_cnn:
        names.append("picture (CNN)")
        variants.append(replace(poster, cnn=predictor.head.cnn_training_mean()[None]))
    scale = _bits if log_odds else (lambda p: p)
    probabilities = predict_proba(predictor.head, Features.join(variants))
    changes = scale(probabilities[0, columns][None, :]) - scale(probabilities[1:, columns])
    names = names[1:]
    if predictor.words is not None and read is not None:
        with_words, blank = (scale(predictor.words.mix(probabilities[:1], [d])[0, columns]) for d in (read, ""))
        changes = np.concatenate([changes, (with_words - blank)[None]])
        names.append("words read")
    out = {}
    for k, genre in enumerate(genres):
        order = np.argsort(-np.abs(changes[:, k]))[:top]
        out[genre] = [(names[i], float(changes[i, k])) for i in order if abs(changes[i, k]) >= 1e-4]
    return out
