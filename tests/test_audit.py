"""`fusion audit`: labels the posters contradict and genres they show that the records lack, found,
explained, written resumably and shown on a page that opens in a real browser.

The model is the session's tiny one (conftest ``tiny_model``): its probabilities mean little, so
the tests set its thresholds around them, which makes a chosen label wrong and a chosen genre
missing by construction.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TinyModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import assert_one_line_error, kill_when
from posterfusion.audit import EVIDENCE_MIN, MISSING, NOT_CONVEYED, finding_scores, findings_mask, read_audits
from posterfusion.cli import fusion_app

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return CliRunner().invoke(fusion_app, [str(a) for a in args], catch_exceptions=False)


def test_scores_are_bits_and_findings_need_enough_of_them() -> None:
    probabilities = np.array([[0.05, 0.8, 0.3, 0.45, 0.6]])
    labelled = np.array([[True, False, True, False, False]])
    thresholds = np.array([0.2, 0.2, 0.3, 0.3, 0.7])
    scores = finding_scores(probabilities, labelled, thresholds)
    # a label at 1/4 of its threshold; a genre at 4 to 1; a label at its threshold; below even odds; 3 to 2
    np.testing.assert_allclose(scores, [[2.0, 2.0, 0.0, np.log2(0.45 / 0.55), np.log2(1.5)]])
    # the last is above even odds but below its threshold: predict would not give it, so no finding
    assert findings_mask(probabilities, labelled, thresholds).tolist() == [[True, True, False, False, False]]


@pytest.fixture(scope="module")
def planted(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory, shared_models_module) -> dict:
    """A copy of the tiny model whose thresholds make one label of poster 0 wrong (at a quarter of
    its threshold) and one label of poster 1 right, with one genre near certain on every poster
    (missing where unlabelled), and a manifest of those two posters labelled accordingly."""
    from posterfusion.predict import Predictor

    root = tmp_path_factory.mktemp("planted")
    model = root / "model"
    shutil.copytree(tiny_model.model, model)
    cache = root / "cache"
    shutil.copytree(tiny_model.cache, cache)
    posters = [str(p) for p in tiny_model.posters[:2]]
    predictor = Predictor(model, words=False)  # the tests audit with --no-words: the head, whose logits they move
    genres = predictor.genres
    p = np.array([[q.probabilities[g] for g in genres] for q in predictor.predict(posters, cache)])  # the head alone
    wrong = int(p[0].argmin())
    missing = int(np.argmax(np.where(np.arange(len(genres)) == wrong, -1, p[1])))
    right = next(i for i in np.argsort(p[1]) if i not in (wrong, missing))
    card = json.loads((model / "card.json").read_text())
    thresholds = np.full(len(genres), 0.999)  # nothing else is missing...
    thresholds[wrong] = min(0.999, 4 * p[0, wrong])
    thresholds[right] = p[1, right] / 1.5  # ...and a label just above its threshold is no finding
    thresholds[missing] = 0.5
    card["thresholds"] = thresholds.tolist()
    if card.get("words"):
        card["words"]["head_thresholds"] = thresholds.tolist()
    (model / "card.json").write_text(json.dumps(card))
    # The missing genre made near certain on every poster: each head's output bias for it raised.
    weights = load_file(str(model / "model.safetensors"))
    for key in [k for k in weights if k.endswith("classifier.4.bias")]:
        weights[key][missing] += 8.0
    save_file(weights, str(model / "model.safetensors"))
    manifest = root / "catalogue.csv"
    pd.DataFrame({"poster": posters,
                  "genres": [genres[wrong], f"{genres[right]}|Zombie Western"],
                  "title": ["", ""]}).to_csv(manifest, index=False)
    return {"model": model, "cache": cache, "manifest": manifest, "posters": posters,
            "wrong": genres[wrong], "missing": genres[missing], "right": genres[right], "root": root}


@pytest.fixture(scope="module")
def shared_models_module(frozen_models):
    from conftest import share_models

    with pytest.MonkeyPatch.context() as patch:
        share_models(patch)
        yield frozen_models


@pytest.mark.slow
def test_a_wrong_label_and_a_missing_genre_are_found_and_explained(planted: dict, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    result = invoke("audit", planted["manifest"], "--no-words", "--model", planted["model"], "--cache", planted["cache"], "--out", out)
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    wrong = [f for f in first["findings"] if f["kind"] == NOT_CONVEYED]
    assert [f["genre"] for f in wrong] == [planted["wrong"]] and wrong[0]["score"] == pytest.approx(2.0, abs=1e-3)
    kinds = {(f["kind"], f["genre"]) for f in second["findings"]}
    assert (MISSING, planted["missing"]) in kinds
    assert (NOT_CONVEYED, planted["right"]) not in kinds  # 1.5x over its threshold: conveyed
    evidence = [e for f in first["findings"] + second["findings"] for e in f["evidence"]]
    assert evidence and all(isinstance(name, str) and abs(change) >= EVIDENCE_MIN for name, change in evidence)
    assert "read" in first["evidence"] and "faces" in first["evidence"]  # what was seen and read
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("2 posters audited: 1 labelled genres not conveyed") and "0 skipped" in summary


@pytest.mark.slow
def test_unknown_genres_are_said_once_and_left_out(planted: dict, tmp_path: Path) -> None:
    result = invoke("audit", planted["manifest"], "--no-words", "--model", planted["model"], "--cache", planted["cache"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "Zombie Western" in line]
    assert said == [f"{planted['manifest']}: genres the model does not know, left out: Zombie Western (1 posters)"]
    assert f"{planted['posters'][0]}: labelled {planted['wrong']};" in result.stdout  # findings printed
    assert "Zombie" not in result.stdout


@pytest.mark.slow
def test_an_unreadable_poster_is_reported_and_the_rest_audited(planted: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    manifest = tmp_path / "catalogue.csv"
    table = pd.read_csv(planted["manifest"])
    pd.concat([table, pd.DataFrame({"poster": [str(broken)], "genres": ["Drama"]})]).to_csv(manifest, index=False)
    out, report = tmp_path / "audit.csv", tmp_path / "audit.html"
    result = invoke("audit", manifest, "--no-words", "--model", planted["model"], "--cache", planted["cache"], "--out", out,
                    "--report", report)
    assert result.exit_code == 0, result.output
    reports = [line for line in result.stderr.splitlines() if "skipped: " in line]
    assert len(reports) == 1 and reports[0].startswith(f"{broken}: skipped: ")
    assert result.stderr.splitlines()[-1].endswith(f"1 skipped -> {out} (0 already there)")
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert rows["poster"].tolist() == planted["posters"] + [str(broken)]
    assert rows["error"].iloc[2] and not rows["error"].iloc[0]
    assert "broken.jpg" in report.read_text() and 'id="unreadable"' in report.read_text()


def test_an_unlabelled_manifest_is_a_one_line_error(tmp_path: Path, tiny_model: TinyModel) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"poster\n{tiny_model.posters[0]}\n")
    assert_one_line_error(invoke("audit", manifest, "--model", tiny_model.model), "list.csv", "no 'genres' column")
    assert_one_line_error(invoke("audit", tmp_path / "none.csv"), "none.csv", "no such manifest")


def _fusion(*args: object) -> list[str]:
    script = Path(sys.executable).with_name("fusion")
    prefix = [str(script)] if script.is_file() else [sys.executable, "-c", "from posterfusion.cli import fusion_app; fusion_app()"]
    return prefix + [str(a) for a in args]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_killed_audit_resumed_has_every_poster_once(suffix: str, tiny_model: TinyModel, tmp_path: Path,
                                                      shared_models) -> None:
    cache = tmp_path / "cache"  # empty: computing the features (OCR too) leaves time to kill the run
    out = tmp_path / f"audit{suffix}"

    def written() -> int:
        if suffix == ".parquet":
            return 2 * len(list(out.with_name(out.name + ".parts").glob("part-*.parquet")))
        return len(out.read_text().splitlines()) if out.exists() else 0

    kill_when(_fusion("audit", tiny_model.manifest, "--model", tiny_model.model, "--cache", cache, "--out", out,
                      "--batch-size", 2), REPO, lambda: written() >= 4)
    before = written()
    assert 4 <= before < len(tiny_model.posters)

    report = tmp_path / "audit.html"
    result = invoke("audit", tiny_model.manifest, "--model", tiny_model.model, "--cache", cache, "--out", out,
                    "--report", report)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1].endswith(f"({before} already there)")
    got = [a.path for a in read_audits(out)]
    assert sorted(got) == sorted(str(p) for p in tiny_model.posters) and len(got) == len(set(got))
    page = report.read_text()
    assert f"{len(tiny_model.posters)} posters checked" in page  # the earlier run's posters count too


@pytest.mark.slow
def test_a_catalogue_imported_from_genre_folders_is_audited(tiny_model: TinyModel, tmp_path: Path,
                                                            shared_models) -> None:
    """The folder-of-posters layout (one sub-folder per genre) through `fusion manifest import`."""
    labels = pd.read_csv(tiny_model.manifest, dtype=str, keep_default_na=False)
    for poster, genres in zip(tiny_model.posters[:6], labels["genres"][:6]):
        for genre in genres.split("|"):
            (tmp_path / "folders" / genre).mkdir(parents=True, exist_ok=True)
            shutil.copy(poster, tmp_path / "folders" / genre / poster.name)
    manifest = tmp_path / "catalogue.csv"
    imported = invoke("manifest", "import", "folders", tmp_path / "folders", "--out", manifest)
    assert imported.exit_code == 0, imported.output
    out = tmp_path / "audit.csv"
    result = invoke("audit", manifest, "--model", tiny_model.model, "--out", out, "--no-words")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(rows) == 6 and not rows["error"].any()
    truth = {poster.name: set(genres.split("|")) for poster, genres in zip(tiny_model.posters[:6], labels["genres"][:6])}
    assert all(set(r.split("|")) <= truth[Path(p).name] for p, r in zip(rows["poster"], rows["labelled"]))


@pytest.mark.slow
def test_the_report_opens_in_a_browser_with_its_table_and_pictures(planted: dict, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    report = tmp_path / "audit.html"
    result = invoke("audit", planted["manifest"], "--no-words", "--model", planted["model"], "--cache", planted["cache"],
                    "--report", report)
    assert result.exit_code == 0, result.output
    browser.get(report.as_uri())
    assert "posterfusion audit" in browser.title
    wrong = browser.find_element(By.CSS_SELECTOR, f'#summary tr[data-genre="{planted["wrong"]}"] td[data-key="not_conveyed"]')
    assert wrong.text == "1"
    blocks = browser.find_elements(By.CSS_SELECTOR, ".finding")
    assert {b.get_attribute("data-kind") for b in blocks} == {NOT_CONVEYED, MISSING}
    assert planted["wrong"] in browser.find_element(By.CSS_SELECTOR, '.finding[data-kind="not conveyed"]').text
    for image in browser.find_elements(By.CSS_SELECTOR, ".finding img"):
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    assert not re.search(r'(src|href)="(?!data:)', report.read_text())  # nothing fetched from elsewhere
