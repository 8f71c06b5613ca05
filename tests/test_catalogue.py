"""`fusion predict` at catalogue scale: results streamed per batch, resumable ``--out`` files,
``--manifest`` lists (CSV, text, standard input), progress, and the pieces underneath (the lazy
folder walk, cached rows read a row group at a time, a torn last line cut on resume).

A small model is trained once on synthetic posters (its numbers mean nothing; the plumbing is
what is tested); the killed-run and pipe tests run ``fusion predict`` in a child process, as a
user would, and the last one checks the streamed path against cached features of real posters.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import share_models
from typer.testing import CliRunner

from helpers import assert_one_line_error, write_poster
from posterfusion.cli import fusion_app
from posterfusion.predict import Prediction, Predictor

REPO = Path(__file__).resolve().parents[1]
GENRES = ["Drama", "Comedy|Drama", "Horror"]


def invoke(*args: object, input: str | None = None):
    return CliRunner().invoke(fusion_app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, frozen_models) -> Path:
    """A fusion model trained for two epochs on 30 synthetic posters: real models, made-up genres."""
    root = tmp_path_factory.mktemp("tiny")
    rows = ["poster,genres"]
    for i in range(30):
        write_poster(root / "img" / f"t{i:02d}.jpg", seed=100 + i)
        rows.append(f"img/t{i:02d}.jpg,{GENRES[i % 3]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "config.yaml").write_text("min_genre_posters: 2\noptim:\n  epochs: 2\n  ensemble: 1\n")
    with pytest.MonkeyPatch.context() as mp:
        share_models(mp)
        result = invoke("train", "--manifest", root / "train.csv", "--cache", root / "cache",
                        "--config", root / "config.yaml", "--out", root / "model")
    assert result.exit_code == 0, result.output
    return root / "model"


@pytest.fixture
def catalogue(tmp_path: Path) -> list[str]:
    """Paths of 13 synthetic posters with an unreadable file among them (the 6th)."""
    paths = [str(write_poster(tmp_path / "cat" / f"c{i:02d}.jpg", seed=i)) for i in range(12)]
    broken = tmp_path / "cat" / "c05b.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths[:6] + [str(broken)] + paths[6:]


def posters_in(out: Path) -> list[str]:
    """The poster column of a results file, every row."""
    if out.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(out.read_text())))
        assert rows[0][0] == "poster" and all(r[0] != "poster" for r in rows[1:])  # one header
        return [r[0] for r in rows[1:]]
    if out.suffix == ".jsonl":
        return [json.loads(line)["poster"] for line in out.read_text().splitlines()]
    return pd.read_parquet(out)["poster"].tolist()


# --- the library: one stream, the list built on it ------------------------------------------------


def test_stream_gives_batches_in_input_order_as_predict_does(tiny_model: Path, catalogue: list[str],
                                                             shared_models, tmp_path: Path) -> None:
    predictor = Predictor(tiny_model, "cpu")
    batches = list(predictor.stream(iter(catalogue + catalogue[:2]), batch_size=3))  # a lazy input, a repeat
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3]
    flat = [p for b in batches for p in b]
    assert [p.path for p in flat] == catalogue + catalogue[:2]
    assert flat[6].error and not flat[6].probabilities and all(not p.error for i, p in enumerate(flat) if i != 6)
    assert flat[13].probabilities == pytest.approx(flat[0].probabilities, abs=1e-5)  # the repeat, computed again

    listed = predictor.predict(catalogue, batch_size=3)
    assert [p.path for p in listed] == catalogue
    for a, b in zip(listed, flat):
        assert a.genres == b.genres and a.error == b.error
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)

    # Through a cache: the first run computes and stores, the second reads every row back.
    cache = tmp_path / "cache"
    computed = predictor.predict(catalogue, cache, batch_size=3)
    read = predictor.predict(catalogue, cache, batch_size=3)
    for a, b, c in zip(listed, computed, read):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5) == c.probabilities
        assert a.evidence == b.evidence == c.evidence


def _store_in_parts(tmp_path: Path, monkeypatch):
    """30 rows in three parts of row groups of 4, with notes; k03 stored again later (the last copy
    wins). Returns the store, its keys and the values each key must read back."""
    from posterfusion import cache as cache_module
    from posterfusion.cache import FeatureStore

    monkeypatch.setattr(cache_module, "ROW_GROUP_BYTES", 4 * 3 * 4)  # 4 rows of 3 float32
    values = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    keys = [f"k{i:02d}" for i in range(30)]
    store = FeatureStore.open(tmp_path, "backbone", {"name": "test"}, ["a", "b", "c"])
    for lo in range(0, 30, 10):
        store.append(keys[lo:lo + 10], keys[lo:lo + 10], values[lo:lo + 10], [f"note {k}" for k in keys[lo:lo + 10]])
    store.append(["k03"], ["k03"], values[:1] + 1, ["newer"])
    expected = values.copy()
    expected[3] = values[0] + 1
    return store, keys, expected


def _count_decodes(store, monkeypatch) -> list[int]:
    """A counter of the row groups a lookup decodes (each goes through ``store.values`` once)."""
    decoded = [0]
    values = store.values

    def counting(table):
        decoded[0] += 1
        return values(table)

    monkeypatch.setattr(store, "values", counting)
    return decoded


def test_cached_rows_come_back_in_any_order_each_row_group_decoded_once_per_call(tmp_path: Path, monkeypatch) -> None:
    from posterfusion.cache import StoreLookup

    store, keys, expected = _store_in_parts(tmp_path, monkeypatch)
    decoded = _count_decodes(store, monkeypatch)
    lookup = StoreLookup(store, memory_bytes=2 * 4 * 3 * 4)  # two decoded row groups of 4 rows x 3 floats
    store.compact(force=True)  # the indexed parts are gone (another process's compaction)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(store.parts()[0]).num_row_groups == 8  # 30 rows in groups of 4

    order = np.random.default_rng(1).permutation(30)
    got, notes = lookup.rows([keys[i] for i in order])
    assert np.array_equal(got, expected[order])
    assert notes == ["newer" if i == 3 else f"note k{i:02d}" for i in order]
    # every row group indexed once, though only two fit in memory at a time (the lookup still holds
    # the parts it indexed open: 3 of 3 groups and 1 of 1, all read)
    assert decoded[0] == len({(part, group) for part, group, _ in lookup.where.values()}) == 10
    assert 0 < lookup.held <= lookup.memory_bytes


def test_an_unbounded_lookup_decodes_each_row_group_once_across_calls(tmp_path: Path, monkeypatch) -> None:
    from posterfusion.cache import StoreLookup

    store, keys, expected = _store_in_parts(tmp_path, monkeypatch)
    store.compact(force=True)
    decoded = _count_decodes(store, monkeypatch)
    lookup = StoreLookup(store, memory_bytes=None)
    order = np.random.default_rng(2).permutation(30)
    for lo in range(0, 30, 5):  # batches in shuffled order, as gather() asks for them
        got, _ = lookup.rows([keys[i] for i in order[lo:lo + 5]])
        assert np.array_equal(got, expected[order[lo:lo + 5]])
    assert decoded[0] == 8
    store.append(["late"], ["late"], np.full((1, 3), 7, np.float32), ["stored after the index"])
    got, notes = lookup.rows(["k05", "late"])  # an unknown key: the lookup indexes the store again
    assert np.array_equal(got, np.stack([expected[5], np.full(3, 7, np.float32)]))
    assert notes == ["note k05", "stored after the index"]


# --- inputs ---------------------------------------------------------------------------------------


def test_folders_are_walked_lazily_in_sorted_order(tmp_path: Path) -> None:
    from posterfusion.manifest import walk_images

    for name in ("b.jpg", "a/z.png", "a.jpg", "a/b/c.JPG", "notes.txt", "c/d.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image's name is not an image
    (tmp_path / "c" / "loop").symlink_to(tmp_path)  # a link loop is not followed
    walk = walk_images(tmp_path)
    assert next(walk) == tmp_path / "a" / "b" / "c.JPG"
    expected = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix.lower() in {".jpg", ".png", ".webp"})
    assert [tmp_path / "a" / "b" / "c.JPG", *walk] == expected


def test_manifest_csv_text_list_and_stdin(tiny_model: Path, catalogue: list[str], shared_models, tmp_path: Path,
                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p, tmp_path) for p in catalogue]
    (tmp_path / "list.txt").write_text("\n".join(relative[:4]) + "\n\n" + relative[4] + "\n")
    (tmp_path / "manifest.csv").write_text("title,poster\n" + "".join(f"t,{p}\n" for p in relative[:3]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "manifest.csv").write_text("poster\n" + "".join(f"../{p}\n" for p in relative[:2]))

    def posters(*args, input=None) -> list[str]:
        result = invoke("predict", *args, "--model", tiny_model, "--json", input=input)
        assert result.exit_code == 0, result.output
        return [json.loads(line)["poster"] for line in result.stdout.splitlines()]

    assert posters("--manifest", "list.txt") == relative[:5]  # relative to here, blank lines skipped
    here = Path.cwd().resolve()  # a manifest's paths are relative to its folder, resolved
    assert posters("--manifest", "manifest.csv") == [str(here / p) for p in relative[:3]]
    assert posters("--manifest", "sub/manifest.csv") == [str(here / "sub" / ".." / p) for p in relative[:2]]
    assert posters("--manifest", "-", input="\n".join(relative[5:8]) + "\n") == relative[5:8]
    assert posters(relative[0], "--manifest", "-", input=relative[1] + "\n") == relative[:2]  # both kinds
    assert_one_line_error(invoke("predict", "--manifest", "missing.txt", "--model", tiny_model), "missing.txt")
    assert_one_line_error(invoke("predict", "--manifest", "-", "--model", tiny_model, input=""), "no posters given")


# --- outputs --------------------------------------------------------------------------------------


def test_unreadable_posters_keep_their_one_line_report(tiny_model: Path, catalogue: list[str], shared_models,
                                                       tmp_path: Path) -> None:
    broken = catalogue[6]
    for args in ([], ["--csv"], ["--json"], ["--out", tmp_path / "out.csv"]):
        result = invoke("predict", *catalogue, "--model", tiny_model, "--batch-size", 4, *args)
        assert result.exit_code == 0, result.output
        lines = result.stderr.splitlines()
        reports = [line for line in lines if "skipped: " in line]
        assert len(reports) == 1 and reports[0].startswith(f"{broken}: skipped: "), result.stderr
        assert lines[-1].startswith("12 posters predicted, 1 skipped")
        assert "━" not in result.stderr  # no bar: stderr is not a terminal
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert [r["poster"] for r in rows] == catalogue and rows[6]["error"] and not rows[6]["genres"]


def test_progress_bar_when_asked(tiny_model: Path, catalogue: list[str], shared_models) -> None:
    result = invoke("predict", *catalogue, "--model", tiny_model, "--csv", "--progress")
    assert result.exit_code == 0, result.output
    assert "predict" in result.stderr and "13/13" in result.stderr and "posters/s" in result.stderr
    assert len(list(csv.reader(io.StringIO(result.stdout)))) == 14  # the bar is on stderr only


def test_a_torn_last_line_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    from posterfusion.outputs import LineResults, PredictionLayout

    out = tmp_path / "out.csv"
    header = ",".join(PredictionLayout(["Drama", "Horror"]).header())
    out.write_text(f"{header}\na.jpg,Drama,0.9,0.1,\nb.jpg,Horror,0.2,0.8,\nc.jpg,Dra")
    results = LineResults(out, "csv", PredictionLayout(["Drama", "Horror"]))
    assert results.done == {"a.jpg", "b.jpg"}
    results.write([Prediction("c.jpg", ["Drama"], {"Drama": 0.7, "Horror": 0.3})])
    results.close()
    assert out.read_text() == f"{header}\na.jpg,Drama,0.9,0.1,\nb.jpg,Horror,0.2,0.8,\nc.jpg,Drama,0.7000,0.3000,\n"

    with pytest.raises(Exception, match="not this run's"):
        LineResults(out, "csv", PredictionLayout(["Comedy"]))
    jsonl = tmp_path / "out.jsonl"
    jsonl.write_text('{"poster": "a.jpg"}\n{"poster": "b.j')
    assert LineResults(jsonl, "jsonl", PredictionLayout(["Drama"])).done == {"a.jpg"}
    assert jsonl.read_text() == '{"poster": "a.jpg"}\n'


def test_out_is_checked_before_any_model_loads(catalogue: list[str], tmp_path: Path) -> None:
    none = tmp_path / "no-model"
    assert_one_line_error(invoke("predict", catalogue[0], "--out", tmp_path / "out.csv", "--csv", "--model", none), "--out")
    assert_one_line_error(invoke("predict", catalogue[0], "--out", tmp_path, "--model", none), "is a folder")
    assert_one_line_error(invoke("predict", catalogue[0], "--out", tmp_path / "out.txt", "--model", none), ".parquet")


def _fusion(*args: object) -> list[str]:
    script = Path(sys.executable).with_name("fusion")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-c", "from posterfusion.cli import fusion_app; fusion_app()"]
    return prefix + [str(a) for a in args]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_killed_run_resumed_has_every_poster_once(suffix: str, tiny_model: Path, tmp_path: Path,
                                                    shared_models) -> None:
    paths = [str(write_poster(tmp_path / "big" / f"p{i:02d}.jpg", seed=i, size=(60, 90))) for i in range(40)]
    (tmp_path / "big" / "p07b.jpg").write_bytes(b"GIF89a broken")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted((tmp_path / "big").iterdir())) + "\n")
    expected = listing.read_text().split()
    out = tmp_path / f"results{suffix}"

    def written() -> int:
        if suffix == ".parquet":
            return 2 * len(list(out.with_name(out.name + ".parts").glob("part-*.parquet")))
        return len(out.read_text().splitlines()) - (suffix == ".csv") if out.exists() else 0

    process = subprocess.Popen(_fusion("predict", "--manifest", listing, "--model", tiny_model, "--out", out,
                                       "--batch-size", 2), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while written() < 4:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no results within 300 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    before = written()
    assert 4 <= before < len(expected)

    result = invoke("predict", "--manifest", listing, "--model", tiny_model, "--out", out, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert "already there" in result.stderr.splitlines()[-1]
    got = posters_in(out)
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))  # every poster exactly once
    assert not out.with_name(out.name + ".parts").exists()
    again = invoke("predict", "--manifest", listing, "--model", tiny_model, "--out", out)
    assert again.stderr.splitlines()[-1].startswith("0 posters predicted, 0 skipped")
    assert posters_in(out) == got


def test_first_rows_come_while_the_run_goes_on(tiny_model: Path, catalogue: list[str]) -> None:
    """A pipe reader gets rows while the process still waits for more input: nothing is held back
    to the end of the run."""
    batch = 2
    paths = catalogue[:8] * 2  # 8 batches: more than the decoding worker and the models take ahead
    process = subprocess.Popen(_fusion("predict", "--manifest", "-", "--model", tiny_model, "--csv", "--batch-size", batch),
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        process.stdin.write("".join(p + "\n" for p in paths))  # some input, and the pipe left open
        process.stdin.flush()
        header, first = lines.get(timeout=300), lines.get(timeout=300)
        assert header.startswith("poster,genres,") and first.startswith(f"{paths[0]},")
        assert process.poll() is None  # still running: it cannot end before its input does
        process.stdin.write(catalogue[0] + "\n")
        process.stdin.close()
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    time.sleep(0.1)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert [line.split(",")[0] for line in [first, *rest]] == paths + [catalogue[0]]


# --- real posters -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_streamed_real_posters_match_their_cached_features(tiny_model: Path, real_cache, shared_models) -> None:
    """The features a streamed run computes are those the cache holds (read back by row group)."""
    predictor = Predictor(tiny_model, "cpu")
    paths = real_cache.paths[:24]
    computed = [p for batch in predictor.stream(iter(paths), batch_size=8) for p in batch]
    cached = predictor.predict(paths, real_cache.cache, batch_size=8)
    assert [p.path for p in computed] == [p.path for p in cached] == paths
    for a, b in zip(computed, cached):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)
        assert a.evidence == b.evidence
