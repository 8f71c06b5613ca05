"""The fine-tune on two processes under torchrun (gloo on the CPU), on a tiny subset of real posters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_real_posters

from posterfusion import distributed

FUSION = Path(sys.executable).with_name("fusion")  # the console script torchrun runs in each process


def test_without_torchrun_every_helper_is_the_identity() -> None:
    rows = np.arange(7)
    assert not distributed.active() and distributed.launched_world() == 1 and distributed.is_main()
    assert (distributed.training_share(rows) == rows).all() and (distributed.share(rows) == rows).all()
    assert distributed.gathered(rows)[0] is rows
    assert distributed.sampler(rows, seed=0) is None


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["tail", "all"])
def test_torchrun_two_cpu_processes_fine_tune_and_write_one_model(real_manifest: Path, tmp_path: Path,
                                                                   shared_models, scope: str) -> None:
    from posterfusion.config import load_config
    from posterfusion.predict import Predictor
    from posterfusion.train import train

    (tmp_path / "data").mkdir()
    manifest = copy_real_posters(real_manifest, tmp_path / "data", step=397, count=24)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    broken = tmp_path / "data" / "posters" / "broken.jpg"
    broken.write_bytes((tmp_path / "data" / table["poster"][0]).read_bytes()[:300])  # truncated: never readable
    extra = pd.DataFrame([{"poster": "posters/broken.jpg", "genres": "Drama", "split": "train"}])
    pd.concat([table, extra]).to_csv(manifest, index=False)
    settings = {"min_genre_posters": 2, "optim": {"epochs": 2, "ensemble": 1},
                "finetune": {"enabled": True, "scope": scope, "epochs": 1, "batch_size": 4}}
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(settings))
    cache, out = tmp_path / "cache", tmp_path / "runs" / "model"

    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(FUSION), "train",
         "--manifest", str(manifest), "--cache", str(cache), "--config", str(config), "--out", str(out),
         "--device", "cpu"],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("trained fusion on 16 posters") == 1, run.stdout  # rank 0 alone reports
    assert run.stderr.count("broken.jpg") == 1, run.stderr  # rank 0 skips and reports it; rank 1 reads the cache

    # One model folder, holding what a fine-tune in one process writes, in the same format.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["model"]
    card = json.loads((out / "card.json").read_text())
    train(manifest, cache, load_config(config), tmp_path / "alone", device="cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "alone").iterdir())
    assert _shape(card) == _shape(json.loads((tmp_path / "alone" / "card.json").read_text()))
    assert card["training"]["unreadable_posters"] == 1
    assert card["training"]["train_posters"] + card["training"]["val_posters"] == 24
    assert card["training"]["finetune"]["scope"] == scope
    assert card["backbone"]["weights_sha256"] != card["backbone"]["fine_tuned_from"]

    predictor = Predictor(out, "cpu")
    assert predictor.models.backbone.weights_sha256 == card["backbone"]["weights_sha256"]
    posters = [str(tmp_path / "data" / p) for p in table["poster"][:2]]
    assert all(not p.error and p.probabilities for p in predictor.predict(posters))


def _shape(card: dict) -> dict:
    """A card's keys, nested, without its values (the fine-tune's per-epoch history aside)."""
    return {k: _shape(v) if isinstance(v, dict) and k not in ("finetune", "per_genre") else type(v).__name__
            for k, v in card.items()}
