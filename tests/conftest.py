"""Shared fixtures: synthetic posters for fast tests, real posters for the slow ones."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import write_poster

from posterfusion.frozen import FrozenModels as _REAL_FROZEN_MODELS

REPO = Path(__file__).resolve().parents[1]
POSTERS = REPO.parent / "shared" / "data" / "movieposters"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_manifest() -> Path:
    """The shared labelled posters; slow tests skip where the folder is absent."""
    labels = POSTERS / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"real posters not found at {POSTERS}")
    return labels


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """Four synthetic posters with genres, listed by relative path."""
    for i in range(4):
        write_poster(tmp_path / "img" / f"p{i}.jpg", seed=i)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "poster,genres,title\nimg/p0.jpg,Drama|Comedy,a\nimg/p1.jpg,Horror,b\nimg/p2.jpg,,c\nimg/p3.jpg,Drama,d\n"
    )
    return manifest


# --- frozen models, shared --------------------------------------------------------------------
#
# Loading the detectors and the backbone takes seconds; every test (and every CLI command run
# through CliRunner) gets the same instances instead.

_MODELS: dict = {}


def _shared_frozen_models(*args, **kwargs):
    """Stand-in for FrozenModels(...) that loads each combination of models once per session."""
    import inspect

    from posterfusion import frozen

    bound = inspect.signature(_REAL_FROZEN_MODELS).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if "device" in arguments:
        arguments["device"] = frozen.resolve_device(arguments["device"])  # 'auto' and 'cpu' are one
    key = repr(sorted((name, str(value)) for name, value in arguments.items()))
    if key not in _MODELS:
        _MODELS[key] = _REAL_FROZEN_MODELS(*args, **kwargs)
    return _MODELS[key]


@pytest.fixture(scope="session")
def frozen_models():
    """The default frozen models (NanoDet, MTCNN, mini-XCEPTION, EfficientNet-Lite0 + Lite2) on the CPU."""
    from posterfusion.defaults import DEFAULT_BACKBONE

    return _shared_frozen_models("nanodet", DEFAULT_BACKBONE, "cpu")


def share_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI and library reuse loaded models: the one factory, create_frozen_models, is memoised."""
    import posterfusion.frozen

    monkeypatch.setattr(posterfusion.frozen, "create_frozen_models", _shared_frozen_models)


@pytest.fixture
def shared_models(monkeypatch: pytest.MonkeyPatch, frozen_models):
    """The session's loaded models, also behind every FrozenModels(...) the code under test makes."""
    share_models(monkeypatch)
    return frozen_models


# --- a real-poster cache, built once ----------------------------------------------------------

REAL_POSTERS = 300  # spread evenly over the 10,000 (the CSV is sorted by IMDb id, so by age)
REAL_STEP = 33
HELD_OUT_EVERY = 5  # every 5th of them is kept out of training, for `fusion evaluate`


@dataclass
class RealCache:
    """A feature cache of real posters, shared by the slow tests: copy it before writing to it."""

    cache: Path
    manifest: Path  # all posters, absolute paths
    train_manifest: Path
    eval_manifest: Path
    paths: list[str]
    seconds: float

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.cache, dest)
        return dest


@pytest.fixture(scope="session")
def real_cache(real_manifest: Path, frozen_models, tmp_path_factory: pytest.TempPathFactory) -> RealCache:
    """~300 real posters through the library's build_cache, with manifests for training and evaluation."""
    import pandas as pd

    from posterfusion.extract import build_cache, open_stores

    root = tmp_path_factory.mktemp("real")
    table = pd.read_csv(real_manifest, dtype=str, keep_default_na=False)
    subset = table.iloc[::REAL_STEP].head(REAL_POSTERS).reset_index(drop=True)
    subset["poster"] = [str((real_manifest.parent / p).resolve()) for p in subset["poster"]]
    held_out = (subset.index % HELD_OUT_EVERY) == HELD_OUT_EVERY - 1
    subset.to_csv(root / "all.csv", index=False)
    subset[~held_out].to_csv(root / "train.csv", index=False)
    subset[held_out].to_csv(root / "eval.csv", index=False)

    cache = root / "cache"
    paths = subset["poster"].tolist()
    start = time.perf_counter()
    summary = build_cache(paths, open_stores(frozen_models, cache), frozen_models, batch_size=32)
    seconds = time.perf_counter() - start
    assert summary.failed == 0, summary.failures
    return RealCache(cache, root / "all.csv", root / "train.csv", root / "eval.csv", paths, seconds)


# --- a tiny trained model with every branch, built once ---------------------------------------


def copy_real_posters(real_manifest: Path, root: Path, step: int, count: int) -> Path:
    """``count`` real posters (every ``step``-th) copied under ``root`` (so tests may break them),
    listed in ``root/labels.csv`` with a train/val split (every third poster for validation)."""
    import pandas as pd

    table = pd.read_csv(real_manifest, dtype=str, keep_default_na=False).iloc[::step].head(count).reset_index(drop=True)
    (root / "posters").mkdir()
    for poster in table["poster"]:
        shutil.copy(real_manifest.parent / poster, root / poster)
    table["split"] = ["val" if i % 3 == 2 else "train" for i in range(len(table))]
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@dataclass
class TinyModel:
    """A fusion model with CNN, detector and text branches, trained in seconds on real posters:
    enough to draw boxes, text lines, heat maps and a report, not to be accurate."""

    model: Path
    manifest: Path  # the posters with genres and a train/val split (relative paths)
    cache: Path  # their features
    posters: list[Path]


@pytest.fixture(scope="session")
def tiny_model(real_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """36 real posters copied to a temporary folder, and a model trained on them (text on)."""
    import pandas as pd

    from posterfusion.config import load_config
    from posterfusion.train import train

    root = tmp_path_factory.mktemp("tiny_model")
    manifest = copy_real_posters(real_manifest, root, step=277, count=36)
    config = load_config(None, {"text": True, "min_genre_posters": 2, "optim": {"epochs": 3, "ensemble": 1}})
    with pytest.MonkeyPatch.context() as patch:
        share_models(patch)
        train(manifest, root / "cache", config, root / "model", device="cpu")
    posters = pd.read_csv(manifest, dtype=str, keep_default_na=False)["poster"]
    return TinyModel(root / "model", manifest, root / "cache", [root / p for p in posters])


# --- pages, in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Chromium (Debian's chromium and chromium-driver; .ci/run installs them).

    Without them the test is skipped, saying how to run it; where ``POSTERFUSION_REQUIRE_BROWSER=1``
    (set by .ci/run) a missing browser fails it instead, so CI cannot pass without the page tested."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        why = "the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        if os.environ.get("POSTERFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield browser
    browser.quit()
