"""Honest evaluation of a trained model on a labelled manifest of posters it has not seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics
from .errors import PosterFusionError
from .extract import Progress
from .features import gather
from .manifest import label_matrix, load_manifest
from .predict import Predictor


def evaluate_manifest(manifest_path: str | Path, predictor: Predictor, cache_dir: str | Path | None = None,
                      split: str | None = None, plot: str | Path | None = None,
                      progress: Progress | None = None, report: str | Path | None = None) -> dict:
    """Metrics of ``predictor`` on the manifest (or on its rows of one ``split``); ``report``: an
    HTML file that shows them with the posters behind them (see :mod:`posterfusion.report`)."""
    manifest = load_manifest(manifest_path)
    if not manifest.labelled:
        raise PosterFusionError(f"{manifest_path}: evaluation needs a 'genres' column")
    if split is not None:
        if "split" not in manifest.table.columns:
            raise PosterFusionError(f"{manifest_path}: --split {split} given but the manifest has no 'split' column")
        keep = manifest.table["split"].fillna("").str.strip().str.lower() == split.lower()
        if not keep.any():
            raise PosterFusionError(f"{manifest_path}: no rows with split '{split}'")
        manifest.table = manifest.table[keep].reset_index(drop=True)
    genres = predictor.genres
    unknown = sorted({g for gl in manifest.table["genre_list"] for g in gl} - set(genres))
    table = gather(manifest.paths, predictor.models, cache_dir, progress=progress)
    if not len(table.rows):
        raise PosterFusionError(f"{manifest_path}: none of its posters could be read")
    probs = predictor.probabilities(table)
    y = label_matrix(manifest, table.rows, genres)
    result = metrics.evaluate(y, probs, predictor.thresholds, genres)
    frequency = predictor.card.train_genre_frequency
    if frequency is not None:
        prior = np.tile(np.asarray(frequency, np.float32), (len(y), 1))
        result["prior_map"] = metrics.mean_average_precision(y, prior)
    result["unknown_genres"] = unknown
    result["unreadable_posters"] = [{"path": p, "reason": r} for p, r in table.failures]
    result["model"] = str(predictor.model_dir)
    if plot is not None:
        metrics.plot_precision_recall(y, probs, genres, plot)
    if report is not None:
        from .report import write_report

        rows, paths, labels = table.rows.tolist(), manifest.paths, manifest.table["genre_list"].tolist()
        title = f"posterfusion evaluation: {Path(manifest_path).name}" + (f", split {split}" if split else "")
        write_report(report, result, y, probs, [paths[i] for i in rows], [labels[i] for i in rows], genres,
                     predictor.thresholds, title)
    return result
