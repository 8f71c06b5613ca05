"""`fusion train`, `fusion predict` and `fusion evaluate` end to end: the "Fusion model" acceptance.

The slow tests train once per module (``trained``) on the real posters of the session cache
(``real_cache`` in conftest.py), so no detector runs twice over a real poster; the fast ones check
the one-line errors that come before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import share_models
from typer.testing import CliRunner

from helpers import assert_figure_has_content, assert_one_line_error
from posterfusion.cli import fusion_app
from posterfusion.features import gather
from posterfusion.model import FusionEnsemble, ModelCard, load_model, save_model
from posterfusion.predict import Predictor, default_model_dir
from posterfusion.config import load_config
from posterfusion.manifest import label_matrix
from posterfusion.model import predict_proba
from posterfusion.train import fit_head, split_rows
from posterfusion.manifest import load_manifest

METRIC_KEYS = ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy", "per_genre")


def invoke(*args: object):
    """Run a `fusion` command in-process; unexpected exceptions propagate with their traceback."""
    return CliRunner().invoke(fusion_app, [str(a) for a in args], catch_exceptions=False)


def copy_model(model: Path, dest: Path, **card_changes) -> Path:
    shutil.copytree(model, dest)
    card = json.loads((dest / "card.json").read_text())
    card.update(card_changes)
    (dest / "card.json").write_text(json.dumps(card))
    return dest


# --- fast: errors before any model loads ----------------------------------------------------------


@pytest.mark.parametrize("yaml_text, key", [
    ("bogus: 1\n", "'bogus'"),
    ("optim:\n  epochz: 3\n", "'epochz'"),
])
def test_unknown_config_key_is_a_one_line_error(tiny_manifest: Path, tmp_path: Path, yaml_text: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    result = invoke("train", "--manifest", tiny_manifest, "--config", config, "--out", tmp_path / "model",
                    "--cache", tmp_path / "cache")
    assert_one_line_error(result, str(config), "unknown config key", key)
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()


def test_bad_config_values_are_one_line_errors(tiny_manifest: Path, tmp_path: Path) -> None:
    out = ["--out", tmp_path / "model", "--cache", tmp_path / "cache"]
    assert_one_line_error(invoke("train", "--manifest", tiny_manifest, "--mode", "banana", *out), "mode must be one of")
    assert_one_line_error(invoke("train", "--manifest", tiny_manifest, "--config", tmp_path / "no.yaml", *out),
                          "config file not found")
    (tmp_path / "broken.yaml").write_text("optim: [unclosed\n")
    assert_one_line_error(invoke("train", "--manifest", tiny_manifest, "--config", tmp_path / "broken.yaml", *out),
                          "not valid YAML")


def test_predict_without_posters_or_model_is_a_one_line_error(tmp_path: Path, tiny_manifest: Path) -> None:
    assert_one_line_error(invoke("predict", "--model", tmp_path), "no posters given")
    poster = tiny_manifest.parent / "img" / "p0.jpg"
    assert_one_line_error(invoke("predict", poster, "--model", tmp_path / "none"), "card.json: not found")
    assert_one_line_error(invoke("evaluate", "--manifest", tiny_manifest, "--model", tmp_path / "none"),
                          "card.json: not found")


# --- slow: one model trained on real posters ------------------------------------------------------


@dataclass
class Trained:
    model: Path
    cache: Path
    stdout: str
    stderr: str
    card: ModelCard


@pytest.fixture(scope="module")
def trained(real_cache, frozen_models, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`fusion train` once, on the real training posters (all cached: no detector runs). The head
    alone: the word model, which reads text off every poster predicted, has tests of its own
    (test_words.py)."""
    folder = tmp_path_factory.mktemp("trained")
    model, config = folder / "model", folder / "head_only.yaml"
    config.write_text("words:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        share_models(mp)
        result = invoke("train", "--manifest", real_cache.train_manifest, "--cache", real_cache.cache,
                        "--out", model, "--seed", 0, "--config", config)
    assert result.exit_code == 0, result.output
    card = ModelCard.from_json(json.loads((model / "card.json").read_text()))
    return Trained(model, real_cache.cache, result.stdout, result.stderr, card)


@pytest.mark.slow
def test_train_cli_writes_a_model_and_its_card(trained: Trained, real_cache) -> None:
    assert (trained.model / "model.safetensors").is_file()
    card = trained.card
    n_train = len(pd.read_csv(real_cache.train_manifest))
    assert card.training["posters_used"] == n_train and card.training["unreadable_posters"] == 0
    assert card.training["train_posters"] + card.training["val_posters"] == n_train
    assert len(card.genres) == len(card.thresholds) == len(card.train_genre_frequency) >= 5
    assert card.detectors["objects"]["name"] == "nanodet" and card.backbone is not None
    assert "epoch   1" in trained.stderr  # one line per epoch
    assert trained.stdout.startswith(f"trained fusion on {card.training['train_posters']} posters")
    assert str(trained.model) in trained.stdout


@pytest.mark.slow
def test_training_learns_far_above_the_genre_prior(trained: Trained, real_cache, shared_models,
                                                   tmp_path: Path) -> None:
    validation = trained.card.validation
    print(f"\nvalidation mAP {validation['map']:.3f} vs genre prior {validation['prior_map']:.3f} "
          f"on {validation['n_posters']} posters")
    assert validation["map"] >= validation["prior_map"] + 0.1
    assert validation["map"] >= 1.4 * validation["prior_map"]

    # Also on posters the model never saw, training or validation.
    out = tmp_path / "held_out.json"
    result = invoke("evaluate", "--manifest", real_cache.eval_manifest, "--model", trained.model,
                    "--cache", real_cache.cache, "--json", out)
    assert result.exit_code == 0, result.output
    held_out = json.loads(out.read_text())
    print(result.stdout.splitlines()[-1])
    assert held_out["map"] >= held_out["prior_map"] + 0.05


@pytest.mark.slow
def test_save_and_load_give_identical_predictions(real_cache, frozen_models, tmp_path: Path) -> None:
    manifest = load_manifest(real_cache.train_manifest)
    table = gather(manifest.paths, frozen_models, real_cache.cache)
    genres = manifest.genres()[:8]
    y = label_matrix(manifest, table.rows, genres)
    heads = []
    for seed in (0, 1):
        config = load_config(None, {"optim": {"epochs": 3}, "seed": seed})
        train, val = split_rows(manifest, table.rows, y, config)
        heads.append(fit_head(table.features, y, train, val, config, frozen_models.device)[0])
    model = FusionEnsemble(heads)
    before = predict_proba(model, table.features)

    save_model(tmp_path / "m", model, ModelCard(genres=genres, thresholds=[0.5] * len(genres)))
    loaded, card = load_model(tmp_path / "m")
    assert card.genres == genres and card.head == heads[0].config.to_dict()
    after = predict_proba(loaded, table.features)
    assert np.array_equal(before, after)
    # The standardisers travel with the weights: not the identity transform after loading.
    stds = [v for k, v in loaded.state_dict().items() if k.endswith("detector_norm.std")]
    assert stds and not any(np.allclose(v.numpy(), 1.0) for v in stds)


@pytest.mark.slow
def test_predictor_matches_the_trained_head(trained: Trained, real_cache, shared_models, tmp_path: Path) -> None:
    paths = pd.read_csv(real_cache.eval_manifest)["poster"].tolist()
    head, _ = load_model(trained.model)
    table = gather(paths, shared_models, real_cache.cache)
    direct = predict_proba(head, table.features)

    resaved = tmp_path / "resaved"
    save_model(resaved, head, ModelCard.from_json(trained.card.to_json()))
    for model in (trained.model, resaved):
        predictions = Predictor(model, "cpu").predict(paths, real_cache.cache)
        probs = np.array([[p.probabilities[g] for g in trained.card.genres] for p in predictions])
        assert np.array_equal(probs, direct.astype(np.float64))


def _assert_threshold_rule(predictions, genres: list[str], thresholds: list[float]) -> None:
    for p in predictions:
        assert not p.error
        passing = [g for g, t in zip(genres, thresholds) if p.probabilities[g] >= np.float32(t)]
        expected = sorted(passing, key=lambda g: -p.probabilities[g]) or [max(genres, key=p.probabilities.get)]
        assert p.genres == expected


@pytest.mark.slow
def test_thresholds_decide_the_genres(trained: Trained, real_cache, shared_models, tmp_path: Path) -> None:
    paths = pd.read_csv(real_cache.eval_manifest)["poster"].tolist()
    genres, thresholds = trained.card.genres, trained.card.thresholds
    predictions = Predictor(trained.model, "cpu").predict(paths, real_cache.cache)
    _assert_threshold_rule(predictions, genres, thresholds)
    assert len({tuple(p.genres) for p in predictions}) > 1

    # None passes: each poster gets its single most probable genre.
    strict = copy_model(trained.model, tmp_path / "strict", thresholds=[2.0] * len(genres))
    for p in Predictor(strict, "cpu").predict(paths[:10], real_cache.cache):
        assert p.genres == [max(genres, key=p.probabilities.get)]
    # All pass: every genre, most probable first.
    lax = copy_model(trained.model, tmp_path / "lax", thresholds=[0.0] * len(genres))
    for p in Predictor(lax, "cpu").predict(paths[:10], real_cache.cache):
        assert p.genres == sorted(genres, key=lambda g: -p.probabilities[g])
    # One genre always passes, the others never: it alone.
    only = [0.0 if g == genres[-1] else 2.0 for g in genres]
    one = copy_model(trained.model, tmp_path / "one", thresholds=only)
    for p in Predictor(one, "cpu").predict(paths[:10], real_cache.cache):
        assert p.genres == [genres[-1]]


@pytest.fixture
def poster_folder(real_cache, tmp_path: Path) -> Path:
    """Copies of three real posters (cache hits by content) and one unreadable file."""
    folder = tmp_path / "posters"
    folder.mkdir()
    for i, path in enumerate(real_cache.paths[:3]):
        shutil.copy(path, folder / f"poster{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.mark.slow
def test_predict_text_and_top_k(trained: Trained, poster_folder: Path, shared_models) -> None:
    posters = sorted(poster_folder.glob("poster*.jpg"))[:2]
    # No --cache: features are computed in memory for these two.
    result = invoke("predict", *posters, "--model", trained.model, "--top-k", 2)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    heads = [line for line in lines if not line.startswith("    ")]
    assert [h.split(": ")[0] for h in heads] == [str(p) for p in posters]
    for h in heads:
        genres, top = h.split(": ", 1)[1].split("   [")
        assert all(g in trained.card.genres for g in genres.split(" | "))
        assert len(top.rstrip("]").split(", ")) == 2
    assert sum(line.startswith("    saw: ") for line in lines) == 2
    assert "2 posters predicted, 0 skipped" in result.stderr


@pytest.mark.slow
def test_predict_folder_with_an_unreadable_poster(trained: Trained, poster_folder: Path, real_cache,
                                                  shared_models, tmp_path: Path) -> None:
    cache = real_cache.copy(tmp_path / "cache")
    result = invoke("predict", poster_folder, "--model", trained.model, "--cache", cache)
    assert result.exit_code == 0, result.output
    assert len([line for line in result.stdout.splitlines() if not line.startswith("    ")]) == 3
    assert f"{poster_folder / 'broken.jpg'}: skipped: " in result.stderr
    assert "3 posters predicted, 1 skipped" in result.stderr


@pytest.mark.slow
def test_predict_samples_with_a_trained_model(trained: Trained, shared_models) -> None:
    from posterfusion.predict import sample_images

    samples = sample_images()
    assert [p.name for p in samples] == ["astronaut.jpg", "chelsea.jpg"]
    result = invoke("predict", "--samples", "--model", trained.model, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["poster"] for r in records] == [str(p) for p in samples]
    assert all(r["genres"] and r["error"] is None for r in records)
    assert any(r["evidence"]["objects"].get("person") for r in records)  # astronaut.jpg shows one


@pytest.mark.slow
def test_predict_json_lines(trained: Trained, poster_folder: Path, real_cache, shared_models) -> None:
    result = invoke("predict", poster_folder, "--model", trained.model, "--cache", real_cache.cache,
                    "--json", "--top-k", 4)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["poster"]).name for r in records] == ["broken.jpg", "poster0.jpg", "poster1.jpg", "poster2.jpg"]
    broken, *good = records
    assert broken["error"] and not broken["genres"] and not broken["probabilities"]
    for r in good:
        assert r["error"] is None and r["genres"] and set(r["genres"]) <= set(r["probabilities"])
        assert set(r["probabilities"]) == set(trained.card.genres)
        assert len(r["top"]) == 4 and r["top"][0][1] == max(r["probabilities"].values())
        assert set(r["evidence"]) >= {"objects", "faces"}


@pytest.mark.slow
def test_predict_csv(trained: Trained, poster_folder: Path, real_cache, shared_models) -> None:
    result = invoke("predict", poster_folder, "--model", trained.model, "--cache", real_cache.cache, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    genres = trained.card.genres
    assert rows[0] == ["poster", "genres", *genres, "error"]
    assert len(rows) == 5
    by_name = {Path(r[0]).name: r for r in rows[1:]}
    assert by_name["broken.jpg"][-1] and by_name["broken.jpg"][2:-1] == [""] * len(genres)
    for name in ("poster0.jpg", "poster1.jpg", "poster2.jpg"):
        row = by_name[name]
        assert row[-1] == "" and set(row[1].split("|")) <= set(genres)
        assert all(0.0 <= float(v) <= 1.0 for v in row[2:-1])


@pytest.mark.slow
def test_evaluate_cli_writes_json_and_plot(trained: Trained, real_cache, shared_models, tmp_path: Path) -> None:
    table = pd.read_csv(real_cache.eval_manifest, dtype=str, keep_default_na=False)
    plain = invoke("evaluate", "--manifest", real_cache.eval_manifest, "--model", trained.model,
                   "--cache", real_cache.cache, "--json", tmp_path / "plain.json")
    assert plain.exit_code == 0, plain.output

    # Unknown genres and an unreadable poster: reported, then left out of every metric.
    table.loc[0, "genres"] = table.loc[0, "genres"] + "|Space-Opera"
    table.loc[1, "genres"] = "Space-Opera|" + table.loc[1, "genres"]
    missing = dict(table.iloc[2]) | {"poster": str(tmp_path / "missing.jpg")}
    table = pd.concat([table, pd.DataFrame([missing])], ignore_index=True)
    manifest = tmp_path / "eval.csv"
    table.to_csv(manifest, index=False)
    out, plot = tmp_path / "out" / "metrics.json", tmp_path / "pr.png"
    result = invoke("evaluate", "--manifest", manifest, "--model", trained.model, "--cache", real_cache.cache,
                    "--json", out, "--plot", plot)
    assert result.exit_code == 0, result.output
    ignored = [line for line in result.stdout.splitlines() if line.startswith("ignored genres the model does not know: ")]
    assert len(ignored) == 1 and "Space-Opera" in ignored[0]
    assert "1 posters could not be read and were left out" in result.stdout
    assert_figure_has_content(plot)

    metrics = json.loads(out.read_text())
    for key in METRIC_KEYS:
        assert key in metrics
    reference = json.loads((tmp_path / "plain.json").read_text())
    # Genres too rare to enter the model's vocabulary (min_genre_posters) are unknown too.
    assert metrics["unknown_genres"] == sorted(reference["unknown_genres"] + ["Space-Opera"])
    assert not set(metrics["unknown_genres"]) & set(trained.card.genres)
    assert [u["path"] for u in metrics["unreadable_posters"]] == [str(tmp_path / "missing.jpg")]
    assert metrics["n_posters"] == len(table) - 1
    assert [g["genre"] for g in metrics["per_genre"]] == trained.card.genres
    for g in metrics["per_genre"]:
        assert set(g) >= {"genre", "ap", "f1", "precision", "recall", "support", "threshold"}
    assert 0.0 < metrics["map"] <= 1.0 and metrics["map"] > metrics["prior_map"]

    for key in METRIC_KEYS:
        assert metrics[key] == reference[key], key  # the unknown genre changed nothing
    assert f"evaluated {metrics['n_posters']} posters: mAP {metrics['map']:.3f}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("part", ["detectors", "backbone"])
def test_model_from_other_detectors_is_refused(trained: Trained, real_cache, shared_models, tmp_path: Path,
                                               part: str) -> None:
    identity = json.loads(json.dumps(getattr(trained.card, part)))
    if part == "detectors":
        identity["objects"]["weights_sha256"] = "0" * 64
        fragment = "model was trained on detector features"
    else:
        identity["weights_sha256"] = "0" * 64
        fragment = "model was trained on backbone"
    model = copy_model(trained.model, tmp_path / "other", **{part: identity})
    result = invoke("predict", real_cache.paths[0], "--model", model)
    assert_one_line_error(result, str(model), fragment, "retrain")
    result = invoke("evaluate", "--manifest", real_cache.eval_manifest, "--model", model)
    assert_one_line_error(result, fragment)


@pytest.mark.slow
def test_a_training_that_fails_while_saving_leaves_the_previous_model_whole(tiny_model, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An injected full disk after the new weights are written: the old model is untouched and loads."""
    import errno

    from posterfusion import train as train_module
    from posterfusion.errors import DiskFull

    model = tmp_path / "model"
    shutil.copytree(tiny_model.model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    real_save = train_module.save_model

    def save_then_fail(out_dir, head, card):
        real_save(out_dir, head, card)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module, "save_model", save_then_fail)
    share_models(monkeypatch)
    config = load_config(None, {"text": True, "min_genre_posters": 2, "seed": 1, "optim": {"epochs": 2, "ensemble": 1}})
    with pytest.raises(DiskFull, match="disk full while writing the model; what was there is unchanged"):
        train_module.train(tiny_model.manifest, tiny_model.cache, config, model, device="cpu")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written folder beside it
    load_model(model)


@pytest.mark.slow
def test_training_on_combined_collections_uses_each_ones_split(tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two collections joined by `fusion manifest combine` train one model: their train and val rows
    are used, their test rows held out, and the source column is carried along untouched."""
    from posterfusion.manifest_tools import combine_manifests, write_manifest
    from posterfusion.manifest import load_manifest
    from posterfusion.train import collections, train

    table = pd.read_csv(tiny_model.manifest, dtype=str, keep_default_na=False)
    halves = []
    for k, part in enumerate((table.iloc[::2], table.iloc[1::2])):
        part = part.copy()
        part["poster"] = [str(tiny_model.manifest.parent / p) for p in part["poster"]]
        part.loc[part.index[:2], "split"] = "test"
        halves.append(tmp_path / f"half{k}.csv")
        part.to_csv(halves[-1], index=False)
    combined, repeated = combine_manifests(halves, tmp_path)
    assert repeated == 0 and combined["source"].nunique() == 2
    write_manifest(combined, tmp_path / "all.csv")
    share_models(monkeypatch)
    config = load_config(None, {"text": True, "min_genre_posters": 2, "words": {"enabled": False},
                                "optim": {"epochs": 2, "ensemble": 1}})
    card = train(tmp_path / "all.csv", tiny_model.cache, config, tmp_path / "model", device="cpu")
    splits = combined["split"].str.lower()
    assert card.training["train_posters"] == int((splits == "train").sum())
    assert card.training["val_posters"] == int((splits == "val").sum())  # the 4 test rows in neither
    manifest = load_manifest(tmp_path / "all.csv")
    rows = np.arange(len(combined))
    assert list(collections(manifest, rows)) == list(combined["source"])  # each test row scored with its own collection
    single = load_manifest(halves[0])
    assert set(collections(single, np.arange(len(single.table)))) == {str(halves[0])}


def test_the_model_card_reads_and_writes_the_same_json() -> None:
    shipped = json.loads((default_model_dir() / "card.json").read_text())
    card = ModelCard.from_json(shipped)
    assert card.to_json() == shipped and list(card.to_json()) == list(shipped)
    assert card.has_words and card.genres == shipped["genres"] and card.extra == {}
    older = {k: v for k, v in shipped.items() if k not in ("train_genre_frequency", "words", "cnn_parts")}
    loaded = ModelCard.from_json(older | {"added_by_a_newer_version": 1})
    assert loaded.words is None and not loaded.has_words and loaded.cnn_parts is None and loaded.ensemble == shipped["ensemble"]
    assert loaded.to_json()["added_by_a_newer_version"] == 1  # kept, and written back
