"""Process-wide settings: read from the environment when asked for, applied once before models run."""

from __future__ import annotations

from pathlib import Path

import torch

from posterfusion import settings


def test_variables_are_read_when_asked_for(monkeypatch, tmp_path: Path) -> None:
    from posterfusion.frozen import model_batch_size
    from posterfusion.weights import weights_dir

    monkeypatch.delenv("POSTERFUSION_MODEL_BATCH", raising=False)
    assert model_batch_size(torch.device("cpu")) == 1 and model_batch_size(torch.device("cuda")) is None
    monkeypatch.setenv("POSTERFUSION_MODEL_BATCH", "0")
    assert model_batch_size(torch.device("cpu")) is None
    monkeypatch.setenv("POSTERFUSION_MODEL_BATCH", "4")
    assert model_batch_size(torch.device("cpu")) == 4
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path
    monkeypatch.setenv("POSTERFUSION_RUNTIME", "Torch")
    assert settings.torch_runtime_forced()


def test_apply_sets_the_onednn_cache_only_where_the_user_did_not(monkeypatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    settings.apply(torch.device("cpu"))
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == settings.ONEDNN_CACHE_CAPACITY
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    settings.apply(torch.device("cpu"))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
