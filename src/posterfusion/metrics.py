"""Evaluation metrics for multi-label genre prediction, as reported by ``fusion evaluate``.

Every function takes plain arrays so the same code scores the fused model, each ablation and the
genre-frequency prior: ``y_true`` is an ``(N, G)`` 0/1 int array, ``y_prob`` an ``(N, G)`` float
array of per-genre probabilities and ``genres`` a list of the ``G`` genre names.

Two kinds of empty rows and columns need a rule, because real splits contain both:

* A genre with no positive poster has no defined average precision or recall. Its AP is NaN and
  it is left out of mAP and macro-F1, so a rare genre missing from a split does not count as a
  failure of the model.
* A poster with no true genre has no defined samples-F1 or top-n score. It is left out of those
  two, but its false positives still count in micro-F1 and the per-genre scores.
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from .files import atomic_path

# Tuned thresholds are clipped to this range: an optimum at an extreme score is set by one or
# two validation posters and does not carry over to the test split.
THRESHOLD_RANGE: tuple[float, float] = (0.02, 0.98)
# Threshold for genres with no validation positives, where there is nothing to tune against.
DEFAULT_THRESHOLD: float = 0.5


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both arrays as ``(N, G)`` int and float arrays, or raise on a shape mismatch."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_prob.shape:
        raise ValueError(
            f"y_true {y_true.shape} and y_prob {y_prob.shape} must be the same (N, G) shape"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    return y_true.astype(np.int64), y_prob


def average_precision_per_genre(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """Average precision of each genre, shape ``(G,)``.

    A genre with no positives gets NaN rather than sklearn's warning and 0: AP is undefined
    there, and NaN keeps the genre out of :func:`mean_average_precision`.
    """
    y_true, y_prob = _check(y_true, y_prob)
    ap = np.full(y_true.shape[1], np.nan)
    for g in np.flatnonzero(y_true.sum(axis=0) > 0):
        ap[g] = average_precision_score(y_true[:, g], y_prob[:, g])
    return ap


def mean_average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """mAP: the macro mean of per-genre AP over genres with at least one positive.

    NaN when no genre has a positive, since there is nothing to average.
    """
    ap = average_precision_per_genre(y_true, y_prob)
    defined = ap[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else math.nan


def top_n_accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Top-n accuracy as used in the poster-genre literature.

    For each poster with true genre set ``Y`` the ``|Y|`` most probable genres are taken and the
    poster scores ``hits / |Y|``; the result is the mean over posters with at least one true
    genre (a poster with none has no ``n``). Equal probabilities are ranked by genre order (a
    stable sort), so the score is deterministic. NaN when no poster has a true genre.
    """
    y_true, y_prob = _check(y_true, y_prob)
    n_true = y_true.sum(axis=1)
    keep = n_true > 0
    if not keep.any():
        return math.nan
    y_true, y_prob, n_true = y_true[keep], y_prob[keep], n_true[keep]
    order = np.argsort(-y_prob, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(y_prob.shape[1])[None, :], axis=1)
    hits = ((rank < n_true[:, None]) & (y_true == 1)).sum(axis=1)
    return float(np.mean(hits / n_true))


def tune_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, grid: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """Per-genre decision thresholds that maximise F1 on the given (validation) data, ``(G,)``.

    One global 0.5 cut suits neither rare genres (whose probabilities rarely reach it) nor
    common ones, so each genre gets its own. With ``grid=None`` every distinct probability of
    the genre is a candidate, which finds the exact F1 optimum; otherwise only the ``grid``
    values are tried. A poster is predicted positive when ``prob >= threshold``. Ties in F1 go
    to the lowest candidate, so the result is deterministic. The chosen threshold is clipped to
    :data:`THRESHOLD_RANGE`; a genre without positives gets :data:`DEFAULT_THRESHOLD`.

    Each genre costs one sort plus a binary search per candidate (no loop over posters), so
    N=10,000 and G=18 takes milliseconds.
    """
    y_true, y_prob = _check(y_true, y_prob)
    n, n_genres = y_true.shape
    thresholds = np.full(n_genres, DEFAULT_THRESHOLD)
    for g in range(n_genres):
        n_pos = int(y_true[:, g].sum())
        if n_pos == 0:
            continue
        order = np.argsort(y_prob[:, g], kind="stable")
        probs = y_prob[order, g]
        # positives_below[i]: positives among the i lowest-scored posters.
        positives_below = np.concatenate(([0], np.cumsum(y_true[order, g])))
        candidates = np.unique(probs if grid is None else np.asarray(grid, dtype=np.float64))
        n_below = np.searchsorted(probs, candidates, side="left")
        true_pos = n_pos - positives_below[n_below]
        predicted = n - n_below
        f1 = 2.0 * true_pos / (predicted + n_pos)
        thresholds[g] = candidates[int(np.argmax(f1))]
    return np.clip(thresholds, *THRESHOLD_RANGE)


def _json_float(value: float) -> float | None:
    """A python float, or None for NaN so the result stays strict JSON (``null``)."""
    value = float(value)
    return None if math.isnan(value) else value


def evaluate(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray, genres: Sequence[str]
) -> dict[str, Any]:
    """Every metric ``fusion evaluate`` reports, as a JSON-ready dict.

    Keys: ``map``, ``micro_f1``, ``macro_f1``, ``samples_f1``, ``top_n_accuracy``,
    ``n_posters`` and ``per_genre`` (a list of ``{genre, ap, f1, precision, recall, support,
    threshold}``). F1, precision and recall use the decisions ``y_prob >= thresholds`` with
    thresholds tuned on the validation split, never on the split being scored. mAP and macro-F1
    average over genres with positives; samples-F1 and top-n over posters with a true genre (see
    the module docstring). Undefined values (NaN) are written as None so ``json.dumps`` gives
    valid JSON.
    """
    y_true, y_prob = _check(y_true, y_prob)
    n_genres = y_true.shape[1]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (n_genres,) or len(genres) != n_genres:
        raise ValueError(
            f"need {n_genres} thresholds and genre names, got {thresholds.shape} and {len(genres)}"
        )
    y_pred = (y_prob >= thresholds[None, :]).astype(np.int64)
    support = y_true.sum(axis=0)
    with_pos = np.flatnonzero(support > 0)
    with_genre = y_true.sum(axis=1) > 0

    ap = average_precision_per_genre(y_true, y_prob)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average=None, labels=np.arange(n_genres), zero_division=0
    )
    macro_f1 = (
        f1_score(y_true, y_pred, average="macro", labels=with_pos, zero_division=0)
        if with_pos.size
        else math.nan
    )
    samples_f1 = (
        f1_score(y_true[with_genre], y_pred[with_genre], average="samples", zero_division=0)
        if with_genre.any()
        else math.nan
    )
    return {
        "map": _json_float(mean_average_precision(y_true, y_prob)),
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": _json_float(macro_f1),
        "samples_f1": _json_float(samples_f1),
        "top_n_accuracy": _json_float(top_n_accuracy(y_true, y_prob)),
        "n_posters": int(y_true.shape[0]),
        "per_genre": [
            {
                "genre": str(genres[g]),
                "ap": _json_float(ap[g]),
                "f1": float(f1[g]),
                "precision": float(precision[g]),
                "recall": float(recall[g]),
                "support": int(support[g]),
                "threshold": float(thresholds[g]),
            }
            for g in range(n_genres)
        ],
    }


def prior_scores(y_train: np.ndarray, n: int) -> np.ndarray:
    """The genre-frequency prior baseline: ``n`` rows, each the train-set genre frequencies.

    It ignores the poster, so its mAP is about each genre's prevalence and its top-n is what
    always guessing the most common genres earns; the ablation table needs it to show how much
    the image and detector features add.
    """
    y_train = np.asarray(y_train, dtype=np.float64)
    if y_train.ndim != 2 or y_train.shape[0] == 0:
        raise ValueError(f"y_train must be a non-empty (N, G) array, got shape {y_train.shape}")
    return np.tile(y_train.mean(axis=0), (n, 1))


def _cell(value: float | None, width: int) -> str:
    """A right-aligned 3-decimal cell, ``-`` for an undefined value."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def mean_sd(values: Sequence[float]) -> str:
    """``0.344 ± 0.001``: a figure over seeds as the results tables print it (no sd for one value)."""
    mean = float(np.mean(values))
    return f"{mean:.3f} ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else f"{mean:.3f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text per-genre table and summary lines for a terminal, from :func:`evaluate`.

    Plain text so the CLI can print it as is or wrap it, and so it reads the same in logs.
    """
    rows = result["per_genre"]
    name_width = max([len("genre"), *(len(r["genre"]) for r in rows)])
    header = f"{'genre':<{name_width}} {'AP':>6} {'F1':>6} {'P':>6} {'R':>6} {'support':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = " ".join(_cell(r[k], 6) for k in ("ap", "f1", "precision", "recall"))
        lines.append(f"{r['genre']:<{name_width}} {cells} {r['support']:>8d}")
    lines.append("-" * len(header))
    summary = (
        ("mAP", "map"),
        ("micro-F1", "micro_f1"),
        ("macro-F1", "macro_f1"),
        ("samples-F1", "samples_f1"),
        ("top-n accuracy", "top_n_accuracy"),
    )
    for label, key in summary:
        lines.append(f"{label:<15}{_cell(result[key], 6).strip()}")
    lines.append(f"{'posters':<15}{result['n_posters']}")
    return "\n".join(lines)


def plot_precision_recall(
    y_true: np.ndarray, y_prob: np.ndarray, genres: Sequence[str], path: str | PathLike[str]
) -> None:
    """Write one PNG with a thin precision-recall curve per genre and the micro average in bold.

    The legend gives each genre's AP so the figure can be read without the table. Genres without
    positives have no curve. matplotlib is imported here, not at module level, because it is
    slow to import and most CLI commands never plot; the Agg canvas is used directly so no
    display and no global pyplot state are involved.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve

    y_true, y_prob = _check(y_true, y_prob)
    if len(genres) != y_true.shape[1]:
        raise ValueError(f"need {y_true.shape[1]} genre names, got {len(genres)}")
    ap = average_precision_per_genre(y_true, y_prob)
    # The default cycle repeats after 10 colours; tab20 keeps up to 20 genres apart.
    cmap = colormaps["tab20" if len(genres) <= 20 else "turbo"]
    colors = cmap(np.linspace(0.0, 1.0, len(genres)))

    fig = Figure(figsize=(9, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g in np.flatnonzero(~np.isnan(ap)):
        precision, recall, _ = precision_recall_curve(y_true[:, g], y_prob[:, g])
        ax.plot(
            recall, precision, color=colors[g], linewidth=0.8, drawstyle="steps-post",
            label=f"{genres[g]} (AP {ap[g]:.3f})",
        )
    if y_true.any():
        precision, recall, _ = precision_recall_curve(y_true.ravel(), y_prob.ravel())
        micro_ap = average_precision_score(y_true, y_prob, average="micro")
        ax.plot(
            recall, precision, color="black", linewidth=2.5, drawstyle="steps-post",
            label=f"micro-average (AP {micro_ap:.3f})",
        )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Precision-recall per genre")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
