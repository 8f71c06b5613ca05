"""Backbone ensembles: several networks on one view, a head ensemble on each network's part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from posterfusion.backbone import create_backbone, embedding_parts
from posterfusion.config import load_config
from posterfusion.errors import PosterFusionError
from posterfusion.metrics import average_precision_per_genre
from posterfusion.model import CARD_FILE, ModelCard, load_model, save_model
from posterfusion.features import Features
from posterfusion.model import predict_proba
from posterfusion.train import cnn_parts, fit_and_validate, train

PAIR = "efficientnet_lite0+efficientnet_lite2"


def test_ensemble_embeds_each_network_side_by_side() -> None:
    pair = create_backbone(PAIR, view="224x320+flip")
    first = create_backbone("efficientnet_lite0", view="224x320+flip")
    second = create_backbone("efficientnet_lite2", view="224x320+flip")
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 320, 224), dtype=np.uint8))
    with torch.inference_mode():
        both = pair.embed(batch)
        expected = torch.cat([first.embed(batch), second.embed(batch)], dim=1)
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-4)
    assert pair.dim == 2560 and embedding_parts(PAIR) == [1280, 1280]
    # Its own identity: its embeddings never mix with either network's in a cache.
    assert pair.identity["name"] == PAIR
    assert pair.identity["weights_sha256"] not in (first.identity["weights_sha256"], second.identity["weights_sha256"])
    assert pair.identity["weights_sha256"] == create_backbone(PAIR, lazy=True).identity["weights_sha256"]


@pytest.mark.parametrize("name, message", [
    ("efficientnet_lite0+resnet50", "unknown backbone 'efficientnet_lite0\\+resnet50'.*joined with '\\+'"),
    ("efficientnet_lite0+efficientnet_lite0", "unknown backbone"),
])
def test_bad_ensemble_names_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(PosterFusionError, match=message):
        create_backbone(name, lazy=True)


def test_an_ensemble_cannot_take_fine_tuned_weights(tmp_path: Path) -> None:
    weights = tmp_path / "tuned.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(PosterFusionError, match="one network, not an ensemble"):
        create_backbone(PAIR, weights=weights)


def test_heads_read_their_own_network_and_the_card_keeps_the_parts(tmp_path: Path) -> None:
    """Genre 0 shows only in the first network's part, genre 1 only in the second's: each part's
    heads learn their genre, and the averaged ensemble ranks both."""
    rng = np.random.default_rng(0)
    n, half = 240, 1280
    y = (rng.random((n, 2)) < 0.4).astype(np.float32)
    cnn = rng.normal(size=(n, 2 * half)).astype(np.float32)
    cnn[:, :8] += 3 * y[:, :1]
    cnn[:, half : half + 8] += 3 * y[:, 1:2]
    train_idx, val_idx = np.arange(160), np.arange(160, n)
    config = load_config(None, {"backbone": PAIR, "mode": "cnn", "optim": {"epochs": 20, "ensemble": 2}})
    assert cnn_parts(cnn, config) == [(0, half), (half, half)]

    model, _, _, validation = fit_and_validate(Features(cnn), y, train_idx, val_idx, ["A", "B"], config, torch.device("cpu"))
    assert [(h.config.cnn_offset, h.config.cnn_dim) for h in model.heads] == [(0, half)] * 2 + [(half, half)] * 2
    assert min(g["ap"] for g in validation["per_genre"]) > 0.65  # the prior is ~0.4
    first, second = (average_precision_per_genre(y[val_idx], predict_proba(model.heads[k], Features(cnn[val_idx])))
                     for k in (0, 2))
    assert first[0] > second[0] + 0.2 and second[1] > first[1] + 0.2
    assert model.cnn_dim == 2 * half and np.allclose(model.cnn_training_mean(), cnn[train_idx].mean(0), atol=1e-4)

    save_model(tmp_path / "m", model, ModelCard(genres=["A", "B"], thresholds=[0.5, 0.5]))
    loaded, card = load_model(tmp_path / "m")
    assert card.cnn_parts == [[0, half], [0, half], [half, half], [half, half]]
    assert np.array_equal(predict_proba(loaded, Features(cnn)), predict_proba(model, Features(cnn)))
    with pytest.raises(ValueError, match="read 2560-wide embeddings, not 1280"):  # one network's features
        predict_proba(loaded, Features(cnn[:, :half]))


def test_a_card_from_before_ensembles_still_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cnn, y = rng.normal(size=(60, 1280)).astype(np.float32), (rng.random((60, 2)) < 0.5).astype(np.float32)
    config = load_config(None, {"mode": "cnn", "optim": {"epochs": 2, "ensemble": 2}})
    model, *_ = fit_and_validate(Features(cnn), y, np.arange(40), np.arange(40, 60), ["A", "B"], config, torch.device("cpu"))
    save_model(tmp_path / "m", model, ModelCard(genres=["A", "B"], thresholds=[0.5, 0.5]))
    card = json.loads((tmp_path / "m" / CARD_FILE).read_text())
    del card["cnn_parts"], card["head"]["cnn_offset"]
    (tmp_path / "m" / CARD_FILE).write_text(json.dumps(card))
    loaded, _ = load_model(tmp_path / "m")
    assert np.array_equal(predict_proba(loaded, Features(cnn)), predict_proba(model, Features(cnn)))


def test_fine_tuning_an_ensemble_is_refused_before_any_work(tmp_path: Path) -> None:
    config = load_config(None, {"backbone": PAIR, "finetune": {"enabled": True}})
    with pytest.raises(PosterFusionError, match="finetune trains one network"):
        train(tmp_path / "never-read.csv", tmp_path / "cache", config, tmp_path / "out")
