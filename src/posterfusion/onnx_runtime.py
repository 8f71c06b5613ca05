"""Frozen CPU models through onnxruntime: the same networks, 2-4x faster than PyTorch on a CPU.

On this project's 2-core CPUs onnxruntime runs NanoDet about 2x and EfficientNet-Lite0 about 4x
faster than PyTorch (eager, NCHW or channels-last; ``bench/run.py`` measures both), so frozen
models on the CPU run there. Nothing is shipped: at first use the PyTorch module, with the weights
it already loaded, is exported to ONNX into a cache folder (``$POSTERFUSION_ONNX_CACHE``, else
``~/.cache/posterfusion/onnx``), keyed by the model's name, its weights' sha256 and the torch
version, then checked against PyTorch on a fixed input before it is used.

The outputs equal PyTorch's to float rounding (measured on real posters: NanoDet scores within
~2e-6, its box logits within ~3e-5, embeddings within ~1e-5 of values up to ~6), the same size of
difference as between PyTorch's own CPU kernels, or between a CPU and a GPU. The models' identities
(weights checksums) are therefore unchanged, and features cached by either runtime stay comparable.
Where the export or that check fails, or ``POSTERFUSION_RUNTIME=torch`` is set, PyTorch runs them.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import PosterFusionError
from . import settings
from .files import atomic_path, remove_stale_temps

CHECK_TOLERANCE = 1e-3
"""Largest |onnxruntime - PyTorch| accepted on the check input (relative to the output's scale)."""


def enabled(device: torch.device) -> bool:
    """Whether frozen models on ``device`` should run through onnxruntime."""
    if device.type != "cpu" or settings.torch_runtime_forced():
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    return settings.onnx_cache()


class OrtModel:
    """An exported copy of a frozen ``torch.nn.Module``, called like it (tensors in, tensors out)."""

    def __init__(self, session, input_name: str, output_names: list[str], path: Path) -> None:
        self.session = session
        self.input_name = input_name
        self.output_names = output_names
        self.path = path
        self.input_dtype = np.uint8 if session.get_inputs()[0].type == "tensor(uint8)" else np.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        array = x.detach().numpy()
        if array.dtype != self.input_dtype:
            array = array.astype(self.input_dtype)
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(array)})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As many threads as PyTorch uses unless told; no spinning between runs, so DataLoader
    # workers that decode the next batch get the cores while the model waits for them.
    options.intra_op_num_threads = max(1, threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: torch.nn.Module, example: torch.Tensor, output_names: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # exports of killed processes (other processes' stay)
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(tmp), dynamo=False, opset_version=17, input_names=["x"],
            output_names=list(output_names),
            dynamic_axes={"x": {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
        )


def _check(model: OrtModel, module: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Largest difference to PyTorch on a fixed input, relative to the outputs' magnitude."""
    rng = np.random.default_rng(0)
    if dtype == torch.uint8:
        x = torch.from_numpy(rng.integers(0, 256, (2, *shape[1:]), dtype=np.uint8))
    else:
        x = torch.from_numpy(rng.standard_normal((2, *shape[1:])).astype(np.float32))
    with torch.inference_mode():
        expected = module(x)
    got = model(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    return max(float((e - g).abs().max()) / max(1.0, float(e.abs().max())) for e, g in zip(expected, got))


def load(module: torch.nn.Module | Callable[[], torch.nn.Module], name: str, weights_sha256: str,
         input_shape: tuple[int, ...], output_names: Sequence[str] = ("y",),
         input_dtype: torch.dtype = torch.float32, threads: int | None = None) -> OrtModel | None:
    """The module through onnxruntime, exported on first use; None where that cannot be done.

    ``module`` may be a function that builds it: it is called only when no export is cached.
    """
    key = f"{name}|{weights_sha256}|{torch.__version__}|{tuple(input_shape[1:])}|{input_dtype}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.onnx"
    try:
        fresh = not path.is_file()
        if fresh:
            module = module if isinstance(module, torch.nn.Module) else module()
            module.eval()  # frozen models only (the exporter restores this mode afterwards)
            try:
                _export(module, torch.zeros((1, *input_shape[1:]), dtype=input_dtype), output_names, path)
            except OSError:  # an unwritable cache folder: export for this process only
                path = Path(tempfile.mkdtemp(prefix="posterfusion-onnx-")) / path.name
                _export(module, torch.zeros((1, *input_shape[1:]), dtype=input_dtype), output_names, path)
        model = OrtModel(_session(path, threads), "x", list(output_names), path)
        if fresh:
            error = _check(model, module, input_shape, input_dtype)
            if not error <= CHECK_TOLERANCE:
                path.unlink(missing_ok=True)
                warnings.warn(f"{name}: onnxruntime differs from PyTorch by {error:.2g}; using PyTorch", stacklevel=2)
                return None
        return model
    except PosterFusionError:  # the user's weights are at fault, not the runtime: say so now
        raise
    except Exception as exc:  # any exporter/runtime failure: PyTorch still works
        warnings.warn(f"{name}: onnxruntime unavailable ({type(exc).__name__}: {exc}); using PyTorch", stacklevel=2)
        return None


class WithInputNormalization(torch.nn.Module):
    """``module((x.float() - mean) / std)`` for uint8 ``x``: exported this way, onnxruntime does the
    normalisation inside the graph (same float32 subtract and divide), on its threads."""

    def __init__(self, module: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())
        self.train(module.training)  # the exporter restores this mode on the whole tree afterwards

    def forward(self, x: torch.Tensor):
        return self.module((x.to(torch.float32) - self.mean) / self.std)
