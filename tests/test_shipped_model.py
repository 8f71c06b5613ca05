"""The shipped model's probabilities on a few real posters are pinned (to 1e-6): a refactor must not
move them. A change that moves them on purpose reruns bench/make_shipped_pins.py in a commit of its
own that says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

PINS = Path(__file__).resolve().parent / "data" / "shipped_probabilities.json"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("words", [True, False], ids=["words", "no-words"])
def test_the_shipped_model_gives_the_pinned_probabilities(real_manifest: Path, words: bool) -> None:
    from posterfusion.predict import Predictor

    pins = json.loads(PINS.read_text())
    predictor = Predictor(device="cpu", words=words)
    assert predictor.genres == pins["genres"]
    for poster, pinned in zip(pins["posters"], pins["words" if words else "no_words"]):
        got = predictor.predict([str(real_manifest.parent / poster)], batch_size=1)[0]
        assert not got.error
        np.testing.assert_allclose(list(got.probabilities.values()), pinned, rtol=0, atol=1e-6, err_msg=poster)
