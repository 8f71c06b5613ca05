"""`detect-cache build --ray`: the build on Ray Data gives the local build's stores.

One local Ray per module (2 CPUs, no dashboard, no usage reports), which the commands run in
this process use, and which the killed build's subprocess joins by its address.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, kill_when, write_poster
from pyarrow.fs import FileSelector
from test_build import REPO, _bad_files, _check_bad_files_reported, _cli_command, _run, cache_contents, invoke, summary_of

from posterfusion.cache import FeatureStore, UriStore, list_stores
from posterfusion.cli import detect_cache_app

ATOL = 1e-4  # the CPU tolerance of tests/test_speedups.py (thread counts, runtimes, workers)


@pytest.fixture(scope="module")
def ray_address() -> str:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _failure_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("skipped ")]


def test_bad_posters_are_reported_as_by_the_local_build_and_a_uri_cache_holds_its_rows(
        tmp_path: Path, ray_address: str, shared_models) -> None:
    folder = tmp_path / "posters"
    good = [write_poster(folder / f"good{i}.jpg", seed=i, size=(240, 360)) for i in range(3)]
    expected = _bad_files(folder, good)
    rows = ["good0.jpg", "truncated.jpg", "good1.jpg", "empty.jpg", "text.jpg", "missing.jpg", "good2.jpg", "good0.jpg"]
    manifest = folder / "manifest.csv"
    manifest.write_text("poster,genres\n" + "".join(f"{r},Drama\n" for r in rows))

    local = invoke(detect_cache_app, "build", manifest, "--cache", tmp_path / "local", "--batch-size", 3)
    uri = f"memory://{tmp_path.name}/cache"  # fsspec's in-process filesystem: the non-local code path
    on_ray = invoke(detect_cache_app, "build", manifest, "--cache", uri, "--batch-size", 3, "--ray", "local",
                    "--ray-workers", 1)
    _check_bad_files_reported(on_ray, folder, expected, n_good=3)
    assert _failure_lines(on_ray) == _failure_lines(local)
    assert summary_of(on_ray.stdout) == summary_of(local.stdout)
    assert summary_of(on_ray.stdout)["skipped"] == 1  # good0.jpg twice, in different batches
    assert "on 1 Ray cpu worker" in on_ray.stdout

    for store in list_stores(tmp_path / "local"):
        remote = FeatureStore.open(uri, store.kind, store.identity, store.columns)
        assert isinstance(remote, UriStore) and remote.folder.name == store.folder.name
        keys, values = store.read()
        remote_keys, remote_values = remote.read(keys)
        assert remote_keys == keys and len(keys) == 3
        np.testing.assert_allclose(remote_values, values, atol=ATOL)
        names = [info.base_name for info in remote.filesystem.get_file_info(FileSelector(str(remote.folder)))]
        assert not [n for n in names if n.endswith(".tmp")], names


def test_a_uri_cache_without_ray_is_a_one_line_error(tiny_manifest: Path) -> None:
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", "s3://bucket/cache")
    assert_one_line_error(result, "--cache s3://bucket/cache", "--ray")


@pytest.mark.slow
def test_ray_build_equals_the_local_build(real_cache, ray_address: str, tmp_path: Path, shared_models) -> None:
    # The first 128 of the session cache's posters: the same four batches of 32 it was built in.
    manifest = tmp_path / "first.csv"
    pd.read_csv(real_cache.manifest, dtype=str, keep_default_na=False).head(128).to_csv(manifest, index=False)
    cache = tmp_path / "cache"
    result = invoke(detect_cache_app, "build", manifest, "--cache", cache, "--ray", "local", "--ray-workers", 2)
    assert result.exit_code == 0, result.output
    assert summary_of(result.stdout) == {"total": 128, "done": 128, "cached": 0, "skipped": 0, "failed": 0}

    got, reference = cache_contents(cache), cache_contents(real_cache.cache)
    assert sorted(got) == sorted(reference)  # the same stores: same model identities
    for store, rows in got.items():
        assert len(rows) == 128
        for key, (path, values) in rows.items():
            assert reference[store][key][0] == path
            np.testing.assert_allclose(values, reference[store][key][1], atol=ATOL, err_msg=f"{store}: {path}")

    local = invoke(detect_cache_app, "build", manifest, "--cache", cache)  # interchangeable: nothing to do
    assert summary_of(local.stdout) == {"total": 128, "done": 0, "cached": 128, "skipped": 0, "failed": 0}


@pytest.mark.slow
def test_ray_build_killed_midway_completes_on_rerun_with_every_poster_once(
        real_manifest: Path, ray_address: str, tmp_path: Path) -> None:
    limit, batch_size = 24, 8
    cache = tmp_path / "cache"
    command = _cli_command(real_manifest, cache, limit, batch_size) + ["--ray", ray_address, "--ray-workers", 1]
    command = [str(part) for part in command]
    kill_when(command, REPO, lambda: all(list(cache.glob(f"{kind}-*/part-*.parquet")) for kind in ("detectors", "backbone")))
    partial = min(len(rows) for rows in cache_contents(cache).values())
    assert 0 < partial < limit

    rerun = summary_of(_run(command).stdout)
    assert rerun["failed"] == 0 and rerun["done"] + rerun["cached"] == limit and rerun["cached"] >= partial
    for store in list_stores(cache):  # every poster exactly once, in the parts as written
        counts = Counter(key for part in store.parts() for key in pq.read_table(part, columns=["key"]).column("key").to_pylist())
        assert len(counts) == limit and set(counts.values()) == {1}, store.folder.name


def test_a_gpu_device_on_a_cluster_without_gpus_is_a_one_line_error(tiny_manifest: Path, tmp_path: Path,
                                                                    ray_address: str, shared_models) -> None:
    result = invoke(detect_cache_app, "build", tiny_manifest, "--cache", tmp_path / "cache", "--ray", "local",
                    "--device", "cuda")
    assert_one_line_error(result, "--device cuda", "the Ray cluster has no GPU")
