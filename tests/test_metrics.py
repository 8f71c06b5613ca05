"""Tests for posterfusion.metrics: small hand-worked cases plus seeded synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from helpers import assert_figure_has_content

from posterfusion.metrics import (
    DEFAULT_THRESHOLD,
    THRESHOLD_RANGE,
    average_precision_per_genre,
    evaluate,
    format_table,
    mean_average_precision,
    plot_precision_recall,
    prior_scores,
    top_n_accuracy,
    tune_thresholds,
)

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def _random_labels(rng: np.random.Generator, n: int, prevalence: np.ndarray) -> np.ndarray:
    return (rng.random((n, len(prevalence))) < prevalence).astype(np.int64)


def _f1_at(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Brute-force F1 of one genre at each threshold (sklearn per threshold is too slow)."""
    pred = p[None, :] >= thresholds[:, None]
    true_pos = (pred & (y[None, :] == 1)).sum(axis=1)
    return 2.0 * true_pos / (pred.sum(axis=1) + y.sum())


def _imbalanced(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """One rare genre whose positives score higher than negatives but mostly below 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 1)) < 0.05).astype(np.int64)
    logits = np.where(y == 1, -0.8, -3.0) + rng.normal(0.0, 0.7, size=(n, 1))
    return y, 1.0 / (1.0 + np.exp(-logits))


def test_perfect_predictions_score_one() -> None:
    rng = np.random.default_rng(0)
    y = _random_labels(rng, 200, np.array([0.3, 0.5, 0.2, 0.4]))
    y[0] = [1, 0, 0, 0]  # every genre has positives
    y[1] = [0, 1, 1, 1]
    prob = y.astype(float)
    thresholds = tune_thresholds(y, prob)

    result = evaluate(y, prob, thresholds, GENRES)

    assert mean_average_precision(y, prob) == pytest.approx(1.0)
    assert top_n_accuracy(y, prob) == pytest.approx(1.0)
    for key in ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy"):
        assert result[key] == pytest.approx(1.0), key
    assert all(row["f1"] == pytest.approx(1.0) for row in result["per_genre"])


def test_top_n_hand_worked() -> None:
    # Genres A, B, C.
    y = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    prob = np.array(
        [
            [0.9, 0.1, 0.8],  # Y={A,B}, top-2={A,C}: 1 hit of 2 -> 0.5
            [0.2, 0.3, 0.7],  # Y={C}, top-1={C} -> 1.0
            [0.9, 0.9, 0.9],  # no true genre: excluded, not counted as 0
        ]
    )
    assert top_n_accuracy(y[:1], prob[:1]) == pytest.approx(0.5)
    assert top_n_accuracy(y, prob) == pytest.approx(0.75)


def test_top_n_ties_follow_genre_order() -> None:
    y = np.array([[0, 1, 0], [1, 0, 0]])
    prob = np.full((2, 3), 0.4)
    # With equal probabilities the top-1 is always genre 0.
    assert top_n_accuracy(y[:1], prob[:1]) == 0.0
    assert top_n_accuracy(y[1:], prob[1:]) == 1.0
    assert top_n_accuracy(y, prob) == pytest.approx(0.5)


def test_top_n_without_true_genres_is_nan() -> None:
    assert np.isnan(top_n_accuracy(np.zeros((3, 2), int), np.full((3, 2), 0.5)))


def test_random_predictions_give_map_near_prevalence() -> None:
    rng = np.random.default_rng(1)
    prevalence = np.array([0.05, 0.15, 0.3, 0.5])
    y = _random_labels(rng, 20_000, prevalence)
    prob = rng.random(y.shape)

    ap = average_precision_per_genre(y, prob)

    np.testing.assert_allclose(ap, y.mean(axis=0), atol=0.02)
    assert mean_average_precision(y, prob) == pytest.approx(y.mean(), abs=0.02)


def test_genre_without_positives_is_nan_and_left_out_of_map() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    prob = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6], [0.7, 0.6, 0.1], [0.3, 0.1, 0.2]])

    ap = average_precision_per_genre(y, prob)

    assert np.isnan(ap[2]) and not np.isnan(ap[:2]).any()
    assert mean_average_precision(y, prob) == pytest.approx(ap[:2].mean())
    assert mean_average_precision(y, prob) == pytest.approx(1.0)


def test_tune_thresholds_beats_half_on_imbalanced_data() -> None:
    y_val, p_val = _imbalanced(seed=2)
    y_test, p_test = _imbalanced(seed=3)

    thresholds = tune_thresholds(y_val, p_val)

    assert thresholds[0] < 0.5
    for y, p in ((y_val, p_val), (y_test, p_test)):
        f1_half = f1_score(y[:, 0], p[:, 0] >= 0.5, zero_division=0)
        f1_tuned = f1_score(y[:, 0], p[:, 0] >= thresholds[0], zero_division=0)
        assert f1_tuned > f1_half + 0.1


def test_tune_thresholds_finds_the_exact_optimum() -> None:
    y, p = _imbalanced(seed=4, n=1000)
    best = tune_thresholds(y, p)[0]
    f1_best = f1_score(y[:, 0], p[:, 0] >= best)
    f1_brute = _f1_at(y[:, 0], p[:, 0], np.unique(p)).max()
    assert THRESHOLD_RANGE[0] < best < THRESHOLD_RANGE[1]
    assert f1_best == pytest.approx(f1_brute)


def test_tune_thresholds_with_grid_picks_a_grid_value() -> None:
    y, p = _imbalanced(seed=5, n=1000)
    grid = np.round(np.arange(0.02, 0.99, 0.01), 2)
    chosen = tune_thresholds(y, p, grid=grid)[0]
    f1_chosen = f1_score(y[:, 0], p[:, 0] >= chosen)
    assert np.isclose(grid, chosen).any()
    assert f1_chosen == pytest.approx(_f1_at(y[:, 0], p[:, 0], grid).max())


def test_tune_thresholds_is_deterministic() -> None:
    rng = np.random.default_rng(6)
    y = _random_labels(rng, 10_000, np.linspace(0.02, 0.5, 18))
    p = np.clip(0.3 * y + rng.random(y.shape) * 0.7, 0.0, 1.0)
    y[:, 5] = 0  # a genre without positives

    first = tune_thresholds(y, p)
    perm = rng.permutation(len(y))

    assert first.shape == (18,)
    assert first[5] == DEFAULT_THRESHOLD
    assert ((first >= THRESHOLD_RANGE[0]) & (first <= THRESHOLD_RANGE[1])).all()
    np.testing.assert_array_equal(first, tune_thresholds(y, p))
    np.testing.assert_array_equal(first, tune_thresholds(y[perm], p[perm]))


def test_evaluate_returns_json_ready_dict() -> None:
    y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    prob = np.array(
        [
            [0.9, 0.2, 0.7, 0.1],
            [0.1, 0.8, 0.6, 0.2],
            [0.7, 0.4, 0.1, 0.3],
            [0.3, 0.1, 0.2, 0.6],
            [0.6, 0.1, 0.2, 0.1],
        ]
    )
    thresholds = np.array([0.5, 0.5, 0.5, 0.5])

    result = evaluate(y, prob, thresholds, GENRES)
    text = json.dumps(result, allow_nan=False)  # Drama has no positives: null, not NaN

    assert set(result) == {
        "map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy", "n_posters", "per_genre",
    }
    assert result["n_posters"] == 5
    assert [row["genre"] for row in result["per_genre"]] == GENRES
    assert set(result["per_genre"][0]) == {
        "genre", "ap", "f1", "precision", "recall", "support", "threshold",
    }
    drama = result["per_genre"][2]
    assert drama["ap"] is None and drama["support"] == 0 and drama["f1"] == 0.0
    assert '"ap": null' in text
    # Comedy misses poster 2 (0.4 < 0.5): P=1, R=1/2.
    comedy = result["per_genre"][1]
    assert (comedy["precision"], comedy["recall"], comedy["support"]) == (1.0, 0.5, 2)
    assert comedy["f1"] == pytest.approx(2 / 3)
    # Macro-F1 over the three genres with positives; Drama's false positives do not enter it.
    assert result["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 1.0) / 3)
    # Micro-F1 counts poster 4 (no genre) and Drama's false positives: TP=4, FP=3, FN=1.
    assert result["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 3 + 1))
    # Samples-F1 over the four posters with a genre: 2/3, 2/3, 2/3 (Comedy missed), 1.
    assert result["samples_f1"] == pytest.approx((2 / 3 * 3 + 1.0) / 4)


def test_evaluate_rejects_mismatched_thresholds() -> None:
    y = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="thresholds"):
        evaluate(y, y.astype(float), np.array([0.5]), ["A", "B"])


def test_prior_scores_repeat_train_frequencies() -> None:
    y_train = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
    scores = prior_scores(y_train, 3)
    np.testing.assert_allclose(scores, np.tile([0.75, 0.25, 0.25], (3, 1)))

    rng = np.random.default_rng(7)
    y_test = _random_labels(rng, 500, np.array([0.6, 0.2, 0.3]))
    # A constant score ranks nothing, so each genre's AP is exactly its prevalence.
    np.testing.assert_allclose(
        average_precision_per_genre(y_test, prior_scores(y_train, 500)), y_test.mean(axis=0)
    )


def test_format_table_lists_genres_and_summary() -> None:
    y = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]])
    prob = np.array([[0.9, 0.2, 0.7, 0.8], [0.1, 0.8, 0.6, 0.2], [0.7, 0.6, 0.1, 0.3]])
    table = format_table(evaluate(y, prob, np.full(4, 0.5), GENRES))
    lines = table.splitlines()
    assert lines[0].split() == ["genre", "AP", "F1", "P", "R", "support"]
    for genre in GENRES:
        assert any(line.startswith(genre) for line in lines)
    drama = next(line for line in lines if line.startswith("Drama"))
    assert drama.split()[1] == "-"  # undefined AP
    for label in ("mAP", "micro-F1", "macro-F1", "samples-F1", "top-n accuracy", "posters"):
        assert any(line.startswith(label) for line in lines), label


def test_plot_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(8)
    y = _random_labels(rng, 300, np.array([0.2, 0.4, 0.3, 0.0]))
    prob = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0.0, 1.0)
    path = tmp_path / "plots" / "pr.png"

    plot_precision_recall(y, prob, GENRES, path)

    assert_figure_has_content(path)
