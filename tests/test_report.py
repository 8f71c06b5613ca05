"""`fusion evaluate --report`: one self-contained HTML file whose numbers are evaluate's own."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import TinyModel, share_models
from PIL import Image
from typer.testing import CliRunner

from helpers import assert_one_line_error, write_poster
from posterfusion import metrics
from posterfusion.cli import fusion_app
from posterfusion.report import THUMBS, predicted_as, render_report


class Cells(HTMLParser):
    """The report's tables as {table id: {row key: {cell key: text}}}, and every image source."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, str]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.table = self.row = self.cell = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(a.get("id", ""), {})
        elif tag == "tr" and self.table is not None:
            key = a.get("data-genre") or a.get("data-key")
            self.row = self.table.setdefault(key, {}) if key else None
        elif tag == "td" and self.row is not None:
            self.cell = a.get("data-key") or a.get("class")
        elif tag == "img":
            self.images.append(a.get("src", ""))
        for name in ("href", "src"):
            if name in a:
                self.links.append(a[name])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.table = None
        elif tag == "td":
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell and self.row is not None:
            self.row[self.cell] = self.row.get(self.cell, "") + data


def parse(text: str) -> Cells:
    cells = Cells()
    cells.feed(text)
    return cells


def shown(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def assert_matches(report: Cells, result: dict) -> None:
    """Every number of the headline and per-genre tables is the result's, to three decimals."""
    headline = report.tables["headline"]
    for key in ("map", "micro_f1", "macro_f1", "samples_f1", "top_n_accuracy"):
        assert headline[key]["model"] == shown(result[key]), key
    assert headline["map"]["prior"] == shown(result.get("prior_map"))
    table = report.tables["per-genre"]
    assert list(table) == [r["genre"] for r in result["per_genre"]]
    for r in result["per_genre"]:
        row = table[r["genre"]]
        assert {k: row[k] for k in ("ap", "f1", "precision", "recall")} == {k: shown(r[k]) for k in ("ap", "f1", "precision", "recall")}
        assert row["support"] == str(r["support"]) and row["threshold"] == f"{r['threshold']:.3f}"


def test_predicted_as_has_recall_on_the_diagonal() -> None:
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    decided = np.array([[1, 1], [0, 1], [0, 1], [1, 0]])
    shares = predicted_as(y, decided)
    assert shares.tolist() == [[0.5, 1.0], [0.0, 1.0]]


def test_report_shows_the_metrics_the_plot_and_thumbnails_inline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    genres = ["Drama", "Comedy", "Horror"]
    paths = [str(write_poster(tmp_path / f"p{i}.jpg", seed=i)) for i in range(12)]
    y = rng.integers(0, 2, (12, 3))
    y[:, 2] = 0  # a genre without positives: AP undefined
    probs = rng.random((12, 3))
    thresholds = np.array([0.5, 0.4, 0.3])
    result = metrics.evaluate(y, probs, thresholds, genres) | {"prior_map": 0.25, "model": "m"}
    labels = [[g for g, on in zip(genres, row) if on] for row in y]
    text = render_report(result, y, probs, paths, labels, genres, thresholds, "a test")
    report = parse(text)
    assert_matches(report, result)
    assert report.tables["per-genre"]["Horror"]["ap"] == "–"
    assert all(link.startswith("data:") for link in report.links) and "<script" not in text  # self-contained
    plot = next(src for src in report.images if src.startswith("data:image/png"))
    figure = Image.open(io.BytesIO(base64.b64decode(plot.split(",", 1)[1])))
    assert figure.size == (1080, 720)
    thumbs = [src for src in report.images if src.startswith("data:image/jpeg")]
    positives = y.sum(axis=0)
    assert len(thumbs) == sum(min(THUMBS, p) + min(THUMBS, 12 - p) for p in positives)
    first = Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1])))
    assert first.size == (72, 108)
    # The matrix: each true genre's row in %; Drama's diagonal is Drama's recall.
    drama = next(r for r in result["per_genre"] if r["genre"] == "Drama")
    assert re.search(rf"Drama posters predicted Drama: {drama['recall']:.0%}", text)


@pytest.mark.slow
def test_evaluate_report_numbers_equal_its_json(tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share_models(monkeypatch)
    metrics_json, html_file = tmp_path / "m.json", tmp_path / "out" / "report.html"
    result = CliRunner().invoke(fusion_app, ["evaluate", "--manifest", str(tiny_model.manifest), "--model", str(tiny_model.model),
                                             "--cache", str(tiny_model.cache), "--split", "val", "--json", str(metrics_json),
                                             "--report", str(html_file), "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = json.loads(metrics_json.read_text())
    text = html_file.read_text()
    report = parse(text)
    assert_matches(report, expected)
    assert "split val" in text and f"{expected['n_posters']} posters" in text
    thumbs = [src for src in report.images if src.startswith("data:image/jpeg")]
    n = expected["n_posters"]
    assert len(thumbs) == sum(min(THUMBS, r["support"]) + min(THUMBS, n - r["support"]) for r in expected["per_genre"])
    assert all(link.startswith("data:") for link in report.links)


def test_report_into_a_folder_is_a_one_line_error_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(fusion_app, ["evaluate", "--manifest", str(tmp_path / "m.csv"), "--report", str(tmp_path)])
    assert_one_line_error(result, "--report", "is a folder")
