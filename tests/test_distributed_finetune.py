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
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def torchrun(*command: str) -> subprocess.CompletedProcess:
    """``command`` (a script and its arguments) on two CPU processes under torchrun, as a user starts it."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *command], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    return run


def test_without_torchrun_every_helper_is_the_identity() -> None:
    rows = np.arange(7)
    assert not distributed.active() and distributed.launched_world() == 1 and distributed.is_main()
    assert (distributed.training_share(rows) == rows).all() and (distributed.share(rows) == rows).all()
    assert distributed.gathered(rows)[0] is rows
    assert distributed.sampler(rows, seed=0) is None and distributed.node_share(5) == 5


def test_two_ranks_train_what_one_process_trains_with_whole_batches(tmp_path: Path) -> None:
    """Each rank takes half of every batch and the gradients are averaged; rank 0's validation score
    decides early stopping on both ranks (rank 1's are made to disagree); validation is gathered."""
    import distributed_toy

    torchrun(str(TESTS / "distributed_toy.py"), str(tmp_path / "ranks"))
    distributed_toy.main(tmp_path / "alone")
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "alone" / "rank0.json").read_text())
    assert ranks[0]["weight"] == ranks[1]["weight"]
    assert np.allclose(ranks[0]["weight"], alone["weight"], atol=1e-6)
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"] == alone["best_epoch"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["loss"] for h in ranks[0]["history"]] == pytest.approx([h["loss"] for h in alone["history"]], abs=1e-6)
    assert ranks[0]["gathered_rows"] == ranks[1]["gathered_rows"] == [distributed_toy.ROWS] * 5


@pytest.mark.slow
def test_torchrun_two_cpu_processes_fine_tune_and_write_one_model(real_manifest: Path, tmp_path: Path) -> None:
    """`fusion train` under torchrun, end-to-end scope (the many-GPU path) with gloo; one poster unreadable."""
    from posterfusion.predict import Predictor

    (tmp_path / "data").mkdir()
    manifest = copy_real_posters(real_manifest, tmp_path / "data", step=397, count=24)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    broken = tmp_path / "data" / "posters" / "broken.jpg"
    broken.write_bytes((tmp_path / "data" / table["poster"][0]).read_bytes()[:300])  # truncated: never readable
    extra = pd.DataFrame([{"poster": "posters/broken.jpg", "genres": "Drama", "split": "train"}])
    pd.concat([table, extra]).to_csv(manifest, index=False)
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"min_genre_posters": 2, "optim": {"epochs": 2, "ensemble": 1}, "backbone": "efficientnet_lite0",
                                      "finetune": {"enabled": True, "scope": "all", "epochs": 1, "batch_size": 4}}))
    cache, out = tmp_path / "cache", tmp_path / "runs" / "model"

    run = torchrun(str(FUSION), "train", "--manifest", str(manifest), "--cache", str(cache), "--config", str(config),
                   "--out", str(out), "--device", "cpu")
    assert run.stdout.count("trained fusion on 16 posters") == 1, run.stdout  # rank 0 alone reports
    assert run.stderr.count("broken.jpg") == 1, run.stderr  # rank 0 skips and reports it; rank 1 reads the cache

    # One model folder, in the format of a fine-tune in one process (tests/test_finetune.py).
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["model"]
    card = json.loads((out / "card.json").read_text())
    assert card["words"]["fitted"]  # the word model too: rank 0 alone reads the val posters' text
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "card.json", "model.safetensors",
                                                     "words.safetensors"]
    shipped = json.loads((REPO / "weights" / "default_model" / "card.json").read_text())
    assert list(card) == list(shipped) and list(card["training"]) == list(shipped["training"])
    assert card["backbone"]["weights_file"] == "backbone.safetensors"
    assert card["backbone"]["weights_sha256"] != card["backbone"]["fine_tuned_from"]
    assert sorted(card["training"]["finetune"]) == ["best_epoch", "best_val_map", "history", "scope"]
    assert card["training"]["finetune"]["scope"] == "all"
    assert card["training"]["unreadable_posters"] == 1
    assert card["training"]["train_posters"] + card["training"]["val_posters"] == 24

    predictor = Predictor(out, "cpu")
    assert predictor.models.backbone.weights_sha256 == card["backbone"]["weights_sha256"]
    posters = [str(tmp_path / "data" / p) for p in table["poster"][:2]]
    # rank 0 wrote the tuned backbone's embeddings to the cache: they are the ones it computes
    for a, b in zip(predictor.predict(posters), predictor.predict(posters, cache)):
        assert not a.error and max(abs(a.probabilities[g] - b.probabilities[g]) for g in a.probabilities) < 1e-3
