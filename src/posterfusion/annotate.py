"""Annotated posters: what the detectors found drawn on the poster, the occlusion heat map of the
top genre beside it, and the genres as probability bars with each genre's threshold marked.

People read a picture faster than "person x4, 1 face (sad)": the layout follows the annotated
images detection tools save (boxes with class and confidence), and adds what only posterfusion
has, the genre decision and why it was made (see :mod:`posterfusion.explain`). Labels are placed
inside the panel they belong to, so none is ever cut off at an edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .detectors.base import COCO_CLASSES, EXPRESSIONS
from .explain import Explanation, explain
from .files import atomic_path
from .images import BadImage, load_poster
from .predict import Prediction, Predictor

POSTER_HEIGHT = 560
PANEL_WIDTH = 400
MARGIN = 12
HEADER = 30
BOX_WIDTH = 3
FONT_SIZE = 14
ROW = 21  # height of one bar or text line in the side panel
# Box colours: one per object class (cycled), and two that no class uses, for faces and text.
PALETTE = [(255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49), (72, 249, 10),
           (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255),
           (52, 69, 147), (100, 115, 255), (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255),
           (255, 149, 200), (255, 55, 199)]
FACE_COLOR = (255, 0, 255)
TEXT_COLOR = (0, 255, 255)
CHOSEN, OTHER, UP, DOWN = (46, 139, 87), (150, 160, 180), (20, 120, 40), (190, 30, 30)


def object_color(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


@dataclass
class Annotated:
    """The drawing and where its parts are, in pixels (x, y, width, height), for readers and tests."""

    image: Image.Image
    poster: tuple[int, int, int, int]
    heat: tuple[int, int, int, int] | None


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(rgb: np.ndarray, prediction: Prediction, explanation: Explanation,
           genres: list[str], thresholds: np.ndarray) -> Annotated:
    """The annotated picture of one poster: boxes, heat map (when the model has a CNN branch) and
    the genre bars with thresholds, contributions and evidence."""
    h, w = rgb.shape[:2]
    height = POSTER_HEIGHT
    width = max(1, round(w * height / h))
    poster = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    boxed = _draw_boxes(poster.copy(), explanation)
    top = prediction.top(1)[0][0] if prediction.probabilities else None
    heat_map = explanation.heat.get(top) if top else None
    panels = [boxed] + ([_heat_overlay(poster, heat_map)] if heat_map is not None else [])
    side = _side_panel(prediction, explanation, genres, thresholds, height)
    total_w = MARGIN + sum(p.width + MARGIN for p in panels) + side.width + MARGIN
    canvas = Image.new("RGB", (total_w, HEADER + max(height, side.height) + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    x, rects = MARGIN, []
    captions = ["what the detectors found", f"what made it {top}: red is where hiding the poster lowers it"]
    for panel, caption in zip(panels, captions):
        canvas.paste(panel, (x, HEADER))
        draw.text((x, 8), _fit(draw, caption, panel.width), fill="black", font=_font())
        rects.append((x, HEADER, panel.width, panel.height))
        x += panel.width + MARGIN
    canvas.paste(side, (x, HEADER))
    return Annotated(canvas, rects[0], rects[1] if len(rects) > 1 else None)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont | None = None) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    font = font or _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _draw_boxes(image: Image.Image, explanation: Explanation) -> Image.Image:
    """Objects, faces (with their expression) and text lines, each box labelled inside the image."""
    draw = ImageDraw.Draw(image)
    items = [(box, f"{COCO_CLASSES[int(label)]} {score:.2f}", object_color(int(label)))
             for box, score, label in zip(explanation.objects.boxes, explanation.objects.scores, explanation.objects.labels)]
    items += [(box, f"face {EXPRESSIONS[int(expr.argmax())]} {expr.max():.2f}", FACE_COLOR)
              for box, expr in zip(explanation.faces.boxes, explanation.expressions)]
    items += [(line.box, f"“{line.text}”", TEXT_COLOR) for line in explanation.text]
    pixels = []
    for box, _, color in items:
        x1, y1, x2, y2 = box_pixels(box, image.size)
        pixels.append((x1, y1, x2, y2))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=BOX_WIDTH)
    for (x1, y1, _, _), (_, label, color) in zip(pixels, items):  # labels over every box, not under the next
        _label(draw, label, x1, y1, color, image.size)
    return image


def box_pixels(box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in fractions of the poster as pixel corners inside an image of ``size``."""
    w, h = size
    x1, y1, x2, y2 = (float(np.clip(v, 0.0, 1.0)) for v in box)
    return (min(round(x1 * w), w - 1), min(round(y1 * h), h - 1),
            min(max(round(x2 * w), round(x1 * w) + 1), w - 1), min(max(round(y2 * h), round(y1 * h) + 1), h - 1))


def _label(draw: ImageDraw.ImageDraw, text: str, x: int, y: int, color: tuple[int, int, int],
           size: tuple[int, int]) -> None:
    """A filled label at a box's top-left corner: above the box where there is room, inside it
    otherwise, shifted left where it would leave the image, cut where it is wider than the image."""
    font = _font()
    text = _fit(draw, text, size[0] - 4, font)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    ly = y - th if y - th >= 0 else min(y + BOX_WIDTH, size[1] - th)
    lx = min(max(x, 0), size[0] - tw)
    dark = sum(color) < 380
    draw.rectangle((lx, ly, lx + tw - 1, ly + th - 1), fill=color)
    draw.text((lx + 2 - left, ly + 2 - top), text, fill="white" if dark else "black", font=font)


def _heat_overlay(poster: Image.Image, heat: np.ndarray) -> Image.Image:
    """The poster in dim grey with the cells whose hiding lowered the genre in red (the strongest
    cell fully red), bilinearly smoothed between cell centres."""
    grey = np.asarray(poster.convert("L"), np.float32)[..., None].repeat(3, axis=2) * 0.6 + 40
    peak = float(heat.max())
    strength = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat)
    cells = Image.fromarray((strength * 255).astype(np.uint8), "L")
    alpha = np.asarray(cells.resize(poster.size, Image.Resampling.BILINEAR), np.float32)[..., None] / 255 * 0.75
    red = np.array([230, 20, 20], np.float32)
    return Image.fromarray((grey * (1 - alpha) + red * alpha).clip(0, 255).astype(np.uint8))


def _side_panel(prediction: Prediction, explanation: Explanation, genres: list[str],
                thresholds: np.ndarray, height: int) -> Image.Image:
    """Probability bars (chosen genres green, threshold as a black tick), then why the top genre,
    then what was seen and read."""
    lines = _why_lines(prediction, explanation)
    panel = Image.new("RGB", (PANEL_WIDTH, max(height, ROW * (len(genres) + len(lines) + 3))), "white")
    draw = ImageDraw.Draw(panel)
    font = _font()
    name_w, bar_w = 110, 200
    draw.text((0, 0), "genres (tick: threshold)", fill="black", font=font)
    order = sorted(range(len(genres)), key=lambda g: -prediction.probabilities.get(genres[g], 0.0))
    for row, g in enumerate(order, start=1):
        y = row * ROW
        p = prediction.probabilities.get(genres[g], 0.0)
        chosen = genres[g] in prediction.genres
        draw.text((0, y + 2), _fit(draw, genres[g], name_w - 6), fill="black", font=font)
        draw.rectangle((name_w, y + 3, name_w + bar_w, y + ROW - 4), fill=(235, 235, 235))
        draw.rectangle((name_w, y + 3, name_w + round(p * bar_w), y + ROW - 4), fill=CHOSEN if chosen else OTHER)
        tick = name_w + round(float(thresholds[g]) * bar_w)
        draw.line((tick, y + 1, tick, y + ROW - 2), fill="black", width=2)
        draw.text((name_w + bar_w + 8, y + 2), f"{p:.2f}", fill="black", font=font)
    y = (len(genres) + 2) * ROW
    for text, color in lines:
        draw.text((0, y), _fit(draw, text, PANEL_WIDTH - 4), fill=color, font=font)
        y += ROW
    return panel


def _why_lines(prediction: Prediction, explanation: Explanation) -> list[tuple[str, tuple[int, int, int] | str]]:
    """The side panel's text: contributions to the top genres, then the evidence."""
    out: list[tuple[str, tuple[int, int, int] | str]] = []
    for genre, items in list(explanation.contributions.items())[:2]:
        out.append((f"why {genre}:", "black"))
        out += [(f"  {change:+.3f}  {name}", UP if change > 0 else DOWN) for name, change in items]
    objects = prediction.evidence.get("objects")
    if objects is not None:
        seen = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in list(objects.items())[:6]) or "no objects"
        out.append((f"saw: {seen}", "black"))
        faces = prediction.evidence.get("faces", 0)
        expression = f" ({prediction.evidence['expression']})" if faces else ""
        out.append((f"{faces} face{'s' if faces != 1 else ''}{expression}", "black"))
    if "read" in prediction.evidence:
        out.append((f"read: {prediction.evidence['read'] or '(no text)'}", "black"))
    return out


def annotate(predictor: Predictor, prediction: Prediction, rgb: np.ndarray) -> Annotated:
    """Explain one prediction (the explanation goes into its evidence, for ``--json`` and the API)
    and draw it."""
    explanation = explain(predictor, rgb, prediction)
    prediction.evidence["explanation"] = explanation.to_json()
    return render(rgb, prediction, explanation, predictor.genres, predictor.thresholds)


def save_png(annotated: Annotated, path: str | Path) -> None:
    """The drawing as a PNG, written atomically."""
    with atomic_path(path) as tmp:
        annotated.image.save(tmp, format="PNG")


class AnnotationFolder:
    """``fusion predict --annotate DIR``: one PNG per readable poster, named after the poster
    (``-2``, ``-3``... where two posters share a name)."""

    def __init__(self, predictor: Predictor, folder: Path) -> None:
        self.predictor = predictor
        self.folder = folder
        self.used: set[str] = set()

    def write(self, batch: list[Prediction]) -> None:
        """Annotate every prediction of a batch that has genres; its evidence names the PNG."""
        for prediction in batch:
            if prediction.error:
                continue
            try:
                rgb = load_poster(prediction.path).rgb
            except BadImage as exc:  # changed or removed since the models read it
                prediction.evidence["annotated"] = None
                prediction.evidence["annotation_error"] = str(exc)
                continue
            path = self.folder / self._name(Path(prediction.path).stem)
            save_png(annotate(self.predictor, prediction, rgb), path)
            prediction.evidence["annotated"] = str(path)

    def _name(self, stem: str) -> str:
        name, n = f"{stem}.png", 1
        while name in self.used:
            n += 1
            name = f"{stem}-{n}.png"
        self.used.add(name)
        return name
