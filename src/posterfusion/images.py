"""The one robust poster decoder.

Every poster is read from disk exactly once: the same bytes give its content hash (the cache key)
and its pixels. Whatever the file holds (CMYK, palette, 16-bit, grayscale, alpha, EXIF rotation),
the result is an RGB uint8 array no larger than ``MAX_SIDE``; files that cannot be turned into
one raise :class:`BadImage` with a short reason, so callers can report and skip them.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import read_regular_file

MAX_SIDE = 640
"""Longest side kept after decoding; every model downsizes further, so more is wasted memory."""

MAX_PIXELS = 80_000_000
"""Decompression-bomb guard: larger images are refused before their pixels are decoded."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def _pil_open():
    """PIL's own ``Image.open``, even where a package has monkey-patched it.

    Importing ultralytics (the YOLO backend) replaces ``Image.open`` with a
    wrapper that, on a file PIL cannot identify, tries to pip-install ``pi-heif`` and then fails
    with ModuleNotFoundError offline: a text file named .jpg would crash a whole build.
    """
    import sys

    open_ = Image.open
    if getattr(open_, "__module__", Image.__name__) != Image.__name__:
        open_ = getattr(sys.modules.get(open_.__module__), "_image_open", open_)
    return open_


_OPEN = _pil_open()


class BadImage(Exception):
    """A poster file that cannot be decoded; the message is the reason, without the path."""


@dataclass(frozen=True)
class Poster:
    """A decoded poster: its cache key and its pixels."""

    path: str
    key: str  # sha256 of the file's bytes
    rgb: np.ndarray  # (H, W, 3) uint8


def content_key(data: bytes) -> str:
    """Cache key of a poster: moved or renamed copies of the same file share it."""
    return hashlib.sha256(data).hexdigest()


def read_key(path: str | Path) -> str:
    """Content key of a file on disk, without decoding it (cheap cache look-ups)."""
    return content_key(read_poster_bytes(path))


def read_poster_bytes(path: str | Path) -> bytes:
    """A poster file's bytes; :class:`BadImage` with the reason where it cannot be one (missing,
    unreadable, a device, FIFO or folder, or larger than any poster)."""
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except ValueError as exc:  # not a regular file, too large
        raise BadImage(str(exc)) from None
    except OSError as exc:
        raise BadImage(f"cannot read: {exc.strerror or exc}") from None


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array of at most ``MAX_SIDE`` pixels a side."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _OPEN(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImage(
                    f"image too large ({width}x{height} pixels, limit {MAX_PIXELS:,}): "
                    "possible decompression bomb"
                )
            if image.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far faster for big posters.
                image.draft("RGB", (MAX_SIDE, MAX_SIDE))
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated file (image data ends early)"
        raise BadImage(f"cannot decode: {reason}") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good poster
        pass
    image = _to_rgb(image)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to RGB; transparent pixels become white, like a poster on a page."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        scaled = (array - lo) / (hi - lo or 1.0) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_poster(path: str | Path) -> Poster:
    """Read, hash and decode one poster file; raises :class:`BadImage` with the reason."""
    data = read_poster_bytes(path)
    return Poster(path=str(path), key=content_key(data), rgb=decode_bytes(data))


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Stretch an RGB array to ``width`` x ``height`` (bilinear, antialiased like PIL)."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    image = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image)


def letterbox(rgb: np.ndarray, width: int, height: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Fit an RGB array into a black ``width`` x ``height`` canvas, keeping its aspect ratio.

    Returns the canvas and ``(scale, pad_x, pad_y)`` so boxes found on the canvas can be mapped
    back to fractions of the poster. Fixed canvases let face detection run in batches.
    """
    h, w = rgb.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resize(rgb, new_w, new_h)
    return canvas, (scale, float(pad_x), float(pad_y))
