"""The one training loop, and fine-tuning on the CPU on a tiny subset of real posters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import copy_real_posters

from posterfusion.loop import Schedule, fit


class _Constant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_loop_stops_after_patience_and_keeps_the_best_weights() -> None:
    model = _Constant()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.1, 0.9])
    seen = []

    def batches(epoch: int):
        yield (torch.ones(4, 1),), torch.ones(4, 1)

    def validate() -> float:
        seen.append(float(model.w.detach()))
        return next(scores)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = fit(model, batches, validate, torch.nn.BCEWithLogitsLoss(), optimizer, Schedule(epochs=10, patience=3))
    assert result.best_epoch == 2 and result.best_map == 0.7 and result.epochs_run == 5
    assert float(model.w.detach()) == pytest.approx(seen[1])  # the weights validated at epoch 2
    assert not model.training


def test_loop_never_ends_worse_than_it_started() -> None:
    model = _Constant()
    start = float(model.w)

    def batches(epoch: int):
        yield (torch.ones(4, 1),), torch.ones(4, 1)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = fit(model, batches, lambda: 0.5 if float(model.w) == start else 0.4, torch.nn.BCEWithLogitsLoss(),
                 optimizer, Schedule(epochs=3, patience=5), score_start=True)
    assert result.best_epoch == 0 and float(model.w) == start


@pytest.fixture(scope="module")
def tiny_real(real_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real posters copied to a temporary folder (so one can be broken), with a train/val split."""
    return copy_real_posters(real_manifest, tmp_path_factory.mktemp("tiny_real"), step=331, count=30)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["tail", "all"])
def test_finetune_on_cpu_skips_a_poster_broken_since_it_was_cached(tiny_real: Path, tmp_path: Path, scope: str) -> None:
    from posterfusion.config import load_config
    from posterfusion.predict import Predictor
    from posterfusion.train import train

    root = tmp_path / "data"
    shutil.copytree(tiny_real.parent, root)
    manifest = root / "labels.csv"
    config = load_config(None, {"min_genre_posters": 2, "optim": {"epochs": 2, "ensemble": 1}, "backbone": "efficientnet_lite0",
                                "finetune": {"enabled": True, "scope": scope, "epochs": 1, "batch_size": 8}})
    cache = tmp_path / "cache"
    from posterfusion.train import prepare_data

    prepare_data(manifest, cache, config)  # every poster cached while readable
    broken = root / pd.read_csv(manifest)["poster"][0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated after caching: keyed, but unreadable now

    card = train(manifest, cache, config, tmp_path / "model", device="cpu")
    assert (tmp_path / "model" / "backbone.safetensors").is_file()
    assert card.backbone["weights_file"] == "backbone.safetensors"
    assert card.backbone["weights_sha256"] != card.backbone["fine_tuned_from"]
    assert card.training["finetune"]["scope"] == scope
    assert card.training["train_posters"] + card.training["val_posters"] == 29  # the broken one left out
    assert json.loads((tmp_path / "model" / "card.json").read_text())["backbone"] == card.backbone

    predictor = Predictor(tmp_path / "model", "cpu")
    assert predictor.models.backbone.weights_sha256 == card.backbone["weights_sha256"]
    readable = [str(p) for p in sorted((root / "posters").iterdir()) if p != broken][:2]
    for a, b in zip(predictor.predict(readable), predictor.predict(readable, cache)):  # the cached tuned embeddings are the ones the tuned backbone computes
        assert not a.error and max(abs(a.probabilities[g] - b.probabilities[g]) for g in a.probabilities) < 1e-3


@pytest.mark.slow
def test_trunk_maps_leave_out_unreadable_posters(tiny_real: Path, tmp_path: Path) -> None:
    from posterfusion.backbone import create_backbone
    from posterfusion.finetune import trunk_maps

    posters = sorted((tiny_real.parent / "posters").iterdir())[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff broken")
    paths = [str(posters[0]), str(broken), str(posters[1]), str(tmp_path / "missing.jpg"), str(posters[2])]
    maps, ok = trunk_maps(create_backbone(view="224x320+flip"), paths)
    assert ok.tolist() == [True, False, True, False, True]
    assert maps.shape == (3, 2, 192, 10, 7) and maps.dtype == np.float16
    assert np.isfinite(maps.astype(np.float32)).all()
    assert not np.allclose(maps[:, 0], maps[:, 1])  # the mirror view differs
