"""``fusion evaluate --report report.html``: the evaluation as one self-contained HTML file.

A table of numbers says how good a model is; the posters behind them say why. The report puts the
headline metrics beside the genre-frequency prior (the score of a model that never looks at the
poster), the per-genre table, the precision-recall plot, a view of which genres each genre is
predicted as, and per genre the most confident hits and false alarms as thumbnails. Everything,
figures and thumbnails included, is inlined (data URLs, inline CSS, no scripts), so the file can
be mailed or archived and still opens offline. Numbers come from the same ``metrics.evaluate``
result that ``--json`` writes, formatted to three decimals.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics
from .files import write_text_atomic
from .images import BadImage, load_poster

THUMBS = 4
"""Posters shown per genre and kind (hits, false alarms)."""
THUMB_SIZE = (72, 108)

HEADLINE = (("mAP", "map"), ("micro-F1", "micro_f1"), ("macro-F1", "macro_f1"),
            ("samples-F1", "samples_f1"), ("top-n accuracy", "top_n_accuracy"))
PER_GENRE = (("AP", "ap"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"))

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.matrix td { width: 2.4rem; font-size: .8rem; }
.thumbs { display: flex; gap: .3rem; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; font-size: .75rem; text-align: center; width: 72px; }
figure img { display: block; width: 72px; height: 108px; object-fit: cover; }
.genre { border-top: 1px solid #eee; padding: .5rem 0; }
.genre h3 { margin: .2rem 0; }
.kind { display: inline-block; vertical-align: top; margin-right: 2rem; }
.muted { color: #666; }
"""


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def thumbnail(path: str) -> str | None:
    """A small JPEG of a poster as a data URL; None if it cannot be read any more."""
    try:
        rgb = load_poster(path).rgb
    except BadImage:
        return None
    image = Image.fromarray(rgb)
    image.thumbnail(THUMB_SIZE)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return _data_url(buffer.getvalue(), "image/jpeg")


def _pr_plot(y: np.ndarray, probs: np.ndarray, genres: list[str]) -> str:
    """The precision-recall figure ``--plot`` writes, as a data URL."""
    with tempfile.TemporaryDirectory(prefix="posterfusion-report-") as folder:
        path = Path(folder) / "pr.png"
        metrics.plot_precision_recall(y, probs, genres, path)
        return _data_url(path.read_bytes(), "image/png")


def _headline(result: dict) -> str:
    prior = result.get("prior_map")
    rows = "".join(
        f'<tr data-key="{key}"><td>{label}</td><td class="model">{_number(result[key])}</td>'
        f'<td class="prior">{_number(prior) if key == "map" and prior is not None else "–"}</td></tr>'
        for label, key in HEADLINE
    )
    return (f'<table id="headline"><tr><th>metric</th><th>model</th><th>genre prior</th></tr>{rows}</table>'
            f'<p class="muted">{result["n_posters"]} posters. The genre prior scores every poster with the '
            "training genre frequencies: what a model that never looks at the poster gets.</p>")


def _per_genre(result: dict) -> str:
    head = "".join(f"<th>{label}</th>" for label, _ in PER_GENRE)
    rows = "".join(
        f'<tr data-genre="{html.escape(r["genre"])}"><td>{html.escape(r["genre"])}</td>'
        + "".join(f'<td data-key="{key}">{_number(r[key])}</td>' for _, key in PER_GENRE)
        + f'<td data-key="support">{r["support"]}</td><td data-key="threshold">{r["threshold"]:.3f}</td></tr>'
        for r in result["per_genre"]
    )
    return f'<table id="per-genre"><tr><th>genre</th>{head}<th>support</th><th>threshold</th></tr>{rows}</table>'


def predicted_as(y: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """(true genre, predicted genre): the share of a genre's posters given each genre; the diagonal
    is the recall, the rest is what a genre is taken for. Rows without posters are NaN."""
    support = y.sum(axis=0)
    counts = y.T.astype(np.float64) @ decided.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / support[:, None]


def _matrix(y: np.ndarray, decided: np.ndarray, genres: list[str]) -> str:
    shares = predicted_as(y, decided)
    head = "".join(f'<th title="{html.escape(g)}">{html.escape(g[:4])}</th>' for g in genres)
    rows = []
    for t, genre in enumerate(genres):
        cells = []
        for p in range(len(genres)):
            share = shares[t, p]
            if np.isnan(share):
                cells.append("<td></td>")
                continue
            shade = round(255 - 180 * share)
            colour = f"rgb({shade},{shade},255)" if t != p else f"rgb({shade},255,{shade})"
            cells.append(f'<td style="background:{colour}" title="{html.escape(genre)} posters predicted '
                         f'{html.escape(genres[p])}: {share:.0%}">{round(share * 100)}</td>')
        rows.append(f"<tr><td>{html.escape(genre)}</td>{''.join(cells)}</tr>")
    return (f'<table class="matrix" id="predicted-as"><tr><th>true \\ predicted</th>{head}</tr>{"".join(rows)}</table>'
            '<p class="muted">Per row, the % of that genre\'s posters given each genre (decisions at the thresholds); '
            "the green diagonal is the recall, the blue cells are what a genre is taken for.</p>")


def _examples(y: np.ndarray, probs: np.ndarray, paths: list[str], labels: list[list[str]], genres: list[str]) -> str:
    """Per genre, the posters it was most confident about: hits (labelled with it) and false alarms."""
    sections = []
    for g, genre in enumerate(genres):
        order = np.argsort(-probs[:, g], kind="stable")
        kinds = (("most confident hits", [i for i in order if y[i, g]][:THUMBS]),
                 ("most confident false alarms", [i for i in order if not y[i, g]][:THUMBS]))
        blocks = []
        for title, chosen in kinds:
            figures = []
            for i in chosen:
                url = thumbnail(paths[i])
                caption = f"{html.escape(Path(paths[i]).name)}: p {probs[i, g]:.2f}; labelled {html.escape(', '.join(labels[i]) or 'none')}"
                picture = f'<img src="{url}" alt="{caption}">' if url else '<span class="muted">unreadable</span>'
                figures.append(f'<figure title="{caption}">{picture}<figcaption>{probs[i, g]:.2f}</figcaption></figure>')
            blocks.append(f'<div class="kind"><h4>{title}</h4><div class="thumbs">{"".join(figures) or "none"}</div></div>')
        sections.append(f'<div class="genre" id="genre-{g}"><h3>{html.escape(genre)}</h3>{"".join(blocks)}</div>')
    return "".join(sections)


def render_report(result: dict, y: np.ndarray, probs: np.ndarray, paths: list[str], labels: list[list[str]],
                  genres: list[str], thresholds: np.ndarray, title: str) -> str:
    """The report's HTML for an evaluation ``result`` and the labels and probabilities behind it."""
    decided = probs >= np.asarray(thresholds)[None, :]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"muted\">model: {html.escape(str(result.get('model', '')))}</p>"
        f"<h2>Headline</h2>{_headline(result)}"
        f"<h2>Per genre</h2>{_per_genre(result)}"
        f'<h2>Precision-recall</h2><img id="pr-plot" alt="precision-recall per genre" src="{_pr_plot(y, probs, genres)}">'
        f"<h2>What each genre is predicted as</h2>{_matrix(y, decided, genres)}"
        f"<h2>Most confident hits and false alarms</h2>{_examples(y, probs, paths, labels, genres)}"
        "</body></html>\n"
    )


def write_report(path: str | Path, result: dict, y: np.ndarray, probs: np.ndarray, paths: list[str],
                 labels: list[list[str]], genres: list[str], thresholds: np.ndarray, title: str) -> None:
    """:func:`render_report`, written atomically."""
    write_text_atomic(path, render_report(result, y, probs, paths, labels, genres, thresholds, title))
