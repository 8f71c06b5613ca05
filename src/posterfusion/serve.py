"""``fusion serve``: a local web page where people drop posters, and a JSON API for programs.

* ``GET /``: one self-contained page (no external scripts, styles or fonts, so it works offline);
  each poster dropped or picked is sent on its own to ``POST /predict`` and shown as it comes back:
  the annotated picture, the genres with their probabilities, what the detectors saw and read. A
  bad file shows the server's reason in its place.
* ``POST /predict``: multipart, one or many files in the field ``files``; answers
  ``{"results": [...]}`` with the records ``fusion predict --json`` prints, plus the explanation
  and the annotated picture as a PNG data URL (``?annotate=false``: the records alone, without the
  explanation's extra detector and CNN passes). Every upload is checked
  before the model runs; any bad one makes the whole request a 4xx whose ``detail`` names the
  file and the problem (400 empty or no files, 411 no Content-Length, 413 too large, too many
  files or a decompression bomb, 415 not an image, 422 an image that cannot be decoded). Never a
  500 for an upload.
* ``GET /health``: the model folder, its genres and the device, how many requests are admitted
  and the last minute's latency percentiles; answered at once however busy the model is.

The model is loaded once, when the app is made, and runs one batch at a time (a lock: the frozen
models are not thread-safe, and two batches at once would only share the same cores); the posters
of requests that wait together go through it as one batch, each request getting its own answer
(an annotated request goes alone, its drawing being per poster anyway). At most
``queue`` requests are admitted at once (computing or waiting); the next is answered 503 with
``Retry-After`` before its body is read, so memory stays bounded whatever the clients do (at most
``queue`` bodies of at most ``max_files`` x ``max_file_bytes``). A request that waited longer than
``timeout`` for the model is answered 503 instead of being computed for a client that has likely
gone, and one whose client has disconnected is not computed. Uploads are written only into a fresh
temporary folder per request, under their position, never their name, and removed when the answer
is sent.
"""

# No ``from __future__ import annotations``: FastAPI reads the route functions' annotations, and
# the types they name are imported inside create_app.
import base64
import collections
import io
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .images import IMAGE_SUFFIXES, BadImage, decode_bytes
from .predict import Predictor

if TYPE_CHECKING:
    import numpy as np
    from fastapi import FastAPI

MAX_FILES = 16
MAX_FILE_MB = 20
QUEUE = 4
"""Requests admitted at once by default: with 16 files of 20 MB each, at most ~1.3 GB of bodies."""
TIMEOUT = 60.0
"""Seconds a request may wait for the model by default before it is answered 503."""
MAX_BATCH = 16
"""Posters of requests waiting together that go through the models as one batch, at most."""
BATCH_WAIT = 0.005
"""Seconds the model waits for company before it starts a batch."""


@dataclass
class Job:
    """One request's checked uploads on their way through the model, and what came of them."""

    names: list[str]
    pixels: list
    paths: list[str]
    annotate: bool
    started: float
    records: list[dict] | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Limits:
    """What one request may carry, how many are admitted at once, and how long one may wait."""

    max_files: int = MAX_FILES
    max_file_bytes: int = MAX_FILE_MB * 2**20
    queue: int = QUEUE
    timeout: float = TIMEOUT
    max_batch: int = MAX_BATCH
    batch_wait: float = BATCH_WAIT


class Busy(Exception):
    """The server cannot take a request now: 503, with the seconds after which to retry."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Gate:
    """Admission and the one model: at most ``limits.queue`` requests in at once; those waiting
    together computed as one batch (up to ``limits.max_batch`` posters), each given up after
    waiting ``limits.timeout`` seconds or when its client has gone; the last minute's latencies."""

    WINDOW = 60.0

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.admitted = 0
        self.refused = collections.Counter()  # busy, timed out, disconnected: since the start
        self.batches: collections.deque[int] = collections.deque(maxlen=1000)  # requests per batch, latest
        self._pending: list[Job] = []  # admitted, waiting for the model, oldest first
        self._state = threading.Lock()  # admitted, pending, latencies
        self._model = threading.Lock()
        self._latencies: collections.deque[tuple[float, float]] = collections.deque()  # (answered at, seconds)

    def admit(self) -> None:
        """Take a place in the queue, or :class:`Busy` when there is none."""
        with self._state:
            full = self.admitted >= self.limits.queue
            if not full:
                self.admitted += 1
        if full:
            self.refused["busy"] += 1
            raise Busy(f"busy: {self.limits.queue} requests admitted, the most this server takes (--queue); "
                       "retry later", self.retry_after())

    def leave(self, started: float) -> None:
        with self._state:
            self.admitted -= 1
            now = time.monotonic()
            self._latencies.append((now, now - started))

    def run(self, job: Job, compute, gone=lambda: False) -> list[dict]:
        """``job``'s records, computed with the jobs that wait with it (``compute(jobs)`` fills in
        their records or errors), unless it has waited past its deadline or ``gone()`` (its client
        disconnected). Whichever waiting request gets the model computes a batch for all."""
        with self._state:
            self._pending.append(job)
        while not job.done.is_set():
            self._give_up_if(job, gone)
            if self._model.acquire(timeout=0.05):
                try:
                    if not job.done.is_set():
                        self._give_up_if(job, gone)  # looked at again: the wait may have ended just now
                        self._compute_batch(compute)
                finally:
                    self._model.release()
        if job.error is not None:
            raise job.error
        return job.records

    def _give_up_if(self, job: Job, gone) -> None:
        """:class:`Busy` for a job past its deadline or whose client has gone, while it still waits
        (one already taken into a batch is computed: its answer is moments away)."""
        timed_out = time.monotonic() > job.started + self.limits.timeout
        if not (timed_out or gone()):
            return
        with self._state:
            waiting = job in self._pending
            if waiting:
                self._pending.remove(job)
        if waiting:
            why = "timed out" if timed_out else "disconnected"
            self.refused[why] += 1
            raise Busy(f"waited over {self.limits.timeout:g} s for the model (--timeout); retry later"
                       if timed_out else "the client disconnected before its turn", self.retry_after())

    def _compute_batch(self, compute) -> None:
        """The oldest waiting job and those after it, up to ``max_batch`` posters (an annotated
        job goes alone: its drawing is per poster anyway); done is set on each."""
        time.sleep(self.limits.batch_wait)  # requests arriving together share the forward pass
        with self._state:
            batch = [self._pending.pop(0)]
            if not batch[0].annotate:
                posters = len(batch[0].paths)
                while self._pending and not self._pending[0].annotate \
                        and posters + len(self._pending[0].paths) <= self.limits.max_batch:
                    posters += len(self._pending[0].paths)
                    batch.append(self._pending.pop(0))
        self.batches.append(len(batch))
        try:
            compute(batch)
        except Exception as exc:  # noqa: BLE001 - handed to each request's own thread, which raises it
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.done.set()

    def _recent(self) -> list[float]:
        cutoff = time.monotonic() - self.WINDOW
        with self._state:
            while self._latencies and self._latencies[0][0] < cutoff:
                self._latencies.popleft()
            return sorted(seconds for _, seconds in self._latencies)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead at the recent mean latency."""
        recent = self._recent()
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1, math.ceil(mean * max(1, self.admitted)))

    def stats(self) -> dict:
        recent = self._recent()

        def pct(q: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(q * len(recent)))], 3) if recent else None

        batches = list(self.batches)
        return {"admitted": self.admitted, "queue": self.limits.queue, "refused": dict(self.refused),
                "requests_per_batch": round(sum(batches) / len(batches), 2) if batches else None,
                "answered_last_minute": len(recent),
                "latency_s": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)}}


class UploadError(Exception):
    """A bad upload: the HTTP status and the one-line reason that names the file."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def status_for(reason: str) -> int:
    """The HTTP status of a poster the decoder refused, from its reason."""
    if reason.startswith("empty"):
        return 400
    if reason.startswith("not an image"):
        return 415
    if reason.startswith("image too large") or "decompression bomb" in reason:  # ours, or PIL's own guard
        return 413
    return 422


def check_upload(name: str, data: bytes, limits: Limits) -> "np.ndarray":
    """The decoded poster of one upload, or :class:`UploadError` naming the file and the problem."""
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"{name}: file too large ({len(data) / 2**20:.1f} MB, limit {limits.max_file_bytes / 2**20:.0f} MB)")
    try:
        return decode_bytes(data)
    except BadImage as exc:
        raise UploadError(status_for(str(exc)), f"{name}: {exc}") from None


def prepare_job(uploads: list[tuple[str, bytes]], annotate: bool, limits: Limits, folder: str, started: float) -> Job:
    """Checked uploads (every one decoded, so a bad file fails its request before the model runs),
    written under their position into ``folder``; ``started``: when the request came (its deadline
    counts from there)."""
    if not uploads:
        raise UploadError(400, "no files: send one or more posters as the multipart field 'files'")
    if len(uploads) > limits.max_files:
        raise UploadError(413, f"too many files: {len(uploads)}, at most {limits.max_files} per request")
    pixels = [check_upload(name, data, limits) for name, data in uploads]
    paths = []
    for i, (name, data) in enumerate(uploads):
        suffix = Path(name).suffix.lower()
        path = Path(folder) / f"{i}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
        path.write_bytes(data)
        paths.append(str(path))
    return Job([name for name, _ in uploads], pixels, paths, annotate, started)


def compute_jobs(predictor: Predictor, jobs: list[Job], top_k: int = 3) -> None:
    """Every job's posters through the models as one batch, then each job's records (drawn where it
    asks for annotation); a poster the models could not take fails its own job only."""
    from .annotate import annotate as draw
    from .outputs import PredictionLayout

    paths = [p for job in jobs for p in job.paths]
    predictions = iter(predictor.predict(paths, batch_size=max(1, len(paths))))
    layout = PredictionLayout(predictor.genres, top_k)
    for job in jobs:
        mine = [next(predictions) for _ in job.paths]
        try:
            job.records = []
            for name, rgb, prediction in zip(job.names, job.pixels, mine):
                prediction.path = name
                if prediction.error:  # decoded before, so only a poster the models could not take
                    raise UploadError(422, f"{name}: {prediction.error}")
                record = layout.record(prediction)
                if job.annotate:
                    buffer = io.BytesIO()
                    draw(predictor, prediction, rgb).image.save(buffer, format="PNG")
                    record["annotated"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
                job.records.append(record)
        except UploadError as exc:
            job.error = exc


def create_app(predictor: Predictor, limits: Limits = Limits()) -> "FastAPI":
    """The FastAPI app around one loaded predictor."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="posterfusion", version="1", docs_url=None, redoc_url=None)
    gate = app.state.gate = Gate(limits)
    # The whole body of the largest acceptable request, and room for the multipart framing.
    max_body = limits.max_files * limits.max_file_bytes + 2**20

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(Busy)
    async def busy(_: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.replace("{{MAX_FILES}}", str(limits.max_files)).replace("{{MAX_MB}}", f"{limits.max_file_bytes / 2**20:.0f}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": str(predictor.model_dir), "genres": predictor.genres,
                "device": str(predictor.models.device)} | gate.stats()

    @app.post("/predict")
    async def predict(request: Request, annotate: bool = True) -> dict:
        started = time.monotonic()
        gate.admit()  # before the body is read: a full queue costs the server nothing
        try:
            return await answer(request, annotate, started)
        finally:
            gate.leave(started)

    async def answer(request: "Request", annotate: bool, started: float) -> dict:
        import anyio.from_thread

        length = request.headers.get("content-length", "")
        if not length.isdigit():  # a chunked body would be spooled to disk before any limit applies
            raise UploadError(411, "send the request with a Content-Length (browsers, curl and HTTP libraries do)")
        if int(length) > max_body:
            raise UploadError(413, f"request too large ({int(length) / 2**20:.1f} MB; at most {limits.max_files} files "
                                   f"of {limits.max_file_bytes / 2**20:.0f} MB each)")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UploadError(400, "send the posters as multipart/form-data, in the field 'files'")
        try:
            form = await request.form(max_files=limits.max_files + 1, max_fields=limits.max_files + 10)
        except HTTPException as exc:  # the parser's own limits, or a malformed body
            if "Too many files" in str(exc.detail):
                raise UploadError(413, f"too many files: over {limits.max_files + 1}, at most {limits.max_files} per request") from None
            raise UploadError(400, f"bad multipart body: {exc.detail}") from None
        uploads = []
        for value in form.getlist("files"):
            if isinstance(value, str):
                raise UploadError(400, "the field 'files' must hold files, not text")
            uploads.append((value.filename or f"upload {len(uploads) + 1}", await value.read(limits.max_file_bytes + 1)))

        def through_the_model() -> list[dict]:
            with tempfile.TemporaryDirectory(prefix="posterfusion-upload-") as folder:
                job = prepare_job(uploads, annotate, limits, folder, started)
                return gate.run(job, lambda jobs: compute_jobs(predictor, jobs),
                                lambda: anyio.from_thread.run(request.is_disconnected))

        try:
            return {"results": await run_in_threadpool(through_the_model)}
        finally:
            await form.close()

    return app


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()) -> None:
    """Run the app with uvicorn until interrupted. SIGTERM or Ctrl+C stops it gracefully (uvicorn's
    own handling): no new connections, the requests already in are answered, then it exits."""
    import uvicorn

    uvicorn.run(create_app(predictor, limits), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=limits.timeout * (limits.queue + 1))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posterfusion</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1280px; padding: 0 1rem; color: #222; }
#drop { border: 3px dashed #999; border-radius: 12px; padding: 2.5rem; text-align: center; background: #fafafa; }
#drop.over { border-color: #2e8b57; background: #eef8f1; }
.result { border: 1px solid #ddd; border-radius: 8px; margin: 1rem 0; padding: 1rem; }
.result h2 { font-size: 1.05rem; margin: 0 0 .5rem; }
.result img.annotated { max-width: 100%; height: auto; display: block; margin-top: .5rem; }
.genres span { display: inline-block; background: #2e8b57; color: #fff; border-radius: 4px; padding: .1rem .5rem; margin-right: .3rem; }
.error { color: #b00020; font-weight: 600; }
.muted { color: #666; }
</style></head>
<body>
<h1>posterfusion</h1>
<p>Drop movie posters below (or pick them); each one comes back with its genres, their probabilities,
what the detectors saw and why. Up to {{MAX_FILES}} at a time, {{MAX_MB}} MB each; nothing leaves this machine.</p>
<div id="drop"><p>Drop posters here</p><input type="file" id="files" name="files" accept="image/*" multiple></div>
<div id="results"></div>
<script>
const results = document.getElementById('results');
const drop = document.getElementById('drop');
const input = document.getElementById('files');

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function evidenceLine(ev) {
  const parts = [];
  if (ev.objects) {
    const seen = Object.entries(ev.objects).map(([k, v]) => v > 1 ? k + ' x' + v : k).join(', ') || 'no objects';
    parts.push('saw: ' + seen + '; ' + ev.faces + (ev.faces === 1 ? ' face' : ' faces') + (ev.faces ? ' (' + ev.expression + ')' : ''));
  }
  if ('read' in ev) parts.push('read: ' + (ev.read || '(no text)'));
  return parts.join(' \\u2014 ');
}

async function send(file) {
  const card = el('div', 'result');
  card.appendChild(el('h2', null, file.name));
  const status = el('p', 'muted status', 'predicting\\u2026');
  card.appendChild(status);
  results.prepend(card);
  const body = new FormData();
  body.append('files', file, file.name);
  let answer, ok = false;
  try {
    const response = await fetch('predict', { method: 'POST', body });
    ok = response.ok;
    answer = await response.json();
  } catch (err) {
    answer = { detail: 'no answer from the server (' + err + ')' };
  }
  status.remove();
  if (!ok) {
    card.classList.add('failed');
    card.appendChild(el('p', 'error', answer.detail || 'the server refused the file'));
    return;
  }
  const r = answer.results[0];
  const genres = el('p', 'genres');
  r.genres.forEach(g => genres.appendChild(el('span', 'genre', g)));
  card.appendChild(genres);
  card.appendChild(el('p', 'probabilities', r.top.map(([g, p]) => g + ' ' + p.toFixed(2)).join(', ')));
  card.appendChild(el('p', 'evidence muted', evidenceLine(r.evidence)));
  if (r.annotated) {
    const img = el('img', 'annotated');
    img.alt = 'annotated ' + file.name;
    img.src = r.annotated;
    card.appendChild(img);
  }
}

async function sendAll(files) {
  for (const file of files) await send(file);  // one at a time: the server runs one poster batch at a time anyway
}

input.addEventListener('change', () => { sendAll(Array.from(input.files)); input.value = ''; });
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); sendAll(Array.from(e.dataTransfer.files)); });
</script>
</body></html>
"""
