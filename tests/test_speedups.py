"""The speed-ups keep the features: optimised paths against references, on real posters.

Tolerances, stated once:

* exact (bit for bit): MTCNN with batched crops and channels-last max-pools vs facenet-pytorch's
  own ``MTCNN.detect``; NanoDet's
  uint8 transport + batched normalisation vs the per-image float preprocessing; NanoDet's decode
  on candidate cells only vs the decode over all cells; the whole PyTorch-runtime pipeline vs
  features computed by the code before the speed work (tests/data/speedups_reference.npz, made
  by bench/make_reference.py from commit 1d005f3) on the same kind of CPU. ``EXACT_ACROSS_CPUS``
  allows 1e-5 where oneDNN picks other kernels on another CPU.
* ``ATOL`` = 1e-4 (absolute, on raw feature values): onnxruntime vs PyTorch, NanoDet/backbone
  micro-batches, number of decoding workers and the models' thread counts (side-by-side stages),
  which change only float rounding (measured over
  1,024 posters against the code before the speed work at the same --batch-size: <= 1.2e-6 on
  detector features, <= 1.0e-5 on embeddings whose values reach ~6; no poster beyond 1e-4).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from posterfusion.detectors import Preparer, nanodet, schema
from posterfusion.dataset import PosterDataset
from posterfusion.extract import build_cache, open_stores
from posterfusion.frozen import FrozenModels

REFERENCE = Path(__file__).resolve().parent / "data" / "speedups_reference.npz"
SQUARE = "224x224"  # the reference's backbone view (schema v1, before poster-shaped views)
V1 = np.isin(schema.COLUMNS, schema.V1_COLUMNS)  # the reference holds schema v1's columns
ATOL = 1e-4
EXACT_ACROSS_CPUS = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(real_manifest: Path) -> dict:
    data = np.load(REFERENCE)
    root = real_manifest.parent
    return {
        "paths": [str(root / p) for p in data["posters"]],
        "keys": list(data["keys"]),
        "detectors": data["detectors"],
        "embeddings": data["embeddings"],
    }


def _features(paths: list[str], models: FrozenModels, batch_size: int, workers: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    stores = open_stores(models, None)
    summary = build_cache(paths, stores, models, batch_size, workers)
    keys, det = stores["detectors"].read(summary.keys)
    _, emb = stores["backbone"].read(summary.keys)
    return keys, det, emb


@pytest.fixture(scope="module")
def torch_models() -> FrozenModels:
    mp = pytest.MonkeyPatch()
    mp.setenv("POSTERFUSION_RUNTIME", "torch")
    try:
        models = FrozenModels("nanodet", "efficientnet_lite0", "cpu", backbone_view=SQUARE)
    finally:
        mp.undo()
    assert models.detectors.objects.runtime == "torch" and models.backbone.runtime == "torch"
    return models


@pytest.fixture(scope="module")
def default_models(tmp_path_factory) -> FrozenModels:
    mp = pytest.MonkeyPatch()
    mp.setenv("POSTERFUSION_ONNX_CACHE", str(tmp_path_factory.mktemp("onnx")))
    try:
        return FrozenModels("nanodet", "efficientnet_lite0", "cpu", backbone_view=SQUARE)
    finally:
        mp.undo()


def test_mtcnn_batched_crops_equal_facenet(reference: dict, torch_models: FrozenModels) -> None:
    from posterfusion.detectors.mtcnn import detect

    from facenet_pytorch import MTCNN

    from posterfusion.detectors.faces import MIN_FACE_SIZE

    dataset = PosterDataset(reference["paths"], Preparer("nanodet"), None)
    canvases = torch.stack([dataset[i].detector_input["canvas"] for i in range(len(dataset))])
    boxes, probs = MTCNN(keep_all=True, min_face_size=MIN_FACE_SIZE).detect(canvases)  # untouched
    found = detect(torch_models.detectors.faces.mtcnn, canvases)  # batched crops, channels-last pools
    assert sum(len(b) for b, _ in found) >= 10  # the reference posters hold faces
    for (fast_boxes, fast_probs), ref_boxes, ref_probs in zip(found, boxes, probs):
        if ref_boxes is None:
            assert len(fast_boxes) == 0
            continue
        np.testing.assert_array_equal(fast_boxes, np.asarray(ref_boxes, np.float32))
        np.testing.assert_array_equal(fast_probs, np.asarray(ref_probs, np.float32))


def test_mtcnn_batched_crops_resample_like_interpolate() -> None:
    """Every crop size, including up-sampling and 1-pixel crops, as F.interpolate(area) gives it."""
    from posterfusion.detectors.mtcnn import integral_image, resample_boxes

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 90, 70, 3), dtype=torch.uint8, generator=gen)
    n = 300
    y0 = torch.randint(0, 89, (n,), generator=gen)
    x0 = torch.randint(0, 69, (n,), generator=gen)
    y1 = torch.minimum(y0 + torch.randint(1, 90, (n,), generator=gen), torch.tensor(90))
    x1 = torch.minimum(x0 + torch.randint(1, 70, (n,), generator=gen), torch.tensor(70))
    index = torch.randint(0, 2, (n,), generator=gen)
    planar = images.permute(0, 3, 1, 2).float()
    for size in (24, 48):
        got = resample_boxes(integral_image(images), index, y0, y1, x0, x1, size)
        want = torch.cat([
            torch.nn.functional.interpolate(planar[int(index[k]), :, y0[k]:y1[k], x0[k]:x1[k]][None], size=(size, size), mode="area")
            for k in range(n)
        ])
        assert torch.equal(got, want)


def test_nanodet_batched_preprocessing_equals_per_image_float(reference: dict) -> None:
    from PIL import Image

    from posterfusion.images import load_poster

    for path in reference["paths"][:4]:
        rgb = load_poster(path).rgb
        image = Image.fromarray(rgb, "RGB").resize((nanodet.INPUT_SIZE, nanodet.INPUT_SIZE), Image.Resampling.BILINEAR)
        bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1]
        want = torch.from_numpy(np.ascontiguousarray(((bgr - nanodet._BGR_MEAN) / nanodet._BGR_STD).transpose(2, 0, 1)))
        assert torch.equal(nanodet.normalize(nanodet.resize_input(rgb)[None])[0], want)
        assert torch.equal(nanodet.preprocess(rgb), want)


def _decode_all_cells(scores: torch.Tensor, dists: torch.Tensor) -> list[tuple[np.ndarray, ...]]:
    """NanoDet's decode before the speed work: distances for every cell."""
    from torchvision.ops import nms

    b, a, _ = scores.shape
    xy, stride = nanodet.anchor_points(nanodet.INPUT_SIZE)
    proj = torch.arange(nanodet.REG_BINS, dtype=torch.float32)
    dist = dists.reshape(b, a, 4, nanodet.REG_BINS).softmax(-1) @ proj * stride[:, None]
    boxes = (torch.cat((xy - dist[..., :2], xy + dist[..., 2:]), dim=-1) / nanodet.INPUT_SIZE).clamp(0.0, 1.0)
    out = []
    for i in range(b):
        cell, label = torch.nonzero(scores[i] > 0.05, as_tuple=True)
        box, score = boxes[i, cell], scores[i, cell, label]
        keep = nms(box + 2.0 * label[:, None].to(box.dtype), score, 0.5)[:100]
        out.append((box[keep].numpy(), score[keep].numpy(), label[keep].numpy()))
    return out


def test_nanodet_decode_on_candidate_cells_equals_all_cells(reference: dict, torch_models: FrozenModels) -> None:
    dataset = PosterDataset(reference["paths"], Preparer("nanodet"), None)
    batch = torch.stack([dataset[i].detector_input["objects"] for i in range(len(dataset))])
    with torch.inference_mode():
        scores, dists = torch_models.detectors.objects.forward(batch)
    for got, (boxes, probs, labels) in zip(nanodet.decode(scores, dists), _decode_all_cells(scores, dists)):
        np.testing.assert_array_equal(got.boxes, boxes)
        np.testing.assert_array_equal(got.scores, probs)
        np.testing.assert_array_equal(got.labels, labels)


def test_pytorch_pipeline_equals_pre_optimisation_features(reference: dict, torch_models: FrozenModels) -> None:
    keys, det, emb = _features(reference["paths"], torch_models, batch_size=32, workers=0)
    assert keys == reference["keys"]
    np.testing.assert_allclose(det[:, V1], reference["detectors"], rtol=0, atol=EXACT_ACROSS_CPUS)
    np.testing.assert_allclose(emb, reference["embeddings"], rtol=0, atol=EXACT_ACROSS_CPUS)


def test_onnxruntime_pipeline_matches_reference(reference: dict, default_models: FrozenModels) -> None:
    # onnxruntime is a dependency: a model left on PyTorch means its export or check failed
    assert default_models.backbone.runtime == "onnxruntime", "the backbone's ONNX export or check failed"
    assert default_models.detectors.objects.runtime == "onnxruntime", "NanoDet's ONNX export or check failed"
    keys, det, emb = _features(reference["paths"], default_models, batch_size=32, workers=0)
    assert keys == reference["keys"]
    np.testing.assert_allclose(det[:, V1], reference["detectors"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(emb, reference["embeddings"], rtol=0, atol=ATOL)


def test_workers_and_model_batches_keep_features(reference: dict, default_models: FrozenModels) -> None:
    """Decoding workers and NanoDet/backbone micro-batches change only float rounding.

    (MTCNN keeps the DataLoader batch, ``--batch-size``: in the code before the speed work too, its
    integer crop windows make ~0.3% of posters' face features depend on the batch size.)
    """
    paths = reference["paths"]
    keys, det, emb = _features(paths, default_models, batch_size=6, workers=0)
    default = default_models.model_batch
    default_models.model_batch = 4 if default == 1 else 1
    try:
        keys1, det1, emb1 = _features(paths, default_models, batch_size=6, workers=2)
    finally:
        default_models.model_batch = default
    assert keys1 == keys
    np.testing.assert_allclose(det1, det, rtol=0, atol=ATOL)
    np.testing.assert_allclose(emb1, emb, rtol=0, atol=ATOL)


def test_two_lanes_equal_models_in_turn(reference: dict) -> None:
    """Two threads sharing each batch's tasks, each on half the cores, compute what every model in
    turn on all cores does (bit-identical on the development CPU; ATOL allows other kernels elsewhere)."""
    paths = reference["paths"]
    in_turn = FrozenModels("nanodet", "efficientnet_lite0", "cpu", concurrent=False)
    side_by_side = FrozenModels("nanodet", "efficientnet_lite0", "cpu", concurrent=True)
    keys, det, emb = _features(paths, in_turn, batch_size=8, workers=0)
    keys1, det1, emb1 = _features(paths, side_by_side, batch_size=8, workers=0)
    assert keys1 == keys
    np.testing.assert_allclose(det1, det, rtol=0, atol=ATOL)
    np.testing.assert_allclose(emb1, emb, rtol=0, atol=ATOL)
    assert {"objects", "faces", "backbone"} <= set(side_by_side.timings)


def test_ocr_shared_by_both_threads_reads_as_one_thread(reference: dict) -> None:
    """With OCR, each thread reads some posters' text with its own reader: every poster's text,
    and every other feature, as with every model in turn."""
    paths = reference["paths"][:10]
    in_turn = FrozenModels("nanodet", "efficientnet_lite0", "cpu", text=True, concurrent=False)
    side_by_side = FrozenModels("nanodet", "efficientnet_lite0", "cpu", text=True, concurrent=True)
    assert len(side_by_side.readers) == 2 and len(in_turn.readers) == 1
    read = []
    for models in (in_turn, side_by_side):
        stores = open_stores(models, None)
        summary = build_cache(paths, stores, models, batch_size=5, workers=0)
        keys = summary.keys
        read.append({name: stores[name].read(keys)[1] for name in ("detectors", "backbone", "text")}
                    | {"notes": stores["text"].notes(keys)})
    assert read[1]["notes"] == read[0]["notes"] and any(read[0]["notes"].values())
    np.testing.assert_array_equal(read[1]["text"], read[0]["text"])
    np.testing.assert_allclose(read[1]["detectors"], read[0]["detectors"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(read[1]["backbone"], read[0]["backbone"], rtol=0, atol=ATOL)
    assert side_by_side.timings.get("text (helper thread)", 0) > 0


def test_nanodet_top_nms_equals_full_nms_on_both_paths(reference: dict, torch_models: FrozenModels) -> None:
    from posterfusion.detectors._ops import nms

    dataset = PosterDataset(reference["paths"][:4], Preparer("nanodet"), None)
    batch = torch.stack([dataset[i].detector_input["objects"] for i in range(len(dataset))])
    with torch.inference_mode():
        scores, _ = torch_models.detectors.objects.forward(batch)
    for i in range(len(scores)):
        cell, label = torch.nonzero(scores[i] > 0.05, as_tuple=True)
        gen = torch.Generator().manual_seed(i)
        xy = torch.rand(len(cell), 2, generator=gen) * 0.8
        boxes = torch.cat((xy, xy + torch.rand(len(cell), 2, generator=gen) * 0.2), 1) + 2.0 * label[:, None]
        score = scores[i, cell, label]
        want = nms(boxes, score, 0.5)[:100]
        for first in (50, 130, 1024, 10**6):  # fallback, shortcut, default, never
            assert torch.equal(nanodet._top_nms(boxes, score, 0.5, 100, first=first), want)


def test_onnx_export_is_cached(tmp_path: Path, monkeypatch) -> None:
    from posterfusion import onnx_runtime

    monkeypatch.setenv("POSTERFUSION_ONNX_CACHE", str(tmp_path))
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    first = onnx_runtime.load(module, "tiny", "sha-of-tiny", (1, 3, 16, 16))
    assert first is not None and first.path.parent == tmp_path
    stamp = first.path.stat().st_mtime_ns
    second = onnx_runtime.load(module, "tiny", "sha-of-tiny", (1, 3, 16, 16))
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(second(x), module(x), rtol=0, atol=1e-5)
    monkeypatch.setenv("POSTERFUSION_RUNTIME", "torch")
    assert not onnx_runtime.enabled(torch.device("cpu"))


def test_export_leaves_the_pytorch_model_in_eval_mode(tmp_path: Path, monkeypatch) -> None:
    """The exporter restores the top module's mode on the whole tree: frozen models must stay eval."""
    from posterfusion import onnx_runtime

    monkeypatch.setenv("POSTERFUSION_ONNX_CACHE", str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    wrapped = onnx_runtime.WithInputNormalization(net, torch.full((3,), 127.5), torch.full((3,), 127.5))
    exported = onnx_runtime.load(wrapped, "tiny-uint8", "sha-of-tiny-bn", (1, 3, 16, 16), input_dtype=torch.uint8)
    assert exported is not None and not net.training and not wrapped.training
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), net((x.float() - 127.5) / 127.5), rtol=0, atol=1e-5)


def test_each_task_of_a_batch_runs_once_whichever_lane_takes_it() -> None:
    """The two lanes share one list: every task runs exactly once, and nothing after stop()."""
    import threading

    from posterfusion.frozen import WorkList

    ran: list[int] = []
    lanes: set[int] = set()
    both_started = threading.Barrier(2)

    def task(k: int):
        def run(lane: int) -> None:
            if k < 2:
                both_started.wait(timeout=10)  # the first two tasks are held until both lanes have one
            ran.append(k)
            lanes.add(lane)
        return run

    work = WorkList([task(k) for k in range(50)])

    def drain(lane: int) -> None:
        while (t := work.take()) is not None:
            t(lane)

    helper = threading.Thread(target=drain, args=(1,))
    helper.start()
    drain(0)
    helper.join()
    assert sorted(ran) == list(range(50)) and lanes == {0, 1}
    work.stop()
    assert work.take() is None
    stopped = WorkList([task(k) for k in range(2, 5)])
    stopped.stop()
    assert stopped.take() is None


@pytest.mark.parametrize("failing_lane", [0, 1])
def test_a_task_failing_in_either_lane_fails_its_batch(reference: dict, failing_lane: int) -> None:
    """An error in the helper's task reaches the caller as it is; an error in the caller's stops
    the helper (no hang, no batch yielded)."""
    import threading

    models = FrozenModels(None, "efficientnet_lite0", "cpu", backbone_view=SQUARE, concurrent=True)
    dataset = PosterDataset(reference["paths"][:6], None, models.backbone)
    items = [dataset[i] for i in range(len(dataset))]
    embed = models.backbone.embed

    def flaky(batch):
        if (threading.current_thread() is threading.main_thread()) == (failing_lane == 0):
            raise RuntimeError(f"boom in lane {failing_lane}")
        time.sleep(0.05)  # leaves the other lane time to take a task
        return embed(batch)

    models.backbone.embed = flaky
    with pytest.raises(RuntimeError, match=f"boom in lane {failing_lane}"):
        list(models.stream([("batch", items)]))
