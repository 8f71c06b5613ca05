"""Training the fusion head, top to bottom in one file (config is plain data).

manifest -> cached features (computed where missing) -> seeded multi-label-stratified split ->
standardise on train -> MLP with BCE (pos_weight for rare genres), AdamW -> early stopping on
validation mAP -> the word model (titles and OCR text of the training posters) fitted and weighed
per genre against the heads on validation -> per-genre thresholds tuned on validation -> weights +
model card.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed, frozen, metrics
from .backbone import embedding_parts
from .detectors import schema
from .errors import DiskFull, PosterFusionError, is_disk_full
from .extract import Progress
from .frozen import FrozenModels, resolve_device
from .features import Features, FeatureTable, gather
from .files import atomic_folder
from .manifest import Manifest, label_matrix, load_manifest
from .loop import Schedule, fit, loss_function
from .model import CARD_FILE, FusionEnsemble, FusionHead, HeadConfig, ModelCard, predict_proba, save_model
from .words import WORDS_FILE, WordModel

def models_for(config: dict, device: str = "auto") -> FrozenModels:
    """The frozen models a config's mode needs (detectors, backbone or both)."""
    mode = config["mode"]
    return frozen.create_frozen_models(
        objects=config["objects"] if mode in ("detectors", "fusion") else None,
        backbone=config["backbone"] if mode in ("cnn", "fusion") else None,
        device=device,
        backbone_view=config["backbone_view"],
        text=config["text"] and mode in ("text", "fusion"),
    )


def split_rows(manifest: Manifest, rows: np.ndarray, y: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation positions: the manifest's ``split`` column, else a seeded stratified split."""
    if "split" in manifest.table.columns:
        train, val = split_positions(manifest, rows, "train"), split_positions(manifest, rows, "val")
        if len(train) == 0 or len(val) == 0:
            raise PosterFusionError(f"{manifest.source}: 'split' column needs both 'train' and 'val' rows")
        return train, val
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=config["val_fraction"], random_state=config["seed"])
    train, val = next(splitter.split(np.zeros(len(y)), y))
    return np.sort(train), np.sort(val)


def split_positions(manifest: Manifest, rows: np.ndarray, name: str) -> np.ndarray:
    """Positions (into ``rows``) of the manifest rows whose ``split`` is ``name``."""
    if "split" not in manifest.table.columns:
        raise PosterFusionError(f"{manifest.source}: no 'split' column; add one with 'fusion manifest split'")
    split = manifest.table["split"].iloc[rows].fillna("").str.strip().str.lower().to_numpy()
    return np.flatnonzero(split == name)


def collections(manifest: Manifest, rows: np.ndarray) -> np.ndarray:
    """The collection each of ``rows`` comes from: the ``source`` column that ``fusion manifest
    combine`` writes, or the manifest itself where it names none. Each collection's test posters
    are scored apart, so that a combined manifest's figures stay comparable with its parts'."""
    if "source" in manifest.table.columns:
        return manifest.table["source"].fillna(str(manifest.source)).astype(str).iloc[rows].to_numpy()
    return np.full(len(rows), str(manifest.source), dtype=object)


def new_head(x: Features, y: np.ndarray, train: np.ndarray, config: dict,
             cnn_part: tuple[int, int] | None = None) -> FusionHead:
    """A head for these feature groups, its standardisers and output biases fitted on the training
    rows; ``cnn_part`` (offset, width) is the part of the embedding it reads (default: all of it)."""
    offset, width = cnn_part or (0, x.cnn.shape[1] if x.cnn is not None else 0)
    head = FusionHead(HeadConfig(
        mode=config["mode"],
        cnn_dim=width,
        cnn_offset=offset,
        detector_dim=x.detectors.shape[1] if x.detectors is not None else 0,
        text_dim=x.text.shape[1] if x.text is not None else 0,
        n_genres=y.shape[1],
        **config["head"],
    ))
    log_mask = np.isin(schema.COLUMNS, schema.COUNT_COLUMNS) if x.detectors is not None else None
    text_log_mask = np.isin(schema.TEXT_COLUMNS, schema.TEXT_COUNT_COLUMNS) if x.text is not None else None
    head.fit_standardizers(x.rows(train), log_mask, text_log_mask)
    head.set_genre_prior(y[train].mean(0))
    return head


def fit_head(x: Features, y: np.ndarray, train: np.ndarray, val: np.ndarray, config: dict, device: torch.device,
             on_epoch: Callable[[int, float, float], None] | None = None,
             cnn_part: tuple[int, int] | None = None) -> tuple[FusionHead, dict]:
    """Train one head with early stopping on validation mAP; returns the best head and history."""
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"])
    head = new_head(x, y, train, config, cnn_part).to(device)
    x_train = x.rows(train).tensors(device)
    y_train = torch.as_tensor(y[train], device=device)
    opt = config["optim"]

    def batches(epoch: int):
        order = torch.randperm(len(train), generator=generator).to(device)
        for start in range(0, len(train), opt["batch_size"]):
            idx = order[start : start + opt["batch_size"]]
            yield tuple(None if g is None else g[idx] for g in x_train), y_train[idx]

    def validate() -> float:
        return metrics.mean_average_precision(y[val], predict_proba(head, x.rows(val)))

    optimizer = torch.optim.AdamW(head.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    result = fit(head, batches, validate, loss_function(y[train], config, device), optimizer,
                 Schedule(opt["epochs"], opt["patience"]),
                 torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt["epochs"]), on_epoch)
    return head, {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "history": result.history}


def fit_and_validate(x: Features, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, genres: list[str],
                     config: dict, device: torch.device, on_epoch: Callable[[int, float, float], None] | None = None
                     ) -> tuple[FusionEnsemble, dict, np.ndarray, dict]:
    """Fit ``optim.ensemble`` heads (seeds seed, seed+1, ...) on each network's part of the
    embedding, tune per-genre thresholds on validation for their averaged probabilities, and score
    them there (what ablations compare).

    Under a backbone ensemble, heads on each network averaged late beat one head on the joined
    embedding (docs/results.md)."""
    heads, fits = [], []
    for part in cnn_parts(x.cnn, config):
        for k in range(config["optim"]["ensemble"]):
            head, fit = fit_head(x, y, train_idx, val_idx, config | {"seed": config["seed"] + k}, device, on_epoch, part)
            heads.append(head.cpu())
            fits.append(fit)
    model = FusionEnsemble(heads)
    val_prob = predict_proba(model, x.rows(val_idx))
    thresholds = metrics.tune_thresholds(y[val_idx], val_prob)
    fit = {"best_epoch": [f["best_epoch"] for f in fits], "epochs_run": [f["epochs_run"] for f in fits]}
    return model, fit, thresholds, metrics.evaluate(y[val_idx], val_prob, thresholds, genres)


def cnn_parts(cnn: np.ndarray | None, config: dict) -> list[tuple[int, int] | None]:
    """(offset, width) of each network's embedding in ``cnn`` under the config's backbone; one
    part, all of it, where the widths do not add up to ``cnn``'s (embeddings made elsewhere)."""
    widths = embedding_parts(config["backbone"])
    if cnn is None or sum(widths) != cnn.shape[1]:
        return [None]
    offsets = np.cumsum([0] + widths[:-1])
    return [(int(o), w) for o, w in zip(offsets, widths)]


@dataclass
class TrainingData:
    """Everything a head is fitted on: features, labels and the split, for one manifest."""

    manifest: Manifest
    models: FrozenModels
    table: FeatureTable
    genres: list[str]
    y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


def prepare_data(manifest_path: str | Path, cache_dir: str | Path, config: dict, device: str = "auto",
                 progress: Progress | None = None) -> TrainingData:
    """Manifest -> cached features (computed where missing) -> genre vocabulary, labels, split."""
    manifest = load_manifest(manifest_path)
    if not manifest.labelled:
        raise PosterFusionError(f"{manifest_path}: training needs a 'genres' column")
    models = models_for(config, device)
    table = gather(manifest.paths, models, cache_dir, progress=progress)
    counts = {g: 0 for g in manifest.genres()}
    for genre_list in manifest.table["genre_list"].iloc[table.rows]:
        for g in genre_list:
            counts[g] += 1
    genres = [g for g, c in counts.items() if c >= config["min_genre_posters"]]
    if not genres:
        raise PosterFusionError(f"{manifest_path}: no genre has {config['min_genre_posters']} posters or more")
    y = label_matrix(manifest, table.rows, genres)
    train_idx, val_idx = split_rows(manifest, table.rows, y, config)
    return TrainingData(manifest, models, table, genres, y, train_idx, val_idx)


MODEL_FILES = (CARD_FILE, "*.safetensors")
"""What a model folder holds (card, head weights, word model, a fine-tuned backbone)."""


def train(manifest_path: str | Path, cache_dir: str | Path, config: dict, out_dir: str | Path,
          device: str = "auto", progress: Progress | None = None,
          on_epoch: Callable[[int, float, float], None] | None = None) -> ModelCard | None:
    """The whole `fusion train` command as a function; returns the model card.

    The model folder is written whole or not at all (:func:`~posterfusion.files.atomic_folder`):
    a run killed or out of disk at any moment leaves the model that was in ``out_dir`` as it was.
    Under torchrun (a fine-tune on several processes) rank 0 computes the cache's missing rows
    before the others read it, and alone writes the model; the other ranks return None.
    """
    if not distributed.is_main():
        return _train(manifest_path, cache_dir, config, Path(out_dir), device, progress, on_epoch)
    try:
        with atomic_folder(out_dir, MODEL_FILES) as staging:
            return _train(manifest_path, cache_dir, config, staging, device, progress, on_epoch)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull(f"{out_dir}: disk full while writing the model; what was there is unchanged") from None


def _train(manifest_path: str | Path, cache_dir: str | Path, config: dict, out_dir: Path, device: str,
           progress: Progress | None, on_epoch: Callable[[int, float, float], None] | None) -> ModelCard | None:
    start = time.perf_counter()
    if config["finetune"]["enabled"] and len(embedding_parts(config["backbone"])) > 1:
        raise PosterFusionError(f"config: finetune trains one network, and backbone '{config['backbone']}' is several; "
                                "set backbone to one of them")
    with distributed.main_first():
        data = prepare_data(manifest_path, cache_dir, config, device, progress)
    manifest, table, genres, y, train_idx, val_idx, models = (
        data.manifest, data.table, data.genres, data.y, data.train_idx, data.val_idx, data.models
    )

    torch_device = resolve_device(device)
    features, backbone_identity, finetuned = table.features, models.backbone.identity if models.backbone else None, None
    if config["finetune"]["enabled"]:
        tuned = finetuned_embeddings(data, config, cache_dir, Path(out_dir), torch_device, on_epoch)
        if tuned is None:  # a torchrun rank other than 0: its part is done
            return None
        cnn, backbone_identity, finetuned = tuned
        features = replace(features, cnn=cnn)
        keep = ~np.isnan(cnn).any(1)  # posters unreadable since they were cached
        train_idx, val_idx = train_idx[keep[train_idx]], val_idx[keep[val_idx]]
    head, fit, thresholds, validation = fit_and_validate(features, y, train_idx, val_idx, genres, config,
                                                         torch_device, on_epoch)
    prior = metrics.mean_average_precision(y[val_idx], metrics.prior_scores(y[train_idx], len(val_idx)))
    word_model, words_card, reader = None, None, None
    if config["words"]["enabled"]:
        word_model, words_card, reader, docs_val = fit_words(data, train_idx, val_idx, config, cache_dir, device, progress)
        if word_model is not None:  # the thresholds are the mixed model's; the head's kept for predict --no-words
            head_val = predict_proba(head, features.rows(val_idx))
            mixed_val = weigh_words(word_model, words_card, y[val_idx], head_val, docs_val)
            words_card["head_thresholds"] = [round(float(t), 4) for t in thresholds]
            thresholds = metrics.tune_thresholds(y[val_idx], mixed_val)
            validation = metrics.evaluate(y[val_idx], mixed_val, thresholds, genres)

    card = ModelCard(
        genres=genres,
        thresholds=[round(float(t), 4) for t in thresholds],
        train_genre_frequency=[round(float(f), 5) for f in y[train_idx].mean(0)],
        config=config,
        feature_schema={"version": schema.SCHEMA_VERSION, "columns": schema.COLUMNS} if features.detectors is not None else None,
        detectors=models.detectors.identity if models.detectors else None,
        backbone=backbone_identity,
        text=models.text.identity if models.text else reader,
        words=words_card,
        validation={k: validation[k] for k in ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy")}
        | {"prior_map": prior, "n_posters": len(val_idx), "per_genre": validation["per_genre"]},
        training={
            "manifest": str(manifest_path),
            "manifest_sha256": hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest(),
            "manifest_rows": len(manifest),
            "posters_used": int(len(table.rows)),
            "train_posters": int(len(train_idx)),
            "val_posters": int(len(val_idx)),
            "unreadable_posters": len(table.failures),
            "best_epoch": fit["best_epoch"],
            "epochs_run": fit["epochs_run"],
            "finetune": finetuned,
            "seconds": round(time.perf_counter() - start, 1),
            "device": str(torch_device),
        },
    )
    save_model(out_dir, head, card)
    if word_model is not None:
        word_model.save(out_dir)
    return card


def fit_words(data: TrainingData, train_idx: np.ndarray, val_idx: np.ndarray, config: dict,
              cache_dir: str | Path | None, device: str, progress: Progress | None = None
              ) -> tuple[WordModel | None, dict, dict | None, list[str]]:
    """The word model fitted on the training posters' titles and (``words.read_training_posters``)
    on what OCR reads on them, each text a document of its own with the poster's genres; not yet
    weighed against a head (:func:`weigh_words`). OCR goes through the cache's text store (computed
    where it lacks a poster). Returns the model, what the card says of it, the OCR reader's identity
    and the validation posters' OCR text; no model (and why, for the card) where there is nothing
    to learn from."""
    manifest, table, y = data.manifest, data.table, data.y
    read_training = config["words"]["read_training_posters"]
    if "title" not in manifest.table.columns and not read_training:
        return None, {"fitted": False, "why": f"{manifest.source}: no 'title' column to fit the word model on "
                                              f"(words.read_training_posters: true learns from OCR instead)"}, None, []
    wanted = np.concatenate([train_idx, val_idx]) if read_training else val_idx
    if table.text_read is not None:  # the head's text branch already read every poster
        reader, read = data.models.text.identity, [table.text_read[i] for i in wanted]
    else:
        reader, read = read_text([manifest.paths[table.rows[i]] for i in wanted], cache_dir, device, progress)
    docs_val = read[len(wanted) - len(val_idx):]
    docs, labels, sources = [], [], []
    if "title" in manifest.table.columns:
        titles = manifest.table["title"].fillna("").astype(str).iloc[table.rows].tolist()
        docs, labels, sources = [titles[i] for i in train_idx], [y[train_idx]], ["title"]
    if read_training:
        docs, labels, sources = docs + read[: len(train_idx)], labels + [y[train_idx]], sources + ["ocr"]
    try:
        word_model = WordModel.fit(docs, np.concatenate(labels), C=config["words"]["C"])
    except PosterFusionError as exc:  # too little text to learn words from: the head alone
        return None, {"fitted": False, "why": f"{manifest.source}: {exc}"}, None, docs_val
    card = {"fitted": True, "file": WORDS_FILE, "fitted_on": sources, "C": config["words"]["C"],
            "vocabulary": len(word_model.vocabulary)}
    return word_model, card, reader, docs_val


def weigh_words(word_model: WordModel, card: dict, y_val: np.ndarray, head_val: np.ndarray,
                docs_val: list[str]) -> np.ndarray:
    """Choose the word model's per-genre weights against a head's validation probabilities, note
    them in its ``card``, and return the mixed validation probabilities (to tune thresholds on)."""
    head_map, mixed_map = word_model.choose_weight(y_val, head_val, docs_val)
    card |= {"weight": [round(float(w), 4) for w in word_model.weight],
             "val_map_head": round(head_map, 4), "val_map_mixed": round(mixed_map, 4)}
    return word_model.mix(head_val, docs_val)


def read_text(paths: list[str], cache_dir: str | Path | None, device: str = "auto",
              progress: Progress | None = None) -> tuple[dict, list[str]]:
    """What OCR reads on each poster (" / "-joined lines; "" where unreadable), through the cache's
    text store, and the reader's identity."""
    ocr = frozen.create_frozen_models(objects=None, backbone=None, device=device, text=True)
    table = gather(paths, ocr, cache_dir, progress=progress)
    docs = [""] * len(paths)
    for position, doc in zip(table.rows, table.text_read):
        docs[position] = doc
    return ocr.text.identity, docs


def finetuned_embeddings(data: TrainingData, config: dict, cache_dir: str | Path | None, out_dir: Path,
                         device: torch.device, on_epoch: Callable[[int, float, float], None] | None = None
                         ) -> tuple[np.ndarray, dict, dict] | None:
    """Fine-tune the backbone (config ``finetune``) from a head fitted on frozen embeddings; return
    the tuned backbone's embeddings of the table's posters (stored in the cache under its own
    identity), that identity for the model card, and how the fine-tune went (None on torchrun's
    ranks other than 0)."""
    from .features import gather
    from .finetune import finetune

    if data.models.backbone is None:
        raise PosterFusionError("config: finetune needs a CNN branch (mode fusion or cnn)")
    table = data.table
    start, _ = fit_head(table.features, data.y, data.train_idx, data.val_idx, config, device)
    paths = [data.manifest.paths[i] for i in table.rows]
    tuned = finetune(paths, table.features, data.y, data.train_idx, data.val_idx, start, config, device, out_dir, on_epoch)
    if tuned is None:
        return None
    models = frozen.create_frozen_models(objects=None, backbone=config["backbone"], device=str(device),
                                          backbone_weights=tuned.backbone_file, backbone_view=config["backbone_view"])
    identity = models.backbone.identity
    if tuned.embeddings is None:  # end to end: embed every poster with the tuned backbone
        cnn = np.full((len(paths), models.backbone.dim), np.nan, np.float32)
        tuned_table = gather(paths, models, cache_dir)
        cnn[tuned_table.rows] = tuned_table.features.cnn
    else:  # tail: already computed from the cached maps; kept for evaluate and predict --cache
        cnn = tuned.embeddings
        if cache_dir is not None:
            from .extract import open_stores

            ok = np.flatnonzero(~np.isnan(cnn).any(1))
            open_stores(models, cache_dir)["backbone"].append([table.keys[i] for i in ok], [paths[i] for i in ok], cnn[ok])
    card_identity = identity | {"weights_file": tuned.backbone_file.name,
                                "fine_tuned_from": data.models.backbone.identity["weights_sha256"]}
    return cnn, card_identity, tuned.fit | {"scope": config["finetune"]["scope"]}

