"""Opening someone else's model folder never runs their code, and unwritable outputs fail fast."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_error, write_poster
from typer.testing import CliRunner

from posterfusion.cli import fusion_app
from posterfusion.manifest_cli import manifest_app
from posterfusion.weights import objects_from_card, weights_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "posterfusion"


class _Payload:
    """Unpickling this creates a file: proof that loading ran code from the model folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile_model(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped model with a card naming a pickle bomb as its object detector."""
    marker = tmp_path / "code-ran"
    bomb = tmp_path / "detector.pt"
    bomb.write_bytes(pickle.dumps(_Payload(marker)))
    model = tmp_path / "model"
    shutil.copytree(weights_dir() / "default_model", model)
    card = json.loads((model / "card.json").read_text())
    card["config"]["objects"] = f"yolo:{bomb}"
    (model / "card.json").write_text(json.dumps(card))
    return model, marker


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_card_naming_a_pickle_is_refused_before_anything_loads(tmp_path: Path, command: str) -> None:
    model, marker = _hostile_model(tmp_path)
    poster = write_poster(tmp_path / "p.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"poster,genres\n{poster},Drama\n")
    args = [str(poster)] if command == "predict" else ["--manifest", str(manifest)]
    result = CliRunner().invoke(fusion_app, [command, *args, "--model", str(model)])
    assert_one_line_error(result, str(model / "card.json"), "not loaded because a model folder says so",
                          f"--objects yolo:{tmp_path / 'detector.pt'}")
    assert not marker.exists(), "the model folder's pickle was loaded"


def test_the_users_own_choice_of_detector_wins_over_the_card() -> None:
    assert objects_from_card("yolo:/x.pt", "yolo:/x.pt", Path("card.json")) == "yolo:/x.pt"
    assert objects_from_card("nanodet", None, Path("card.json")) == "nanodet"


def test_every_torch_load_asks_for_weights_only() -> None:
    """torch.load unpickles; only weights_only=True keeps a file from running code."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "no torch.load found: is the scan still looking at the sources?"
    assert [where for where, safe in calls if not safe] == []


def test_unwritable_outputs_are_one_line_errors_before_any_work(tmp_path: Path, tiny_manifest: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    bad = a_file / "out.png"  # its folder would be a file
    runner = CliRunner()
    cases = [
        (fusion_app, ["evaluate", "--manifest", tiny_manifest, "--model", tmp_path / "no-model", "--plot", bad], "--plot"),
        (fusion_app, ["evaluate", "--manifest", tiny_manifest, "--model", tmp_path / "no-model", "--json", bad], "--json"),
        (fusion_app, ["train", "--manifest", tiny_manifest, "--out", a_file, "--cache", tmp_path / "cache"], "--out"),
        (manifest_app, ["stats", tiny_manifest, "--plot", bad], "--plot"),
        (manifest_app, ["split", tiny_manifest, "--out", bad], "--out"),
    ]
    for app, args, option in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert_one_line_error(result, option, "cannot write there" if option != "--out" or app is manifest_app
                              else "is a file, not a folder")
    assert not (tmp_path / "cache").exists()  # train stopped before computing features
