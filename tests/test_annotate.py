"""Annotated posters and explanations: `fusion predict --annotate DIR` draws the boxes where the
detectors found them, labels stay inside the picture, and `--json` carries the explanation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyModel, share_models
from PIL import Image
from typer.testing import CliRunner

from helpers import assert_one_line_error
from posterfusion.annotate import FACE_COLOR, HEADER, MARGIN, POSTER_HEIGHT, TEXT_COLOR, box_pixels, object_color, render
from posterfusion.cli import fusion_app
from posterfusion.detectors.base import COCO_CLASSES, EXPRESSIONS, Detections
from posterfusion.explain import GRID_COLS, GRID_ROWS, Explanation
from posterfusion.images import load_poster
from posterfusion.predict import Prediction


def edge_share(image: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> float:
    """The share of a drawn box's outline pixels that have exactly ``color``."""
    x1, y1, x2, y2 = box
    edges = np.concatenate([image[y1, x1:x2 + 1], image[y2, x1:x2 + 1], image[y1:y2 + 1, x1], image[y1:y2 + 1, x2]])
    return float((edges == np.array(color, np.uint8)).all(axis=1).mean())


def fake(boxes: list[tuple[float, float, float, float]], labels: list[int]) -> tuple[Prediction, Explanation]:
    genres = ["Drama", "Comedy", "Horror"]
    prediction = Prediction("p.jpg", ["Drama"], {"Drama": 0.7, "Comedy": 0.2, "Horror": 0.05}, {"objects": {"person": 1}, "faces": 0})
    heat = np.zeros((GRID_ROWS, GRID_COLS), np.float32)
    heat[0, 0] = 0.2
    explanation = Explanation(
        Detections(np.array(boxes, np.float32), np.full(len(boxes), 0.9, np.float32), np.array(labels, np.int64)),
        Detections.empty(), np.zeros((0, len(EXPRESSIONS))), heat={"Drama": heat},
        contributions={"Drama": [("person", 0.05), ("colours", -0.01)]},
    )
    return prediction, explanation


def test_labels_are_moved_inside_the_poster_never_cut_off() -> None:
    rgb = np.full((300, 200, 3), 128, np.uint8)
    # A thin box at the top-right corner: its label is wider than the box and has no room above.
    prediction, explanation = fake([(0.9, 0.0, 1.0, 0.05)], [COCO_CLASSES.index("teddy bear")])
    drawn = render(rgb, prediction, explanation, ["Drama", "Comedy", "Horror"], np.array([0.5, 0.3, 0.1]))
    x, y, w, h = drawn.poster
    assert (w, h) == (round(200 * POSTER_HEIGHT / 300), POSTER_HEIGHT)
    assert drawn.heat is not None and drawn.heat[0] == x + w + MARGIN
    panel = np.asarray(drawn.image)[y:y + h, x:x + w]
    colour = np.array(object_color(COCO_CLASSES.index("teddy bear")), np.uint8)
    columns = np.flatnonzero((panel[:30] == colour).all(axis=2).any(axis=0))
    assert columns.size > 80  # the whole label ("teddy bear 0.90"), not the 37-pixel box alone
    assert columns.max() == w - 1  # pushed left to end at the poster's edge, none of it cut off
    # The heat map's strongest cell (top left) is red, a cell that did not matter is grey.
    hx, hy, hw, hh = drawn.heat
    heat = np.asarray(drawn.image)[hy:hy + hh, hx:hx + hw].astype(int)
    corner, far = heat[10, 10], heat[hh - 10, hw - 10]
    assert corner[0] - corner[1] > 100 and abs(far[0] - far[1]) < 5


@pytest.mark.slow
def test_predict_annotate_draws_the_detections_where_they_were_found(tiny_model: TinyModel, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    share_models(monkeypatch)
    posters = tiny_model.posters[:3]
    out = tmp_path / "annotated"
    result = CliRunner().invoke(fusion_app, ["predict", *map(str, posters), "--model", str(tiny_model.model),
                                             "--annotate", str(out), "--json", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["poster"] for r in records] == [str(p) for p in posters]
    seen = {"objects": 0, "faces": 0, "text": 0}
    for poster, record in zip(posters, records):
        png = out / f"{poster.stem}.png"
        assert record["evidence"]["annotated"] == str(png)
        why = record["evidence"]["explanation"]
        top = [g for g, _ in record["top"]]
        assert list(why["heat_map"]) == top and all(np.asarray(why["heat_map"][g]).shape == (GRID_ROWS, GRID_COLS) for g in top)
        assert list(why["contributions"]) == top and why["contributions"][top[0]]
        assert {c["feature"] for c in why["contributions"][top[0]]} <= {*COCO_CLASSES, "people layout", "faces", "expressions",
                                                                        "colours", "text read", "picture (CNN)", "words read"}
        counted = {label: sum(o["label"] == label for o in why["objects"]) for label in record["evidence"]["objects"]}
        assert counted == record["evidence"]["objects"]  # the boxes drawn are the detections the features count
        assert len(why["faces"]) == record["evidence"]["faces"]

        rgb = load_poster(poster).rgb
        image = np.asarray(Image.open(png).convert("RGB"))
        width = round(rgb.shape[1] * POSTER_HEIGHT / rgb.shape[0])
        assert image.shape[0] >= HEADER + POSTER_HEIGHT and image.shape[1] > 2 * width + 300
        panel = image[HEADER:HEADER + POSTER_HEIGHT, MARGIN:MARGIN + width]
        kinds = [("objects", o, object_color(COCO_CLASSES.index(o["label"]))) for o in why["objects"]]
        kinds += [("faces", f, FACE_COLOR) for f in why["faces"]] + [("text", t, TEXT_COLOR) for t in why["text"]]
        for kind, found, colour in kinds:
            box = box_pixels(found["box"], (width, POSTER_HEIGHT))
            assert edge_share(panel, box, colour) > 0.4, (poster.name, kind, found)  # later labels may cover a little
            seen[kind] += 1
    assert seen["objects"] and seen["text"], seen  # these posters have people and titles


def test_annotate_into_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    existing = tmp_path / "taken"
    existing.write_text("x")
    result = CliRunner().invoke(fusion_app, ["predict", str(tmp_path / "p.jpg"), "--annotate", str(existing)])
    assert_one_line_error(result, "--annotate", str(existing), "is a file")
