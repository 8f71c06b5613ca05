"""The word model: TF-IDF as scikit-learn computes it, genre words learnt, late fusion, its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posterfusion.errors import PosterFusionError
from posterfusion.words import WORDS_FILE, WordModel

GENRES = ["Horror", "Romance", "Drama"]
HORROR = ["Night of the Zombie", "Zombie Blood", "The Haunting", "Haunting Blood", "Zombie Night"]
ROMANCE = ["Love in Paris", "A Love Story", "Paris Kiss", "Kiss Me Love", "Love Letters"]
OTHER = ["The River", "A River Story", "Night Train", "The Letters", "Train Story"]


def _fitted() -> tuple[WordModel, list[str], np.ndarray]:
    docs = HORROR + ROMANCE + OTHER
    y = np.zeros((len(docs), 3), np.float32)
    y[:5, 0] = 1
    y[5:10, 1] = 1
    y[:, 2] = 1  # every poster a drama: a genre with no negatives keeps its prior
    return WordModel.fit(docs, y), docs, y


def test_features_are_scikit_learns_tfidf() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from posterfusion.words import terms

    model, docs, _ = _fitted()
    reference = TfidfVectorizer(analyzer=terms, min_df=2, sublinear_tf=True).fit(docs)
    probe = ["zombie zombie love", "NIGHT / of the / Paris", "nothing known here", "", "ZOMBlE"]
    assert model.vocabulary == sorted(reference.vocabulary_, key=reference.vocabulary_.get)
    np.testing.assert_allclose(model.features(probe).toarray(), reference.transform(probe).toarray(), atol=1e-6)


def test_genre_words_move_their_genre() -> None:
    model, _, _ = _fitted()
    zombie, love, blank = model.logits(["ZOMBIE", "love", ""])
    assert zombie[0] > blank[0] > love[0]  # "zombie" says horror, "love" says not horror
    assert love[1] > blank[1] > zombie[1]
    np.testing.assert_allclose(blank, model.intercept)  # a text-free poster gets the intercepts
    assert model.coef[:, 2].tolist() == [0.0] * len(model.vocabulary) and model.intercept[2] > 5


def test_mix_is_the_head_at_weight_zero_and_chosen_on_validation() -> None:
    model, docs, y = _fitted()
    rng = np.random.default_rng(0)
    head = rng.uniform(0.2, 0.8, size=y.shape).astype(np.float32)  # a head that knows nothing
    np.testing.assert_allclose(model.mix(head, docs, 0.0), head, atol=1e-5)
    two = _two_genre(model)
    head_map, mixed_map = two.choose_weight(y[:, :2], head[:, :2], docs)
    assert (two.weight > 0).all() and mixed_map > head_map  # the words help a head that knows nothing
    for g in range(2):  # each genre's weight is the best one tried for it
        from posterfusion.metrics import average_precision_per_genre
        from posterfusion.words import WEIGHTS

        best = max(average_precision_per_genre(y[:, :2], two.mix(head[:, :2], docs, w))[g] for w in WEIGHTS)
        assert average_precision_per_genre(y[:, :2], two.mix(head[:, :2], docs))[g] == best


def _two_genre(model: WordModel) -> WordModel:
    return WordModel(model.vocabulary, model.idf, model.coef[:, :2], model.intercept[:2])


def test_a_head_that_knows_gets_little_weight() -> None:
    model, docs, y = _fitted()
    knowing = np.where(y[:, :2] > 0, 0.9, 0.1).astype(np.float32)
    two = _two_genre(model)
    two.choose_weight(y[:, :2], knowing, docs)
    assert two.weight.tolist() == [0.0, 0.0]  # words cannot beat a perfect ranking: the head alone is kept


def test_each_genre_gets_its_own_weight() -> None:
    model, docs, y = _fitted()
    rng = np.random.default_rng(1)
    head = np.stack([np.where(y[:, 0] > 0, 0.9, 0.1), rng.uniform(0.2, 0.8, len(y))], 1).astype(np.float32)
    two = _two_genre(model)
    two.choose_weight(y[:, :2], head, docs)
    assert two.weight[0] == 0.0 and two.weight[1] > 0  # horror: the head knows; romance: the words do


def test_non_latin_words_are_learnt() -> None:
    docs = ["Левиафан тьма", "тьма ночи", "Ночи тьма", "Свет любви", "любви свет", "свет дня"]
    y = np.array([[1], [1], [1], [0], [0], [0]], np.float32)
    model = WordModel.fit(docs, y)
    assert "тьма" in model.vocabulary
    dark, light = model.logits(["ТЬМА", "свет"])[:, 0]
    assert dark > light


def test_too_few_titles_are_refused() -> None:
    with pytest.raises(PosterFusionError, match="no word or part of one occurs in 2 or more"):
        WordModel.fit(["a", "b", "Zombie"], np.ones((3, 1), np.float32))


def test_terms_are_words_and_their_character_ngrams() -> None:
    from posterfusion.words import terms

    assert terms("Up!") == ["up", " up", "up ", " up "]
    # a misread letter still shares most n-grams with the word
    assert len(set(terms("zombie")) & set(terms("ZOMBlE"))) >= 4


def test_saved_and_loaded_alike(tmp_path: Path) -> None:
    model, docs, _ = _fitted()
    model.weight = np.array([0.35, 0.1, 0.0], np.float32)
    model.save(tmp_path)
    loaded = WordModel.load(tmp_path)
    assert loaded.vocabulary == model.vocabulary and loaded.weight.tolist() == pytest.approx([0.35, 0.1, 0.0])
    np.testing.assert_array_equal(loaded.logits(docs), model.logits(docs))


def test_a_damaged_file_is_named(tmp_path: Path) -> None:
    (tmp_path / WORDS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(PosterFusionError, match=f"{WORDS_FILE}: not a word model"):
        WordModel.load(tmp_path)
    with pytest.raises(PosterFusionError, match="not found"):
        WordModel.load(tmp_path / "elsewhere")


# --- slow: `fusion train` fits it, predict and evaluate apply it, on real posters ---------------


@pytest.mark.slow
def test_train_fits_the_word_model_and_predict_applies_it(real_cache, shared_models, tmp_path: Path) -> None:
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from posterfusion.cli import fusion_app
    from posterfusion.defaults import DEFAULT_BACKBONE
    from posterfusion.extract import open_stores
    from posterfusion.frozen import FrozenModels
    from posterfusion.features import gather
    from posterfusion.model import load_model
    from posterfusion.predict import Predictor
    from posterfusion.model import predict_proba

    cache, model = real_cache.copy(tmp_path / "cache"), tmp_path / "model"
    run = CliRunner().invoke(fusion_app, ["train", "--manifest", str(real_cache.train_manifest), "--cache", str(cache),
                                          "--out", str(model)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    card = json.loads((model / "card.json").read_text())
    words = card["words"]
    assert words["fitted"] and (model / WORDS_FILE).is_file() and words["vocabulary"] > 20
    assert len(words["weight"]) == len(card["genres"]) and all(0.0 <= w <= 0.9 for w in words["weight"])
    assert words["val_map_mixed"] >= words["val_map_head"]
    assert words["fitted_on"] == ["title", "ocr"]
    assert (f"word model: {words['vocabulary']} terms from the titles and the training posters' text"
            in run.stdout)
    assert card["text"]["name"] == "pp-ocrv4" and card["head"]["text_dim"] == 0  # OCR feeds the words, not the head
    # The training and validation posters were read, through the cache: their text is there now.
    read = open_stores(FrozenModels(None, None, "cpu", text=True), cache)["text"].notes(
        [k for k in gather(real_cache.paths, shared_models, cache).keys])
    assert len(read) == card["training"]["train_posters"] + card["training"]["val_posters"]

    # predict: the head's probabilities, moved by what the words make of each poster's text.
    paths = pd.read_csv(real_cache.eval_manifest)["poster"].tolist()[:12]
    predictions = Predictor(model, "cpu").predict(paths, cache)
    table = gather(paths, FrozenModels("nanodet", DEFAULT_BACKBONE, "cpu", text=True), cache)
    head, _ = load_model(model)
    word_model = WordModel.load(model)
    expected = word_model.mix(predict_proba(head, table.features), table.text_read)
    got = np.array([[p.probabilities[g] for g in card["genres"]] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [p.evidence["read"] for p in predictions] == table.text_read
    if word_model.weight.any():
        assert not np.allclose(got, predict_proba(head, table.features), atol=1e-4)

    result = CliRunner().invoke(fusion_app, ["evaluate", "--manifest", str(real_cache.eval_manifest), "--model",
                                             str(model), "--cache", str(cache)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    # --no-words: the head alone, its own thresholds, and no OCR.
    head_only = Predictor(model, "cpu", words=False)
    assert head_only.models.text is None and head_only.words is None
    assert head_only.thresholds.tolist() == pytest.approx(words["head_thresholds"])
    plain = head_only.predict(paths, cache)
    got = np.array([[p.probabilities[g] for g in card["genres"]] for p in plain])
    np.testing.assert_allclose(got, predict_proba(head, table.features), atol=1e-6)
    assert all("read" not in p.evidence for p in plain)
    quick = CliRunner().invoke(fusion_app, ["predict", paths[0], "--model", str(model), "--no-words", "--json"],
                               catch_exceptions=False)
    assert quick.exit_code == 0 and "read" not in json.loads(quick.stdout)["evidence"]


@pytest.mark.slow
def test_without_titles_or_training_text_the_head_trains_alone(real_cache, shared_models, tmp_path: Path) -> None:
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from posterfusion.cli import fusion_app

    manifest = tmp_path / "untitled.csv"
    pd.read_csv(real_cache.train_manifest).drop(columns=["title"]).to_csv(manifest, index=False)
    config = tmp_path / "fast.yaml"
    config.write_text("optim:\n  epochs: 2\n  ensemble: 1\nwords:\n  read_training_posters: false\n")
    run = CliRunner().invoke(fusion_app, ["train", "--manifest", str(manifest), "--cache", str(real_cache.copy(tmp_path / "c")),
                                          "--out", str(tmp_path / "model"), "--config", str(config)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["words"] == {"fitted": False, "why": f"{manifest}: no 'title' column to fit the word model on "
                                                     "(words.read_training_posters: true learns from OCR instead)"}
    assert card["text"] is None and not (tmp_path / "model" / WORDS_FILE).exists()
    assert f"no word model: {manifest}: no 'title' column" in run.stdout
