"""The one decoder turns every kind of poster file into RGB, or says in a few words why not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posterfusion import images
from posterfusion.images import BadImage, decode_bytes, letterbox, load_poster

from helpers import write_poster


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _rgb_image(w: int = 60, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data",
    [
        _encoded(_rgb_image().convert("CMYK"), "JPEG"),
        _encoded(_rgb_image().convert("P"), "PNG"),
        _encoded(_rgb_image().convert("L"), "PNG"),
        _encoded(_rgb_image().convert("RGBA"), "PNG"),
        _encoded(_rgb_image().convert("LA"), "PNG"),
        _encoded(Image.fromarray((np.arange(60 * 90).reshape(90, 60) * 7).astype(np.uint16)), "PNG"),
        _encoded(_rgb_image(), "WEBP"),
        _encoded(_rgb_image(), "GIF"),
    ],
    ids=["cmyk", "palette", "grayscale", "rgba", "la", "16bit", "webp", "gif"],
)
def test_every_mode_becomes_rgb(data: bytes) -> None:
    rgb = decode_bytes(data)
    assert rgb.dtype == np.uint8 and rgb.shape == (90, 60, 3)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert (decode_bytes(_encoded(rgba, "PNG")) == 255).all()


def test_sixteen_bit_keeps_its_range() -> None:
    ramp = (np.linspace(0, 65535, 100).reshape(10, 10)).astype(np.uint16)
    rgb = decode_bytes(_encoded(Image.fromarray(ramp), "PNG"))
    assert rgb.min() == 0 and rgb.max() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (_encoded(_rgb_image(), "JPEG")[:300], "truncated"),
    ],
    ids=["zero-byte", "text", "truncated"],
)
def test_bad_files_raise_a_short_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        decode_bytes(data)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(BadImage, match="too large"):
        decode_bytes(_encoded(_rgb_image(), "PNG"))


def test_large_posters_are_downsized_once() -> None:
    rgb = decode_bytes(_encoded(_rgb_image(2000, 3000), "JPEG"))
    assert max(rgb.shape[:2]) <= images.MAX_SIDE


def test_load_poster_hashes_the_bytes_it_decoded(tmp_path: Path) -> None:
    path = write_poster(tmp_path / "a.jpg")
    copy = tmp_path / "renamed.jpg"
    copy.write_bytes(path.read_bytes())
    assert load_poster(path).key == load_poster(copy).key
    with pytest.raises(BadImage, match="not found"):
        load_poster(tmp_path / "missing.jpg")


def test_letterbox_keeps_aspect_and_reports_placement() -> None:
    canvas, (scale, pad_x, pad_y) = letterbox(np.full((100, 100, 3), 200, np.uint8), 240, 360)
    assert canvas.shape == (360, 240, 3)
    assert scale == pytest.approx(2.4) and pad_x == 0 and pad_y == 60
    assert canvas[0, 0].sum() == 0 and canvas[180, 120].tolist() == [200, 200, 200]
