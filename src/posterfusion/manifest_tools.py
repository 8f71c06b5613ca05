"""Split and describe a manifest: what users do between importing posters and training.

pandas, numpy and matplotlib are imported inside the functions that need them, because the
CLI imports this module and ``fusion --help`` must stay fast.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

from posterfusion.errors import PosterFusionError, is_disk_full
from posterfusion.files import atomic_path
from posterfusion.importers.cleanup import poster_path

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "val", "test")


def genre_lists(frame: pd.DataFrame) -> list[list[str]]:
    """Each poster's genres, parsed the way training parses them."""
    from posterfusion.manifest import split_genres

    return [split_genres(cell) for cell in frame["genres"]]


def read_manifest(path: Path) -> pd.DataFrame:
    """A labelled manifest as its own columns, so writing it back changes only what we set.

    Reading goes through :func:`posterfusion.manifest.load_manifest`, so split and stats accept
    exactly the manifests that training accepts.
    """
    from posterfusion.manifest import load_manifest

    if path.is_dir():
        raise PosterFusionError(
            f"{path} is a folder; give a manifest CSV (make one with 'fusion manifest import')"
        )
    manifest = load_manifest(path)
    if not manifest.labelled:
        raise PosterFusionError(
            f"{path} has no 'genres' column; split and stats need labelled posters"
        )
    return manifest.table.drop(columns=["path", "genre_list"]).fillna("")


def write_manifest(frame: pd.DataFrame, path: Path) -> None:
    """Write through a temporary file, so a failed write never leaves half a manifest."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
        frame.to_csv(stream, index=False)


def rebase_posters(frame: pd.DataFrame, source_dir: Path, target_dir: Path) -> pd.DataFrame:
    """The manifest with relative poster paths re-aimed from ``source_dir`` to ``target_dir``."""
    frame = frame.copy()
    frame["poster"] = [
        cell if os.path.isabs(cell) else poster_path(source_dir / cell, target_dir)
        for cell in frame["poster"]
    ]
    return frame


def combine_manifests(paths: list[Path], target_dir: Path) -> tuple[pd.DataFrame, int]:
    """Labelled manifests as one, their posters re-aimed at ``target_dir`` and each row's manifest
    named in a ``source`` column (kept where a row already has one), so that a model can train on
    several collections and be scored on each; a poster listed again, or a film listed again under
    the same ``imdb_id`` (its poster from another collection), is dropped and the first kept, so
    that no film trains in one collection while it is scored in another's test split.
    Returns the manifest and how many rows were dropped."""
    import pandas as pd

    frames = []
    for path in paths:
        frame = rebase_posters(read_manifest(path), path.parent, target_dir)
        if "source" not in frame.columns:
            frame["source"] = str(path)
        frames.append(frame)
    combined = pd.concat(frames, ignore_index=True).fillna("")
    absolute = [os.path.normpath(os.path.join(target_dir, cell)) for cell in combined["poster"]]
    repeated = pd.Series(absolute).duplicated()
    if "imdb_id" in combined.columns:
        film = combined["imdb_id"].astype(str).str.strip().str.lower()
        repeated |= (film != "") & film.duplicated()
    repeated = repeated.to_numpy()
    return combined[~repeated].reset_index(drop=True), int(repeated.sum())


def split_manifest(
    frame: pd.DataFrame, val: float, test: float, seed: int = 0, *, force: bool = False
) -> pd.DataFrame:
    """The manifest with a ``split`` column, stratified so each genre keeps its share in each split.

    Uses iterative stratification (Sechidis et al., 2011, from ``iterative-stratification``) in
    one pass over three folds, because two chained train/test splits skew the second split's
    rare genres.
    """
    import numpy as np
    from iterstrat.ml_stratifiers import IterativeStratification

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PosterFusionError(f"--val {val} and --test {test} must be fractions that sum below 1")
    if "split" in frame.columns and not force:
        raise PosterFusionError(
            "the manifest already has a split column; pass --force to replace it"
        )
    genres = genre_lists(frame)
    vocabulary = {name: i for i, name in enumerate(sorted({g for gs in genres for g in gs}))}
    labels = np.zeros((len(frame), len(vocabulary)), dtype=bool)
    for row, names in enumerate(genres):
        labels[row, [vocabulary[name] for name in names]] = True
    shares = {"train": 1 - val - test, "val": val, "test": test}
    used = [name for name in SPLITS if shares[name] > 0]  # a zero share would still get leftovers
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(frame))
    folds = IterativeStratification(
        labels=labels[order], r=np.array([shares[name] for name in used]), random_state=rng
    )
    split = np.empty(len(frame), dtype=object)
    split[order] = np.array(used, dtype=object)[folds]
    frame = frame.copy()
    frame["split"] = split
    return frame


@dataclass(frozen=True)
class ManifestStats:
    """What a user checks before training: is every genre there, and how entangled are they."""

    posters: int
    counts: dict[str, int]
    per_poster: dict[int, int]
    pairs: list[tuple[str, str, int]]
    splits: dict[str, dict[str, int]]

    @property
    def cardinality(self) -> float:
        """Mean genres per poster (the label cardinality of multi-label learning)."""
        if not self.posters:
            return 0.0
        return sum(k * n for k, n in self.per_poster.items()) / self.posters

    @property
    def density(self) -> float:
        """Cardinality over the number of genres: how much of the label space a poster uses."""
        return self.cardinality / len(self.counts) if self.counts else 0.0


def manifest_stats(frame: pd.DataFrame) -> ManifestStats:
    """Genre counts (overall and per split), genres per poster and co-occurring genre pairs."""
    genres = genre_lists(frame)
    counts = Counter(name for names in genres for name in names)
    pairs = Counter(pair for names in genres for pair in combinations(sorted(names), 2))
    splits: dict[str, dict[str, int]] = {}
    if "split" in frame.columns:
        for split, names in zip(frame["split"], genres):
            bucket = splits.setdefault(str(split) or "(none)", {})
            for name in names:
                bucket[name] = bucket.get(name, 0) + 1
    return ManifestStats(
        posters=len(frame),
        counts=dict(counts.most_common()),
        per_poster=dict(sorted(Counter(len(names) for names in genres).items())),
        pairs=[(a, b, n) for (a, b), n in pairs.most_common()],
        splits={name: splits[name] for name in sorted(splits, key=_split_order)},
    )


def _split_order(name: str) -> tuple[int, str]:
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


def plot_genre_counts(stats: ManifestStats, path: Path) -> None:
    """A horizontal bar chart of genre counts, stacked by split when the manifest has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats.counts)[::-1]
    figure, axes = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    left = [0] * len(names)
    for split, counts in (stats.splits or {"posters": stats.counts}).items():
        widths = [counts.get(name, 0) for name in names]
        axes.barh(names, widths, left=left, label=split)
        left = [a + b for a, b in zip(left, widths)]
    if stats.splits:
        axes.legend(loc="lower right")
    axes.set_xlabel("posters")
    axes.set_title(f"{stats.posters} posters, {stats.cardinality:.2f} genres per poster")
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    except (OSError, ValueError) as error:
        if is_disk_full(error):
            raise  # one line at the CLI's edge, as for every writer (errors.user_errors)
        raise PosterFusionError(f"cannot write the chart to {path}: {error}") from None
    finally:
        plt.close(figure)
