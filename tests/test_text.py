"""The text detector (OCR) on real and made-up posters, its cache store, and the text branch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from posterfusion.detectors import schema
from posterfusion.detectors.text import Line, TextReader, prepare
from posterfusion.images import decode_bytes

WORDS = [c.startswith("text_word_") for c in schema.TEXT_COLUMNS]


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader()


def _title_poster(lines: list[tuple[str, int]], size: tuple[int, int] = (182, 268)) -> np.ndarray:
    """A dark poster with text lines (text, top pixel) in a font matplotlib ships (Latin, Greek, Cyrillic)."""
    import matplotlib

    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans-Bold.ttf"), 28)
    image = Image.new("RGB", size, (20, 20, 60))
    draw = ImageDraw.Draw(image)
    for text, top in lines:
        draw.text((10, top), text, font=font, fill=(255, 255, 255))
    return np.array(image)


@pytest.mark.slow
def test_reads_the_title_off_a_real_poster(reader: TextReader, real_manifest: Path) -> None:
    rgb = decode_bytes((real_manifest.parent / "posters" / "tt0000001.jpg").read_bytes())  # "Carmencita", 1894
    lines, detected, area = reader.read(prepare(rgb))
    assert any("carmencita" in line.text.lower() for line in lines), lines
    assert detected >= len(lines) > 0 and 0 < area < 1
    title = next(line for line in lines if "carmencita" in line.text.lower())
    assert title.box[1] < 0.2  # printed at the top
    features = schema.text_features(lines, detected, area)
    assert features.shape == (len(schema.TEXT_COLUMNS),)
    assert features[np.asarray(WORDS)].sum() >= 1


def test_a_text_free_image_reads_nothing(reader: TextReader) -> None:
    lines, detected, area = reader.read(prepare(np.full((268, 182, 3), 128, np.uint8)))
    assert (lines, detected, area) == ([], 0, 0.0)
    assert not schema.text_features(lines, detected, area).any()


def test_a_non_latin_title_is_found_where_it_is(reader: TextReader) -> None:
    """PP-OCRv4 reads Chinese and Latin script; Cyrillic or Greek come out as look-alike letters,
    but the lines are found at their places and still give words and features."""
    rgb = _title_poster([("ЛЕВИАФАН", 20), ("ΟΔΥΣΣΕΙΑ", 200)])
    lines, detected, area = reader.read(prepare(rgb))
    assert detected == 2 and len(lines) == 2
    assert lines[0].box[1] < 0.2 and lines[1].box[1] > 0.7  # top to bottom
    features = dict(zip(schema.TEXT_COLUMNS, schema.text_features(lines, detected, area)))
    assert features["text_lines"] == 2 and features["text_title_y"] < 0.9
    assert features["text_upper"] > 0.8  # capitals


def test_words_in_any_script_are_hashed() -> None:
    assert schema.words("Москва слезам не верит (1980) 千と千尋 Die Olympischen Spiele") == [
        "москва", "слезам", "не", "верит", "千と千尋", "die", "olympischen", "spiele"]
    line = Line("Москва слезам не верит", 0.9, (0.1, 0.1, 0.9, 0.2))
    counts = schema.text_features([line], 1, 0.08)[np.asarray(WORDS)]
    assert counts.sum() == 4 and counts.max() <= 2


def test_prepare_shrinks_large_posters_to_bgr() -> None:
    rgb = np.zeros((3000, 2000, 3), np.uint8)
    rgb[..., 0] = 255  # red
    bgr = prepare(rgb)
    assert bgr.shape == (1024, 683, 3) and bgr[0, 0].tolist() == [0, 0, 255]


@pytest.mark.slow
def test_text_store_through_the_build(tmp_path: Path, real_manifest: Path) -> None:
    from posterfusion.extract import build_cache, open_stores
    from posterfusion.frozen import FrozenModels

    posters = real_manifest.parent / "posters"
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((268, 182, 3), 90, np.uint8)).save(blank)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a poster")
    paths = [str(posters / "tt0000001.jpg"), str(blank), str(broken)]
    models = FrozenModels(None, None, "cpu", text=True)
    stores = open_stores(models, tmp_path / "cache")
    assert set(stores) == {"text"} and stores["text"].identity["name"] == "pp-ocrv4"
    summary = build_cache(paths, stores, models, batch_size=4, workers=0)
    assert summary.done == 2 and summary.failed == 1 and summary.failures[0][0] == str(broken)
    keys, values = stores["text"].read([k for k in summary.keys if k])
    rows = dict(zip(keys, values))
    assert rows[summary.keys[0]][schema.TEXT_COLUMNS.index("text_read_lines")] >= 1
    assert not rows[summary.keys[1]].any()
    read = stores["text"].notes(keys)  # the lines read, kept for predict's evidence
    assert "carmencita" in read[summary.keys[0]].lower() and read[summary.keys[1]] == ""
    again = build_cache(paths, open_stores(models, tmp_path / "cache"), models, batch_size=4, workers=0)
    assert again.done == 0 and again.cached == 2


def test_text_branch_learns_from_words() -> None:
    """A head with only the text branch learns genres that its words give away."""
    from posterfusion.config import load_config
    from posterfusion.features import Features
    from posterfusion.model import predict_proba
    from posterfusion.train import fit_head
    from posterfusion import metrics

    rng = np.random.default_rng(0)
    n = 1000
    y = (rng.random((n, 3)) < 0.3).astype(np.float32)
    text = rng.poisson(0.02, (n, len(schema.TEXT_COLUMNS))).astype(np.float32)
    word = schema.TEXT_COLUMNS.index("text_word_000")
    text[:, word : word + 3] += y * 2  # each genre has its word
    config = load_config(None, {"mode": "text", "optim": {"epochs": 20, "patience": 20, "batch_size": 64}})
    train, val = np.arange(800), np.arange(800, n)
    head, _ = fit_head(Features(text=text), y, train, val, config, torch.device("cpu"))
    assert head.use_text and not head.use_cnn and not head.use_detectors
    prob = predict_proba(head, Features(text=text[val]))
    assert metrics.mean_average_precision(y[val], prob) > 0.8  # the genres' frequency alone: ~0.3


@pytest.mark.slow
def test_a_model_whose_text_was_read_otherwise_is_refused(tmp_path: Path) -> None:
    """Text read under other OCR settings (here rapidocr's own 6 lines a call, padded to the widest,
    before each line was read alone) is other text: a model trained on it is refused, in one line."""
    import json
    import shutil

    from posterfusion.errors import PosterFusionError
    from posterfusion.predict import Predictor, default_model_dir

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    card = json.loads((model / "card.json").read_text())
    assert card["text"]["rec_batch"] == 1
    del card["text"]["rec_batch"]
    (model / "card.json").write_text(json.dumps(card))
    with pytest.raises(PosterFusionError, match="other settings") as refused:
        Predictor(model, device="cpu")
    assert str(model) in str(refused.value) and "\n" not in str(refused.value)
    Predictor(model, device="cpu", words=False)  # the head alone reads no text
