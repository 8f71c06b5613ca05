"""The wheel carries what an installed posterfusion needs: every module, the default config, the
shipped weights and model. (.ci/run also installs it into a fresh virtual environment.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"src/posterfusion": "posterfusion", "configs": "posterfusion/_configs", "weights": "posterfusion/_weights"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the working tree (the build must not write into the checkout)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("src", "configs", "weights"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(dist), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (path,) = dist.glob("posterfusion-*.whl")
    return path


def _expected_files() -> set[str]:
    """Every file of the package, config and weights folders, as the wheel should name it."""
    expected = set()
    for folder, package in MAPPED.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith("."):
                expected.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    return expected


def test_the_wheel_holds_every_module_the_config_and_the_weights(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_files() - names)
    assert not missing, f"not in the wheel (pyproject.toml's packages or package-data?): {missing}"
    assert "posterfusion/_configs/default.yaml" in names
    assert "posterfusion/_weights/default_model/card.json" in names


def test_the_unpacked_wheel_predicts_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Run from the wheel's files alone (dependencies from this environment), outside the checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import json, posterfusion, posterfusion.config, posterfusion.weights\n"
        "from posterfusion.cli import fusion_app\n"
        "print(json.dumps([posterfusion.__file__, str(posterfusion.weights.weights_dir()),"
        " posterfusion.config.load_config()['mode']]))\n"
        "fusion_app(['predict', '--samples', '--json'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "POSTERFUSION_WEIGHTS"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    module, weights, mode = json.loads(lines[0])
    assert Path(module).is_relative_to(site) and Path(weights) == site / "posterfusion" / "_weights"
    assert mode == "fusion"
    predictions = [json.loads(line) for line in lines[1:]]
    assert predictions and all(p["genres"] and p["error"] is None for p in predictions)
