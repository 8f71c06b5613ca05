"""`detect-cache build` and `detect-cache info` end to end: the "Foundation" acceptance checks.

Fast tests use tiny synthetic posters; the ``slow`` ones read the real posters in
``../shared/data/movieposters`` (skipped where that folder is absent) and share one session cache
(``real_cache`` in conftest.py) so the detectors run over each real poster only once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_one_line_error, kill_when, tmpfs, write_poster
from typer.testing import CliRunner

from posterfusion.cache import list_stores
from posterfusion.cli import detect_cache_app, fusion_app
from posterfusion.detectors.base import COCO_CLASSES

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"(?P<total>\d+) posters: (?P<done>\d+) done, (?P<cached>\d+) cached, (?P<skipped>\d+) skipped "
    r"\(duplicates\), (?P<failed>\d+) failed"
)


def invoke(app, *args: object):
    """Run a CLI command in-process; unexpected exceptions propagate so tests show tracebacks."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def summary_of(output: str) -> dict[str, int]:
    match = SUMMARY.search(output)
    assert match, f"no build summary in:\n{output}"
    return {k: int(v) for k, v in match.groupdict().items()}


def cache_contents(cache: Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """Every store's rows as {store folder: {key: (path, values)}}, read straight from Parquet."""
    out = {}
    for store in list_stores(cache):
        keys, values = store.read()
        paths: dict[str, str] = {}
        for part in store.parts():
            table = pq.read_table(part, columns=["key", "path"])
            paths.update(zip(table.column("key").to_pylist(), table.column("path").to_pylist()))
        out[store.folder.name] = {k: (paths[k], v) for k, v in zip(keys, values)}
    return out


def part_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/part-*.parquet"))


# --- fast: synthetic posters --------------------------------------------------------------------


def test_build_then_rebuild_does_no_work(tiny_manifest: Path, tmp_path: Path, shared_models) -> None:
    cache = tmp_path / "cache"
    first = invoke(detect_cache_app, "build", tiny_manifest, "--cache", cache, "--batch-size", 2)
    assert first.exit_code == 0, first.output
    assert summary_of(first.stdout) == {"total": 4, "done": 4, "cached": 0, "skipped": 0, "failed": 0}
    parts = part_files(cache)
    before = {p: p.stat().st_mtime_ns for p in parts}

    again = invoke(detect_cache_app, "build", tiny_manifest, "--cache", cache, "--batch-size", 2)
    assert again.exit_code == 0, again.output
    assert summary_of(again.stdout) == {"total": 4, "done": 0, "cached": 4, "skipped": 0, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in part_files(cache)} == before  # nothing written

    info = json.loads(invoke(detect_cache_app, "info", "--cache", cache, "--json").stdout)
    assert info["posters"] == 4 and info["embedding_posters"] == 4


def test_duplicates_are_computed_once(tmp_path: Path, shared_models) -> None:
    poster = write_poster(tmp_path / "a.jpg", seed=1)
    shutil.copy(poster, tmp_path / "copy_of_a.jpg")
    write_poster(tmp_path / "b.jpg", seed=2)
    result = invoke(detect_cache_app, "build", tmp_path, "--cache", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert summary_of(result.stdout) == {"total": 3, "done": 2, "cached": 0, "skipped": 1, "failed": 0}


def _bad_files(folder: Path, good: list[Path]) -> dict[str, str]:
    """Corrupt posters beside good ones; returns {file name: expected reason fragment}."""
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    return {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "missing.jpg": "file not found",
    }


def _check_bad_files_reported(result, folder: Path, expected: dict[str, str], n_good: int) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    summary = summary_of(result.stdout)
    assert summary["failed"] == len(expected) and summary["done"] == n_good, result.output
    lines = result.stderr.splitlines()
    for name, reason in expected.items():
        mentions = [line for line in lines if name in line]
        assert len(mentions) == 1, f"{name} should be reported once:\n{result.stderr}"
        assert f"{folder / name}: " in mentions[0] and reason in mentions[0], \
            f"{name}: the full path and the reason should be on one line:\n{result.stderr}"


def test_corrupt_and_missing_posters_are_reported_and_skipped(tmp_path: Path, shared_models) -> None:
    # A deep folder, so the reported lines are longer than any terminal: each must stay one line.
    folder = tmp_path / ("a-rather-long-folder-name-" * 4) / "posters"
    good = [write_poster(folder / f"good{i}.jpg", seed=i, size=(240, 360)) for i in range(3)]
    expected = _bad_files(folder, good)
    rows = ["good0.jpg", "truncated.jpg", "good1.jpg", "empty.jpg", "text.jpg", "missing.jpg", "good2.jpg"]
    manifest = folder / "manifest.csv"
    manifest.write_text("poster,genres\n" + "".join(f"{r},Drama\n" for r in rows))

    cache = tmp_path / "cache"
    result = invoke(detect_cache_app, "build", manifest, "--cache", cache, "--batch-size", 3)
    _check_bad_files_reported(result, folder, expected, n_good=3)
    assert json.loads(invoke(detect_cache_app, "info", "--cache", cache, "--json").stdout)["posters"] == 3


@contextlib.contextmanager
def _fails_after(seconds: int) -> Iterator[None]:
    """Turn a hang (a read blocked on a FIFO) into a test failure instead of a stuck test run."""
    def hung(*_) -> None:
        raise TimeoutError(f"still running after {seconds} s: hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_special_files_are_reported_and_skipped_without_reading_them(tmp_path: Path, shared_models) -> None:
    folder = tmp_path / "posters"
    write_poster(folder / "good.jpg", seed=1)
    # A device: /dev/null rather than /dev/zero (tests/test_files.py), which a regression would read
    # until the machine runs out of memory.
    (folder / "null.jpg").symlink_to("/dev/null")
    os.mkfifo(folder / "pipe.jpg")  # nobody writes: reading it blocked the build forever
    (folder / "folder.jpg").mkdir()
    with open(folder / "huge.jpg", "wb") as sparse:  # 80 MB on paper, nothing on disk
        sparse.truncate(80 * 2**20)
    expected = {"null.jpg": "not a regular file (a character device)", "pipe.jpg": "not a regular file (a FIFO)",
                "folder.jpg": "not a regular file (a folder)", "huge.jpg": "file too large (80 MB, limit 64 MB)"}
    manifest = folder / "manifest.csv"
    manifest.write_text("poster,genres\n" + "".join(f"{name},Drama\n" for name in ["good.jpg", *expected]))
    with _fails_after(60):
        result = invoke(detect_cache_app, "build", manifest, "--cache", tmp_path / "cache")
    _check_bad_files_reported(result, folder, expected, n_good=1)


def _full_disk_after(writes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet writes fail as on a full disk (half a file written, then pyarrow's error) after
    ``writes`` good ones."""
    real_write = pq.write_table
    calls = iter(range(10**6))

    def write_table(table, where, **kwargs) -> None:
        if next(calls) >= writes:
            Path(where).write_bytes(b"PAR1 half a part")
            raise OSError("IOError: No space left on device. Detail: [errno 28] No space left on device")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)


def _check_disk_full(result, cache: Path, safe: int) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {cache}: disk full; {safe} posters are safe in the cache, and a rerun with free space completes it"
    )
    assert not list(cache.rglob(".*.tmp")), "a temporary file was left behind"


def test_a_full_disk_stops_the_build_in_one_line_and_a_rerun_completes_it(
    tiny_manifest: Path, tmp_path: Path, shared_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        _full_disk_after(2, patch)  # the first batch's detector and backbone parts fit
        result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", cache, "--batch-size", 2)
    _check_disk_full(result, cache, safe=2)
    rerun = invoke(detect_cache_app, "build", tiny_manifest, "--cache", cache, "--batch-size", 2)
    assert summary_of(rerun.stdout) == {"total": 4, "done": 2, "cached": 2, "skipped": 0, "failed": 0}


def test_a_full_tmpfs_cache_keeps_what_fitted(tmp_path: Path, shared_models) -> None:
    """The same on a real full disk: a 200 kB tmpfs, where mounting one is allowed."""
    folder = tmp_path / "posters"
    for i in range(12):
        write_poster(folder / f"p{i}.jpg", seed=i)
    with tmpfs(tmp_path / "small", "size=200k") as small:
        result = invoke(detect_cache_app, "build", folder, "--cache", small / "cache", "--batch-size", 2)
        safe = len(set.intersection(*(store.keys() for store in list_stores(small / "cache"))))
        assert 0 < safe < 12
        _check_disk_full(result, small / "cache", safe)
        shutil.copytree(small / "cache", tmp_path / "cache")  # somewhere with space
    rerun = invoke(detect_cache_app, "build", folder, "--cache", tmp_path / "cache", "--batch-size", 2)
    assert summary_of(rerun.stdout) == {"total": 12, "done": 12 - safe, "cached": safe, "skipped": 0, "failed": 0}


def test_manifest_without_poster_column_is_a_one_line_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,genres\na.jpg,Drama\n")
    result = invoke(detect_cache_app, "build", manifest, "--cache", tmp_path / "cache")
    assert_one_line_error(result, str(manifest), "'poster'")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("device, fragment", [("banana", "not a device name"), ("cuda:0", "no CUDA GPU")])
def test_bad_device_is_a_one_line_error(tiny_manifest: Path, tmp_path: Path, device: str, fragment: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache", "--device", device)
    assert_one_line_error(result, f"--device {device}", fragment)


def test_unknown_object_detector_is_a_one_line_error(tiny_manifest: Path, tmp_path: Path) -> None:
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache", "--objects", "detr")
    assert_one_line_error(result, "unknown object detector 'detr'")


def test_yolo_without_weights_file_is_a_one_line_error(tiny_manifest: Path, tmp_path: Path) -> None:
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache",
                    "--objects", "yolo:/nonexistent.pt")
    assert_one_line_error(result, "/nonexistent.pt", "weights file not found", "--objects nanodet")


def test_yolo_without_ultralytics_names_the_extra(tiny_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    import sys

    weights = tmp_path / "yolo.pt"
    weights.write_bytes(b"a weights file")
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # as if the yolo extra were not installed
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache", "--objects", f"yolo:{weights}")
    assert_one_line_error(result, str(weights), "needs ultralytics", "pip install 'posterfusion[yolo]'")


def test_info_on_a_missing_cache_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(invoke(detect_cache_app, "info", "--cache", tmp_path / "nope"), "no such cache folder")


# --- YOLO backend: a randomly initialised ultralytics model, offline -----------------------------


def _random_yolo(path: Path, coco_names: bool) -> Path:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")  # architecture only: random weights, nothing downloaded
    if coco_names:
        # A real yolo11n.pt carries COCO's class names; a model built from the yaml has '0'..'79'.
        model.model.names = dict(enumerate(COCO_CLASSES))
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_yolo(tmp_path_factory.mktemp("yolo") / "yolo11n-random.pt", coco_names=True)


@pytest.mark.slow
def test_yolo_backend_builds_features(real_manifest: Path, yolo_weights: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # --batch-size 2 on 3 posters: a decoding worker prepares the YOLO inputs, batches of 2 and 1.
    result = invoke(detect_cache_app, "build", real_manifest, "--cache", cache, "--limit", 3,
                    "--batch-size", 2, "--objects", f"yolo:{yolo_weights}", "--backbone", "none")
    assert result.exit_code == 0, result.output
    assert summary_of(result.stdout) == {"total": 3, "done": 3, "cached": 0, "skipped": 0, "failed": 0}

    info = json.loads(invoke(detect_cache_app, "info", "--cache", cache, "--json").stdout)
    assert info["posters"] == 3 and info["backbone"] is None
    assert info["detectors"]["objects"]["name"] == "yolo"
    assert info["detectors"]["objects"]["file"] == yolo_weights.name
    (store,) = list_stores(cache)
    keys, values = store.read()
    assert values.shape == (3, len(info["columns"])) and np.isfinite(values).all()
    assert (values[:, info["columns"].index("face_count")] >= 0).all()

    again = invoke(detect_cache_app, "build", real_manifest, "--cache", cache, "--limit", 3,
                   "--objects", f"yolo:{yolo_weights}", "--backbone", "none")
    assert summary_of(again.stdout)["cached"] == 3


@pytest.mark.slow
def test_yolo_model_without_coco_class_names_is_refused(tiny_manifest: Path, tmp_path: Path) -> None:
    weights = _random_yolo(tmp_path / "unnamed.pt", coco_names=False)
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache",
                    "--objects", f"yolo:{weights}")
    assert_one_line_error(result, str(weights), "not COCO")


def test_importing_ultralytics_does_not_break_the_decoder() -> None:
    """ultralytics patches PIL's Image.open; a non-image must still be a BadImage, not a crash."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)
    from PIL import Image

    from posterfusion import images

    assert images._pil_open().__module__ == Image.__name__
    for data in (b"this is not a picture", b"\xff\xd8\xff\xe0 not really a jpeg"):
        with pytest.raises(images.BadImage):
            images.decode_bytes(data)


# --- slow: real posters ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_posters_and_info(real_cache, shared_models) -> None:
    result = invoke(detect_cache_app, "info", "--cache", real_cache.cache, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["posters"] == len(real_cache.paths) == info["embedding_posters"]
    assert info["detectors"]["objects"]["name"] == "nanodet"
    columns = info["columns"]
    for name in ("obj_person_count", "face_count", "expr_happy_mean"):
        assert name in columns

    text = invoke(detect_cache_app, "info", "--cache", real_cache.cache)
    assert f"{len(real_cache.paths)} posters" in text.stdout

    detectors = next(s for s in list_stores(real_cache.cache) if s.kind == "detectors")
    _, values = detectors.read()
    persons = (values[:, columns.index("obj_person_count")] > 0).mean()
    faces = (values[:, columns.index("face_count")] > 0).mean()
    print(f"\n{len(values)} real posters: persons on {persons:.0%}, faces on {faces:.0%}; "
          f"built in {real_cache.seconds:.0f} s ({real_cache.seconds / len(values):.2f} s/poster)")
    assert persons >= 0.5 and faces >= 0.25

    # The same posters again through the CLI: everything is a cache hit.
    again = invoke(detect_cache_app, "build", real_cache.manifest, "--cache", real_cache.cache)
    assert summary_of(again.stdout)["cached"] == len(real_cache.paths)
    assert summary_of(again.stdout)["done"] == 0


@pytest.mark.slow
def test_corrupt_copies_of_real_posters_are_reported(real_cache, tmp_path: Path, shared_models) -> None:
    folder = tmp_path / "posters"
    folder.mkdir()
    good = []
    for i, path in enumerate(real_cache.paths[:2]):
        good.append(folder / f"good{i}.jpg")
        shutil.copy(path, good[-1])
    expected = _bad_files(folder, good)
    cache = real_cache.copy(tmp_path / "cache")
    result = invoke(detect_cache_app, "build", folder, "--cache", cache)  # a folder: missing.jpg is not in it
    expected.pop("missing.jpg")
    _check_bad_files_reported(result, folder, expected, n_good=0)
    assert summary_of(result.stdout)["cached"] == 2  # copies of cached posters are hits


def _cli_command(real_manifest: Path, cache: Path, limit: int, batch_size: int) -> list[str]:
    script = Path(sys.executable).with_name("detect-cache")
    prefix = [str(script)] if script.is_file() else [
        sys.executable, "-c", "from posterfusion.cli import detect_cache_app; detect_cache_app()"]
    return prefix + ["build", os.path.relpath(real_manifest, REPO), "--cache", str(cache),
                     "--limit", str(limit), "--batch-size", str(batch_size)]


def _run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_build_killed_halfway_resumes_to_the_same_cache(real_manifest: Path, tmp_path: Path, shared_models) -> None:
    limit, batch_size = 32, 8
    reference = tmp_path / "uninterrupted"
    resumed = tmp_path / "resumed"

    # Uninterrupted run, exactly as a user would type it.
    full = _run(_cli_command(real_manifest, reference, limit, batch_size))
    assert summary_of(full.stdout) == {"total": limit, "done": limit, "cached": 0, "skipped": 0, "failed": 0}

    # Same command into another cache, killed with SIGKILL (it and its decoding workers) as soon as
    # the first batch is committed.
    kill_when(_cli_command(real_manifest, resumed, limit, batch_size), REPO,
              lambda: bool(list(resumed.glob("detectors-*/part-*.parquet"))))
    partial = cache_contents(resumed)
    detector_rows = next(len(rows) for name, rows in partial.items() if name.startswith("detectors-"))
    assert 0 < detector_rows < limit

    # Rerun: completes what is missing, recomputes nothing that was committed.
    rerun = _run(_cli_command(real_manifest, resumed, limit, batch_size))
    summary = summary_of(rerun.stdout)
    assert summary["failed"] == 0 and summary["done"] + summary["cached"] == limit
    assert summary["done"] == limit - min(len(rows) for rows in partial.values())

    assert not list(resumed.glob("*/.*.tmp"))  # the killed writer's leftovers are gone

    # Same rows, same paths, bit-identical values.
    expected, got = cache_contents(reference), cache_contents(resumed)
    assert sorted(got) == sorted(expected)  # same store folders, i.e. same model identities
    for store, rows in expected.items():
        assert sorted(got[store]) == sorted(rows), store
        for key, (path, values) in rows.items():
            assert got[store][key][0] == path
            assert np.array_equal(got[store][key][1], values), f"{store}: {path} differs"
    assert all(np.array_equal(partial[s][k][1], expected[s][k][1]) for s in partial for k in partial[s])

    # The same command once more does no detector work: everything cached, nothing written.
    parts = {p: p.stat().st_mtime_ns for p in part_files(resumed)}
    again = invoke(detect_cache_app, "build", real_manifest, "--cache", resumed, "--limit", limit,
                   "--batch-size", batch_size)
    assert summary_of(again.stdout) == {"total": limit, "done": 0, "cached": limit, "skipped": 0, "failed": 0}
    assert {p: p.stat().st_mtime_ns for p in part_files(resumed)} == parts


# --- the shipped model on the sample images -------------------------------------------------------


def test_predict_samples_with_the_shipped_model(shared_models) -> None:
    from posterfusion.predict import default_model_dir, sample_images

    if not (default_model_dir() / "card.json").is_file():
        pytest.skip(f"no shipped default model at {default_model_dir()} yet")
    samples = sample_images()
    assert samples, "no sample images found in the package"
    result = invoke(fusion_app, "predict", "--samples", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["poster"] for line in lines] == [str(p) for p in samples]
    assert all(line["genres"] and line["error"] is None for line in lines)
