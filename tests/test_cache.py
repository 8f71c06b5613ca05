"""The Parquet cache: identity-separated stores, atomic parts, deduplicated reads, safe sharing."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from posterfusion import cache as cache_module
from posterfusion.cache import FeatureStore, describe_cache, find_store, list_stores
from posterfusion.errors import PosterFusionError
from posterfusion.files import temp_name

IDENTITY = {"schema_version": 1, "objects": {"name": "nanodet", "weights_sha256": "abc"}}
COLUMNS = ["a_count", "b_maxconf"]


def _store(root: Path, identity: dict = IDENTITY) -> FeatureStore:
    return FeatureStore.open(root, "detectors", identity, COLUMNS)


def test_rows_round_trip_and_are_readable_by_pandas(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append(["k1", "k2"], ["p1", "p2"], np.array([[1, 0.5], [2, 0.25]]))
    keys, values = store.read(["k2", "missing", "k1"])
    assert keys == ["k2", "k1"] and values.tolist() == [[2, 0.25], [1, 0.5]]
    table = pd.read_parquet(store.folder)
    assert list(table.columns) == ["key", "path", *COLUMNS] and len(table) == 2


def test_embeddings_are_one_list_column(tmp_path: Path) -> None:
    store = FeatureStore.open(tmp_path, "backbone", {"name": "cnn"}, ["e0", "e1", "e2"])
    store.append(["k"], ["p"], np.array([[0.1, 0.2, 0.3]]))
    assert np.allclose(store.read()[1], [[0.1, 0.2, 0.3]])
    assert list(pd.read_parquet(store.folder).columns) == ["key", "path", "embedding"]


def test_different_identities_never_mix(tmp_path: Path) -> None:
    _store(tmp_path).append(["k"], ["p"], np.ones((1, 2)))
    other = {**IDENTITY, "schema_version": 2}
    assert _store(tmp_path, other).keys() == set()
    assert len(list_stores(tmp_path)) == 2
    with pytest.raises(PosterFusionError, match="no detectors features"):
        find_store(tmp_path, "detectors", {**IDENTITY, "schema_version": 3})


def test_duplicates_and_leftover_temp_files_are_harmless(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append(["k"], ["p"], np.ones((1, 2)))
    store.append(["k"], ["moved/p"], np.ones((1, 2)))
    (store.folder / ".part-killed.parquet.tmp").write_bytes(b"half a file")
    reopened = _store(tmp_path)
    assert reopened.read()[0] == ["k"]
    assert not list(store.folder.glob(".*.tmp"))


def test_compaction_keeps_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "COMPACT_AFTER", 3)
    store = _store(tmp_path)
    for i in range(5):
        store.append([f"k{i}"], [f"p{i}"], np.full((1, 2), i))
    store.compact()
    assert len(store.parts()) == 1
    keys, values = store.read()
    assert sorted(keys) == [f"k{i}" for i in range(5)] and values.sum() == 2 * sum(range(5))


def test_describe_reports_posters_identity_and_columns(tmp_path: Path) -> None:
    _store(tmp_path).append(["k1", "k2"], ["p1", "p2"], np.zeros((2, 2)))
    report = describe_cache(tmp_path)
    assert report["posters"] == 2 and report["detectors"] == IDENTITY and report["columns"] == COLUMNS


def test_missing_cache_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PosterFusionError, match="no such cache folder"):
        describe_cache(tmp_path / "nope")


def test_opening_a_store_keeps_the_temporary_files_of_live_writers(tmp_path: Path) -> None:
    store = _store(tmp_path)
    in_flight = temp_name(store.folder / "part-9.parquet")  # this process is alive: another builder
    in_flight.write_bytes(b"half a part")
    _store(tmp_path)
    assert in_flight.exists()


def test_a_reader_finds_every_row_when_compaction_removes_parts_it_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, compactor = _store(tmp_path), _store(tmp_path)
    for i in range(4):
        compactor.append([f"k{i}"], [f"p{i}"], np.full((1, 2), i))
    listed = reader.parts()
    compactor.compact(force=True)  # another process, between the reader's listing and its reading
    real_parts = FeatureStore.parts
    answers = iter([listed])
    monkeypatch.setattr(FeatureStore, "parts", lambda self: next(answers, None) or real_parts(self))
    keys, values = reader.read()
    assert sorted(keys) == [f"k{i}" for i in range(4)] and values.sum() == 2 * sum(range(4))


def test_compaction_stores_each_key_once_keeping_the_last_copy(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append(["k", "j"], ["p", "q"], np.zeros((2, 2)))
    store.append(["k"], ["moved/p"], np.ones((1, 2)))
    store.compact(force=True)
    (part,) = store.parts()
    table = pd.read_parquet(part)
    assert sorted(table["key"]) == ["j", "k"]
    assert table.set_index("key").loc["k", "path"] == "moved/p"


def test_compaction_waits_its_turn_and_never_touches_a_read_only_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "COMPACT_AFTER", 2)
    store = _store(tmp_path)
    for i in range(3):
        store.append([f"k{i}"], [f"p{i}"], np.zeros((1, 2)))
    before = store.parts()
    with open(store.folder / cache_module.LOCK_FILE, "a+b") as other:  # another process compacting
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        store.compact()
        assert store.parts() == before
    store.compact()
    assert len(store.parts()) == 1
    single = _store(tmp_path / "other")
    single.append(["k"], ["p"], np.zeros((1, 2)))
    single.compact()  # too few parts: not even the lock file is made
    assert not (single.folder / cache_module.LOCK_FILE).exists()


def test_a_cache_that_cannot_be_created_is_a_one_line_error(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(PosterFusionError, match=f"^{a_file}/cache: cannot create a cache store there"):
        _store(a_file / "cache")
