"""Where the converted weights live, and how a weights file is identified.

Converted weights are committed under the repository's ``weights/`` folder next to the scripts
that made them, and installed as the package ``posterfusion._weights`` (so a wheel carries them);
``POSTERFUSION_WEIGHTS`` points elsewhere (a shared drive).
A file's sha256 is its identity in cache keys and model cards, and is checked against the
``.sha256`` file shipped beside it so a damaged download fails before it computes garbage.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

from . import settings
from .errors import PosterFusionError


def weights_dir() -> Path:
    """The folder holding converted weights and the default model: the installed package's data
    (the repository's ``weights/`` in an editable install), unless ``POSTERFUSION_WEIGHTS`` is set."""
    return settings.weights_override() or Path(str(resources.files("posterfusion._weights")))


@lru_cache(maxsize=None)
def file_sha256(path: str) -> str:
    """Checksum of a file, read in blocks; cached because identities are asked for often."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_weights(name: str) -> tuple[Path, str]:
    """Path and sha256 of a shipped weights file, checked against its ``.sha256`` companion."""
    path = weights_dir() / name
    if not path.is_file():
        raise PosterFusionError(
            f"{path}: weights file missing; it ships with posterfusion (reinstall it, or set "
            "POSTERFUSION_WEIGHTS to the folder that holds it)"
        )
    return path, checked_sha256(path)


def checked_sha256(path: Path) -> str:
    """The file's sha256, checked against ``<stem>.sha256`` beside it (sha256sum's format) when
    that exists, so a truncated or swapped file fails with a clear message."""
    sha = file_sha256(str(path))
    companion = path.with_name(path.name.split(".")[0] + ".sha256")
    if companion.is_file():
        expected = (companion.read_text().split() or [""])[0].lower()
        if expected != sha:
            raise PosterFusionError(f"{path}: sha256 {sha[:12]} does not match {companion.name} ({expected[:12] or 'empty'})")
    return sha


def objects_from_card(card_objects: str | None, given: str | None, card: Path) -> str | None:
    """The object detector to run for a model: the user's ``--objects`` if given, else the card's,
    unless the card names a file to load (``yolo:PATH``).

    A model folder may come from anyone, and ultralytics loads a ``.pt`` file by unpickling it,
    which runs whatever code the file holds; so a file named only by a card is refused, and used
    when the user names it on the command line. Either way the detector's weights must have the
    sha256 the model was trained on (``predict.check_compatible``).
    """
    if given is not None:
        return given
    if card_objects and card_objects.startswith("yolo:"):
        raise PosterFusionError(
            f"{card}: names the object detector file {card_objects[len('yolo:'):]}, which is not loaded because "
            f"a model folder says so (loading a .pt file can run code in it); if you trust that file, pass "
            f"--objects {card_objects}"
        )
    return card_objects
