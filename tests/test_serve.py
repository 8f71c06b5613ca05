"""`fusion serve`: the JSON API with real multipart requests over a socket (good and bad uploads),
and the page in a real browser (headless Chromium driven by Selenium)."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from conftest import TinyModel, share_models
from PIL import Image

from posterfusion.serve import Limits, create_app, status_for

MAX_FILES = 3
MAX_BYTES = 2 * 2**20


@pytest.mark.parametrize("reason, status", [
    ("empty file (0 bytes)", 400),
    ("not an image (unrecognised format)", 415),
    ("image too large (20000x20000 pixels, limit 80,000,000): possible decompression bomb", 413),
    ("cannot decode: truncated file (image data ends early)", 422),
])
def test_each_decoder_refusal_has_its_status(reason: str, status: int) -> None:
    assert status_for(reason) == status


@pytest.fixture(scope="module")
def predictor(tiny_model: TinyModel):
    from posterfusion.predict import Predictor

    with pytest.MonkeyPatch.context() as patch:
        share_models(patch)
        return Predictor(tiny_model.model, "cpu")


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free localhost port in this process."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server(predictor) -> Iterator[str]:
    """The app with the tiny model."""
    with running(create_app(predictor, Limits(MAX_FILES, MAX_BYTES))) as url:
        yield url


def post(server: str, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return httpx.post(f"{server}/predict", files=[("files", (name, data)) for name, data in files], params=params, timeout=300)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_api_predicts_real_posters_with_the_fields_of_predict_json(server: str, tiny_model: TinyModel) -> None:
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["genres"]
    posters = tiny_model.posters[:2]
    answer = post(server, [("first poster.jpg", posters[0].read_bytes()), ("second.jpg", posters[1].read_bytes())])
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["poster"] for r in results] == ["first poster.jpg", "second.jpg"]  # the names sent, in order
    for r in results:
        assert {"poster", "genres", "top", "probabilities", "evidence", "error"} <= set(r)
        assert r["error"] is None and r["genres"] and set(r["probabilities"]) == set(health["genres"])
        assert "objects" in r["evidence"] and "read" in r["evidence"] and "explanation" in r["evidence"]
        header, data = r["annotated"].split(",", 1)
        assert header == "data:image/png;base64"
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert picture.format == "PNG" and picture.height >= 560 and picture.width > 1000
    plain = post(server, [("p.jpg", posters[0].read_bytes())], annotate="false").json()["results"][0]
    assert "annotated" not in plain and "explanation" not in plain["evidence"]  # what predict --json prints
    # the same poster alone instead of in a batch of two: equal but for float rounding in batched kernels
    assert plain["probabilities"] == pytest.approx(results[0]["probabilities"], abs=1e-5)


def bomb(side: int) -> bytes:
    """A ``side`` x ``side`` PNG of a few kB: decoded, 81 or 100 megapixels (243 or 300 MB as RGB)."""
    return png_bytes(Image.new("1", (side, side)))


@pytest.mark.slow
@pytest.mark.parametrize("files, status, reason", [
    ([("notes.txt", b"these are my notes, not a poster\n")], 415, "notes.txt: not an image"),
    ([("empty.jpg", b"")], 400, "empty.jpg: empty file"),
    ([("huge.png", b"\x89PNG" + bytes(MAX_BYTES))], 413, "huge.png: file too large"),
    ([("bomb.png", 9_000)], 413, "bomb.png: image too large"),  # over posterfusion's own limit
    ([("bomb.png", 10_000)], 413, "bomb.png: cannot decode: Image size (100000000 pixels)"),  # over PIL's too
    ([("cut.jpg", "truncated")], 422, "cut.jpg: cannot decode"),
    ([("a.jpg", "poster")] * (MAX_FILES + 1), 413, f"too many files: {MAX_FILES + 1}, at most {MAX_FILES}"),
    ([("a.jpg", b"x")] * (MAX_FILES + 5), 413, f"too many files: over {MAX_FILES + 1}, at most {MAX_FILES}"),  # stopped by the parser, before reading them all
    ([("good.jpg", "poster"), ("bad.gif", b"GIF89a nonsense")], 415, "bad.gif: not an image"),
])
def test_bad_uploads_get_a_4xx_with_the_reason(server: str, tiny_model: TinyModel, files, status: int, reason: str) -> None:
    real = tiny_model.posters[0].read_bytes()
    made = {"truncated": real[: len(real) // 2], "poster": real, 9_000: bomb(9_000), 10_000: bomb(10_000)}
    answer = post(server, [(name, data if isinstance(data, bytes) else made[data]) for name, data in files])
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200  # still up


@pytest.mark.slow
def test_requests_that_are_not_poster_uploads_get_a_4xx(server: str) -> None:
    assert httpx.post(f"{server}/predict", json={"files": []}).status_code == 400
    no_files = httpx.post(f"{server}/predict", files={"other": ("x.jpg", b"data")})
    assert no_files.status_code == 400 and "no files" in no_files.json()["detail"]
    text_field = httpx.post(f"{server}/predict", data={"files": "poster.jpg"}, files={"x": ("x", b"")})
    assert text_field.status_code == 400 and "must hold files" in text_field.json()["detail"]
    too_big = httpx.post(f"{server}/predict", content=b"x" * (MAX_FILES * MAX_BYTES + 2**21),
                         headers={"content-type": "multipart/form-data; boundary=x"})
    assert too_big.status_code == 413 and "request too large" in too_big.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b"--x\r\n"

    chunked = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]


@pytest.mark.slow
def test_uploads_are_written_only_to_a_temporary_folder_that_goes(server: str, tiny_model: TinyModel, tmp_path: Path) -> None:
    escape = Path(tempfile.gettempdir()).parent / "posterfusion-escaped.jpg"
    before = {p.name for p in Path(tempfile.gettempdir()).glob("posterfusion-upload-*")}
    answer = post(server, [(f"../../../../{escape}", tiny_model.posters[0].read_bytes())], annotate="false")
    assert answer.status_code == 200 and answer.json()["results"][0]["poster"] == f"../../../../{escape}"
    assert not escape.exists()
    assert {p.name for p in Path(tempfile.gettempdir()).glob("posterfusion-upload-*")} == before


# --- the page, in a real browser ----------------------------------------------------------------


@pytest.mark.slow
def test_the_page_shows_genres_and_the_annotated_poster_and_errors(server: str, browser, tiny_model: TinyModel, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    genres = httpx.get(f"{server}/health").json()["genres"]
    browser.get(f"{server}/")
    assert "posterfusion" in browser.title
    poster = tiny_model.posters[1]
    browser.find_element(By.ID, "files").send_keys(str(poster))
    wait = WebDriverWait(browser, 300)
    card = wait.until(lambda b: next(iter(b.find_elements(By.CSS_SELECTOR, ".result:has(img.annotated)")), None))
    assert card.find_element(By.TAG_NAME, "h2").text == poster.name
    shown = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".genres .genre")]
    assert shown and set(shown) <= set(genres)
    assert any(g in card.find_element(By.CSS_SELECTOR, ".probabilities").text for g in shown)
    assert "saw:" in card.find_element(By.CSS_SELECTOR, ".evidence").text
    image = card.find_element(By.CSS_SELECTOR, "img.annotated")
    wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 1000

    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a poster\n")
    browser.find_element(By.ID, "files").send_keys(str(notes))
    error = wait.until(lambda b: next(iter(b.find_elements(By.CSS_SELECTOR, ".result.failed .error")), None))
    assert "notes.txt: not an image" in error.text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".result")) == 2  # the poster's result stays


# --- under load: a bounded queue, deadlines, disconnected clients -------------------------------


@pytest.fixture
def gated(predictor):
    """The app admitting one request at a time, each waiting at most 1 s for the model, and its gate."""
    app = create_app(predictor, Limits(MAX_FILES, MAX_BYTES, queue=1, timeout=1.0))
    with running(app) as url:
        yield url, app.state.gate


def _post_in_background(url: str, poster: Path, timeout: float = 60) -> dict:
    """POST ``poster`` from a thread; the dict gets its response (or the exception) when it ends."""
    answer: dict = {}

    def send() -> None:
        try:
            answer["response"] = httpx.post(f"{url}/predict?annotate=false", files={"files": (poster.name, poster.read_bytes())},
                                            timeout=timeout)
        except httpx.HTTPError as exc:
            answer["error"] = exc

    answer["thread"] = threading.Thread(target=send, daemon=True)
    answer["thread"].start()
    return answer


def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_full_queue_is_answered_503_with_retry_after_and_health_stays_answered(gated, tiny_model: TinyModel) -> None:
    url, gate = gated
    poster = tiny_model.posters[0]
    gate._model.acquire()  # the model is busy
    try:
        first = _post_in_background(url, poster)
        _until(lambda: gate.admitted == 1)
        refused = httpx.post(f"{url}/predict", files={"files": (poster.name, poster.read_bytes())}, timeout=10)
        assert refused.status_code == 503 and refused.json()["detail"].startswith("busy: 1 requests admitted")
        assert int(refused.headers["Retry-After"]) >= 1
        started = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert time.monotonic() - started < 2 and health["admitted"] == 1 and health["queue"] == 1
    finally:
        gate._model.release()
    first["thread"].join(60)
    assert first["response"].status_code == 200, first
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["admitted"] == 0 and health["answered_last_minute"] >= 1 and health["latency_s"]["p50"] is not None


@pytest.mark.slow
def test_a_request_past_its_deadline_is_answered_503(gated, tiny_model: TinyModel) -> None:
    url, gate = gated
    gate._model.acquire()
    try:
        answer = _post_in_background(url, tiny_model.posters[0])
        answer["thread"].join(30)  # the deadline is 1 s
    finally:
        gate._model.release()
    response = answer["response"]
    assert response.status_code == 503 and "waited over 1 s" in response.json()["detail"]
    assert gate.refused["timed out"] == 1
    assert "Retry-After" in response.headers


@pytest.mark.slow
def test_a_client_gone_before_its_turn_is_not_computed(gated, predictor, tiny_model: TinyModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, gate = gated
    computed = []
    real = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **k: computed.append(1) or real(*a, **k))
    gate._model.acquire()
    try:
        answer = _post_in_background(url, tiny_model.posters[0], timeout=0.5)  # gives up while waiting
        answer["thread"].join(30)
        assert isinstance(answer.get("error"), httpx.TimeoutException)
        time.sleep(0.2)  # the server learns of the closed connection (well within the 1 s deadline)
    finally:
        gate._model.release()
    _until(lambda: gate.admitted == 0)
    assert computed == [] and gate.refused["disconnected"] == 1 and not gate.refused["timed out"]


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits(tiny_model: TinyModel) -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).with_name("fusion")
    command = [str(script)] if script.is_file() else [sys.executable, "-c", "from posterfusion.cli import fusion_app; fusion_app()"]
    process = subprocess.Popen(command + ["serve", "--model", str(tiny_model.model), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _until(up, timeout=120)
        poster = tiny_model.posters[1]
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{url}/predict", files={"files": (poster.name, poster.read_bytes())}, timeout=120)), daemon=True)
        thread.start()
        _until(lambda: httpx.get(f"{url}/health", timeout=5).json()["admitted"] == 1)  # annotating: seconds of work
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert answer["r"].status_code == 200 and answer["r"].json()["results"][0]["genres"]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_requests_waiting_together_share_a_batch_and_get_their_own_answers(predictor, tiny_model: TinyModel) -> None:
    app = create_app(predictor, Limits(MAX_FILES, MAX_BYTES, queue=4, timeout=60))
    gate = app.state.gate
    posters = [tiny_model.posters[0], tiny_model.posters[2], tiny_model.posters[3]]
    with running(app) as url:
        gate._model.acquire()  # busy: the next requests wait together
        try:
            one = _post_in_background(url, posters[0])
            two: dict = {}

            def send_two() -> None:
                files = [("files", (p.name, p.read_bytes())) for p in posters[1:]]
                two["response"] = httpx.post(f"{url}/predict?annotate=false", files=files, timeout=60)

            thread = threading.Thread(target=send_two, daemon=True)
            thread.start()
            _until(lambda: len(gate._pending) == 2)
        finally:
            gate._model.release()
        one["thread"].join(60)
        thread.join(60)
    assert list(gate.batches) == [2]  # one forward pass for both requests
    got = one["response"].json()["results"] + two["response"].json()["results"]
    assert [r["poster"] for r in got] == [p.name for p in posters]
    expected = predictor.predict([str(p) for p in posters])
    for record, prediction in zip(got, expected):
        assert record["genres"] == prediction.genres
        assert record["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-6)
