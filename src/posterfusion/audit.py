"""``fusion audit``: a labelled catalogue checked against its posters.

People who label posters at scale mostly have genres already; what they ask is which records to
look at. Two kinds of finding answer it, each with a score to sort by:

* **not conveyed**: a labelled genre the poster gives little evidence of (a horror film whose
  poster reads as a romance, or a label that is simply wrong);
* **probably missing**: a genre the record lacks that the poster strongly suggests.

Scores are in bits. A labelled genre scores the halvings between its probability and its decision
threshold (tuned on validation when the model was trained, so it accounts for how often and how
confidently the model predicts the genre): at a quarter of the threshold, 2. An unlabelled genre
scores its log-odds, log2(p / (1 - p)): at p = 0.8, 2. These orderings were chosen on the
validation split of labels corrupted on purpose (``scripts/audit_precision.py``): for missing
genres the probability itself ranked the dropped ones better than the threshold ratio, which
favours rare genres with low thresholds; for labels not conveyed the threshold ratio was as good
as the probability or better. ``docs/results.md`` has the figures on the test split.

Each finding carries its evidence: the feature groups that moved that genre most, in bits of
log-odds (the contributions ``predict --annotate`` draws, computed from the poster's features, so
cached posters are explained without decoding them again), and what the detectors saw and OCR read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import PosterFusionError
from .explain import contributions
from .extract import Progress
from .features import Features, stream_features
from .predict import Predictor

NOT_CONVEYED, MISSING = "not conveyed", "probably missing"
KINDS = (NOT_CONVEYED, MISSING)
MIN_SCORE = {NOT_CONVEYED: 1.0, MISSING: 0.0}
"""A finding's least score: a labelled genre at half its threshold or below (about half of all
labels sit below the threshold itself: too many to read), an unlabelled one at even odds or above
(and above its threshold: a genre ``fusion predict`` would give the poster)."""
EVIDENCE = 3
"""Feature groups named per finding, ..."""
EVIDENCE_MIN = 0.05
"""... those that moved its log-odds by this many bits at least (smaller changes explain nothing).
Bits, not probability: a genre the model is nearly sure of, either way, barely moves in probability."""


@dataclass
class Finding:
    kind: str
    genre: str
    score: float
    probability: float
    threshold: float
    evidence: list[tuple[str, float]] = field(default_factory=list)  # (feature group, change in bits of log-odds)


@dataclass
class PosterAudit:
    """One catalogue record checked: its labels (those the model knows), the model's view, findings."""

    path: str
    labelled: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    seen: dict = field(default_factory=dict)  # what the detectors saw and OCR read (predict's evidence)
    error: str = ""

    @property
    def top_score(self) -> float:
        return max((f.score for f in self.findings), default=0.0)


def finding_scores(probabilities: np.ndarray, labelled: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(posters, genres) scores: log2(threshold / p) where labelled, log2(p / (1 - p)) where not, so
    a large score is a label the poster contradicts or a genre it shows that the record lacks."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-6, 1 - 1e-6)
    return np.where(labelled, np.log2(np.asarray(thresholds, np.float64)[None, :] / p), np.log2(p / (1 - p)))


def findings_mask(probabilities: np.ndarray, labelled: np.ndarray, thresholds: np.ndarray,
                  scores: np.ndarray | None = None) -> np.ndarray:
    """Which (poster, genre) pairs are findings (see :data:`MIN_SCORE`); ``scores``: their
    :func:`finding_scores`, where the caller has them already."""
    scores = finding_scores(probabilities, labelled, thresholds) if scores is None else scores
    above = np.asarray(probabilities) >= np.asarray(thresholds)[None, :]
    return np.where(labelled, scores >= MIN_SCORE[NOT_CONVEYED], (scores >= MIN_SCORE[MISSING]) & above)


class Auditor:
    """A :class:`~posterfusion.predict.Predictor` turned on a catalogue's own labels."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.genres = predictor.genres

    def known(self, labels: list[str]) -> list[str]:
        return [g for g in labels if g in self.genres]

    def unknown(self, records: list[tuple[str, list[str]]]) -> dict[str, int]:
        """The catalogue's genre names the model does not know, with how many posters carry each:
        said once for the catalogue, not per poster."""
        counts = Counter(g for _, labels in records for g in labels if g not in self.genres)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def stream(self, records: list[tuple[str, list[str]]], cache_dir: str | Path | None = None,
               batch_size: int = 32, progress: Progress | None = None) -> Iterator[list[PosterAudit]]:
        """One list of :class:`PosterAudit` per batch of ``(poster path, labelled genres)``, in order;
        unreadable posters carry their error."""
        paths = [path for path, _ in records]
        for table in stream_features(paths, self.predictor.models, cache_dir, batch_size, progress=progress):
            predictions = self.predictor.predictions(table)
            audits = [PosterAudit(p.path, self.known(records[table.start + k][1]), p.genres, p.probabilities,
                                  seen=p.evidence, error=p.error) for k, p in enumerate(predictions)]
            checked = [audits[position - table.start] for position in table.rows]
            if not checked:
                yield audits
                continue
            thresholds = self.predictor.thresholds
            probabilities = np.array([[a.probabilities[g] for g in self.genres] for a in checked])
            labelled = np.array([np.isin(self.genres, a.labelled) for a in checked])
            scores = finding_scores(probabilities, labelled, thresholds)
            found = findings_mask(probabilities, labelled, thresholds, scores)
            for r in np.flatnonzero(found.any(1)):
                read = table.text_read[r] if table.text_read is not None else None
                self._find(checked[r], table.features.rows(slice(r, r + 1)), read, np.flatnonzero(found[r]),
                           probabilities[r], labelled[r], scores[r])
            yield audits

    def _find(self, audit: PosterAudit, features: Features, read: str | None, found: np.ndarray,
              probabilities: np.ndarray, labelled: np.ndarray, scores: np.ndarray) -> None:
        """The poster's findings (genres ``found``), highest score first, each with the groups that
        moved its genre."""
        why = contributions(self.predictor, features, read, [self.genres[i] for i in found], top=EVIDENCE,
                            log_odds=True)
        audit.findings = sorted(
            (Finding(NOT_CONVEYED if labelled[i] else MISSING, self.genres[i], round(float(scores[i]), 4),
                     round(float(probabilities[i]), 4), round(float(self.predictor.thresholds[i]), 4),
                     [(name, round(change, 4)) for name, change in why[self.genres[i]] if abs(change) >= EVIDENCE_MIN])
             for i in found),
            key=lambda f: -f.score,
        )


def catalogue_records(manifest_path: str | Path) -> list[tuple[str, list[str]]]:
    """``(poster path, genres)`` per row of a labelled manifest."""
    from .manifest import load_manifest

    manifest = load_manifest(manifest_path)
    if not manifest.labelled:
        raise PosterFusionError(f"{manifest_path}: an audit checks labels, and this manifest has no 'genres' column "
                                "(fusion predict labels unlabelled posters)")
    return list(zip(manifest.paths, manifest.table["genre_list"]))


class AuditLayout:
    """How :class:`PosterAudit` records are written (see :mod:`posterfusion.outputs`): a row per
    poster, so a rerun knows what is done; ``top_score`` sorts the records to look at first."""

    def __init__(self, genres: list[str]) -> None:
        self.genres = genres

    def header(self) -> list[str]:
        return ["poster", "labelled", "predicted", "not_conveyed", "probably_missing", "top_score", *self.genres,
                "findings", "evidence", "error"]

    def row(self, a: PosterAudit) -> list[str]:
        probabilities = [f"{a.probabilities[g]:.4f}" if a.probabilities else "" for g in self.genres]
        return [a.path, "|".join(a.labelled), "|".join(a.predicted), _named(a, NOT_CONVEYED), _named(a, MISSING),
                f"{a.top_score:.4f}", *probabilities, json.dumps(_findings_json(a)),
                json.dumps(a.seen) if a.seen else "", a.error]

    def record(self, a: PosterAudit) -> dict:
        return {"poster": a.path, "labelled": a.labelled, "predicted": a.predicted, "top_score": round(a.top_score, 4),
                "findings": _findings_json(a), "probabilities": a.probabilities, "evidence": a.seen,
                "error": a.error or None}

    def arrow_schema(self):
        import pyarrow as pa

        return pa.schema([("poster", pa.string()), ("labelled", pa.list_(pa.string())),
                          ("predicted", pa.list_(pa.string())), ("top_score", pa.float32()),
                          *[(g, pa.float32()) for g in self.genres], ("findings", pa.string()),
                          ("evidence", pa.string()), ("error", pa.string())])

    def arrow_columns(self, batch: list[PosterAudit]) -> dict[str, list]:
        return {
            "poster": [a.path for a in batch],
            "labelled": [a.labelled for a in batch],
            "predicted": [a.predicted for a in batch],
            "top_score": [a.top_score for a in batch],
            **{g: [a.probabilities.get(g) for a in batch] for g in self.genres},
            "findings": [json.dumps(_findings_json(a)) for a in batch],
            "evidence": [json.dumps(a.seen) if a.seen else None for a in batch],
            "error": [a.error or None for a in batch],
        }

    def text(self, a: PosterAudit) -> list[str]:
        """The posters with findings, each finding on its line with its evidence."""
        if a.error or not a.findings:
            return []
        lines = [f"{a.path}: labelled {' | '.join(a.labelled) or '(none the model knows)'}; "
                 f"the poster says {' | '.join(a.predicted)}"]
        for f in a.findings:
            why = ", ".join(f"{name} {change:+.2f}" for name, change in f.evidence)
            lines.append(f"    {f.kind}: {f.genre} (score {f.score:.2f}, p {f.probability:.2f} against "
                         f"threshold {f.threshold:.2f}){'; moved (bits) by ' + why if why else ''}")
        return lines


def _named(a: PosterAudit, kind: str) -> str:
    return "|".join(f.genre for f in a.findings if f.kind == kind)


def _findings_json(a: PosterAudit) -> list[dict]:
    return [asdict(f) | {"evidence": [[name, change] for name, change in f.evidence]} for f in a.findings]


def read_audits(path: Path) -> list[PosterAudit]:
    """The records of an audit results file (any of its formats), for the report of a run that
    resumed: what earlier runs wrote counts as much as what this one did."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        frame = pd.read_json(path, lines=True, dtype=False)
    audits = []
    for row in frame.to_dict("records"):
        findings = row["findings"] if isinstance(row["findings"], list) else json.loads(row["findings"] or "[]")
        evidence = row.get("evidence")
        audits.append(PosterAudit(
            row["poster"], _listed(row["labelled"]), _listed(row["predicted"]),
            findings=[Finding(**f | {"evidence": [tuple(e) for e in f["evidence"]]}) for f in findings],
            seen=json.loads(evidence) if isinstance(evidence, str) and evidence else evidence or {},
            error=row["error"] if isinstance(row.get("error"), str) else "",  # JSON null reads as NaN
        ))
    return audits


def _listed(value) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.split("|") if v]
    return list(value) if value is not None else []
