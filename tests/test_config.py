"""Config values are checked up front: types from the defaults, ranges and choices, typos named."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from posterfusion import config as config_module
from posterfusion.cli import fusion_app
from posterfusion.config import RANGES, CHOICES, default_config, load_config
from posterfusion.errors import PosterFusionError


def _load(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_defaults_pass_their_own_checks_and_every_rule_names_a_real_key() -> None:
    defaults = _dotted(default_config())
    assert _dotted(load_config()) == defaults
    assert set(RANGES) | set(CHOICES) <= set(defaults)


def test_detect_cache_build_and_fusion_train_default_to_the_same_backbone_and_view() -> None:
    """Otherwise a default build caches embeddings a default training cannot use."""
    from posterfusion.defaults import DEFAULT_BACKBONE, DEFAULT_VIEW

    assert (default_config()["backbone"], default_config()["backbone_view"]) == (DEFAULT_BACKBONE, DEFAULT_VIEW)


@pytest.mark.parametrize("text, fragments", [
    ("optim:\n  epochs: 0\n", ["optim.epochs must be >= 1, not 0"]),
    ("loss:\n  pos_weight: half\n", ["loss.pos_weight must be one of none, sqrt, full, not 'half'"]),
    ("val_fraction: 1.7\n", ["val_fraction must be in (0, 1), not 1.7"]),
    ("optim:\n  epochs: ten\n", ["optim.epochs must be a whole number, not 'ten'"]),
    ("optim:\n  epochs: 2.5\n", ["optim.epochs must be a whole number, not 2.5"]),
    ("optim:\n  lr: -0.1\n", ["optim.lr must be > 0, not -0.1"]),
    ("optim:\n  lr: .nan\n", ["optim.lr must be a number, not nan"]),
    ("head:\n  dropout: 1\n", ["head.dropout must be in [0, 1), not 1.0"]),
    ("finetune:\n  enabled: yes please\n", ["finetune.enabled must be true or false, not 'yes please'"]),
    ("finetune: true\n", ["'finetune' must be a mapping of keys to values, not True"]),
    ("mode: [cnn]\n", ["mode must be text, not ['cnn']"]),
    ("- just\n- a list\n", ["a config file must be a mapping"]),
    ("optim:\n  epoch: 3\n", ["unknown config key 'epoch' under 'optim'; did you mean 'epochs'?"]),
    ("val_frac: 0.2\n", ["unknown config key 'val_frac'; did you mean 'val_fraction'?"]),
])
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(PosterFusionError) as caught:
        _load(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_good_values_are_taken_and_numbers_written_as_text_are_numbers(tmp_path: Path) -> None:
    config = _load(tmp_path, "optim:\n  lr: 1e-4\n  epochs: 3\nloss:\n  max_pos_weight: 5\nmode: cnn\n")
    assert config["optim"]["lr"] == 1e-4 and config["optim"]["epochs"] == 3 and config["mode"] == "cnn"
    assert config["loss"]["max_pos_weight"] == 5.0 and isinstance(config["loss"]["max_pos_weight"], float)
    assert config["optim"]["patience"] == default_config()["optim"]["patience"]  # untouched keys keep defaults


def test_new_keys_in_the_defaults_are_checked_by_their_type(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keys added to configs/default.yaml need no code here: their default's type is the rule; a
    key whose default is null takes null or any single value."""
    defaults = default_config() | {"text": {"min_confidence": 0.5, "language": None}}
    monkeypatch.setattr(config_module, "default_config", lambda: defaults)
    assert _load(tmp_path, "text:\n  language: en\n")["text"]["language"] == "en"
    assert _load(tmp_path, "text:\n  language: 3\n")["text"]["language"] == 3
    with pytest.raises(PosterFusionError, match="text.min_confidence must be a number, not 'high'"):
        _load(tmp_path, "text:\n  min_confidence: high\n")
    with pytest.raises(PosterFusionError, match="text.language must be a single value or null"):
        _load(tmp_path, "text:\n  language: [en, fr]\n")


def test_bad_values_stop_fusion_train_before_any_work(tiny_manifest: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  epochs: 0\n")
    result = CliRunner().invoke(fusion_app, ["train", "--manifest", str(tiny_manifest), "--config", str(config),
                                             "--out", str(tmp_path / "model"), "--cache", str(tmp_path / "cache")])
    assert_one_line_error(result, str(config), "optim.epochs must be >= 1, not 0")
    assert not (tmp_path / "model").exists() and not (tmp_path / "cache").exists()
