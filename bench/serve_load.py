"""`fusion serve` under load: N concurrent clients for T seconds over real posters, bad uploads mixed in.

Starts `fusion serve` as a child process (once per batching setting), drives it with threads that
each send one poster per request in a loop (every 10th request a bad upload: text named .jpg, an
empty file, a truncated JPEG, a decompression bomb, a file over the size limit), and prints one
table: requests, answers by status, posters/s answered, latency percentiles of the answered
requests, the server's peak RSS (VmHWM of its process), connection errors, and how many good
posters got other genres than `fusion predict` gives them (computed in this process first, which
also gives the CLI's own rate over the same posters, start-up excluded). A client answered 503
waits what Retry-After says (at most 1 s) before its next request, as a polite client would.

    .venv/bin/python bench/serve_load.py [--model DIR] [--posters 32] [--clients 1,4,16,64] [--seconds 30]
        [--load-seconds 120] [--queue 4]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
POSTERS = REPO.parent / "shared" / "data" / "movieposters"
MAX_MB = 4


def hostile(poster: bytes) -> list[tuple[str, bytes, int]]:
    """Bad uploads and the status each must get."""
    bomb = io.BytesIO()
    Image.new("1", (9_000, 9_000)).save(bomb, format="PNG")
    return [("notes.jpg", b"a shopping list, not a poster\n", 415), ("empty.jpg", b"", 400),
            ("cut.jpg", poster[: len(poster) // 2], 422), ("bomb.png", bomb.getvalue(), 413),
            ("huge.jpg", b"\xff\xd8\xff" + bytes(MAX_MB * 2**20 + 10), 413)]


def start_server(model: str | None, max_batch: int, queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fusion = Path(sys.executable).with_name("fusion")
    command = [str(fusion), "serve", "--port", str(port), "--max-mb", str(MAX_MB), "--queue", str(queue),
               "--max-batch", str(max_batch)] + (["--model", model] if model else [])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, "fusion serve exited"
        assert time.monotonic() < deadline, "fusion serve did not start in 300 s"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drive(url: str, posters: list[tuple[str, bytes]], bad: list[tuple[str, bytes, int]], clients: int, seconds: float,
          annotate: bool, reference: dict[str, list[str]]) -> dict:
    """``clients`` threads posting for ``seconds``; what came back."""
    lock = threading.Lock()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    answered = [0]
    wrong_status, wrong_genres, dropped = [0], [0], [0]
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        n = k
        with httpx.Client(timeout=600) as session:
            while time.monotonic() < stop:
                n += clients
                is_bad = n % 10 == 9
                name, data, expected = bad[n % len(bad)] if is_bad else (*posters[n % len(posters)], 200)
                started = time.monotonic()
                try:
                    r = session.post(f"{url}/predict", params={"annotate": str(annotate).lower()},
                                     files={"files": (name, data)})
                except httpx.HTTPError:
                    with lock:
                        dropped[0] += 1
                    continue
                took = time.monotonic() - started
                with lock:
                    key = f"{r.status_code // 100}xx" if r.status_code != 503 else "503"
                    statuses[key] = statuses.get(key, 0) + 1
                    if r.status_code == 200:
                        latencies.append(took)
                        answered[0] += 1
                        if r.json()["results"][0]["genres"] != reference[name]:
                            wrong_genres[0] += 1
                    elif r.status_code != 503 and r.status_code != expected:
                        wrong_status[0] += 1
                if r.status_code == 503:
                    time.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    begun = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - begun
    latencies.sort()

    def pct(q: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))]:.2f}" if latencies else "-"

    health = httpx.get(f"{url}/health", timeout=10).json()
    return {"requests": sum(statuses.values()) + dropped[0], "statuses": statuses, "posters_per_s": answered[0] / elapsed,
            "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "dropped": dropped[0],
            "wrong_status": wrong_status[0], "wrong_genres": wrong_genres[0],
            "per_batch": health.get("requests_per_batch")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--posters", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=30, help="per client count in the sweep")
    parser.add_argument("--load-seconds", type=float, default=120, help="the 64-client runs, annotation off and on")
    parser.add_argument("--queue", type=int, default=4)
    args = parser.parse_args()

    import pandas as pd

    from posterfusion.predict import Predictor

    table = pd.read_csv(POSTERS / "labels.csv", dtype=str, keep_default_na=False)
    paths = [str(POSTERS / p) for p in table["poster"].iloc[:: max(1, len(table) // args.posters)][: args.posters]]
    predictor = Predictor(args.model)
    predictor.predict(paths[:2])  # warm
    started = time.perf_counter()
    reference = {Path(p.path).name: p.genres for p in predictor.predict(paths)}
    cli_rate = len(paths) / (time.perf_counter() - started)
    del predictor
    posters = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    bad = hostile(posters[0][1])

    rows = []
    runs = [(16, False, [int(c) for c in args.clients.split(",")], args.seconds),
            (1, False, [int(c) for c in args.clients.split(",")], args.seconds),
            (16, False, [64], args.load_seconds), (16, True, [64], args.load_seconds)]
    for max_batch, annotate, client_counts, seconds in runs:
        process, url = start_server(args.model, max_batch, args.queue)
        try:
            for clients in client_counts:
                print(f"max-batch {max_batch}, annotate {annotate}, {clients} clients, {seconds:.0f} s ...", file=sys.stderr, flush=True)
                result = drive(url, posters, bad, clients, seconds, annotate, reference)
                rows.append((max_batch, annotate, clients, seconds, result, peak_rss_mb(process.pid)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)

    print(f"\n{len(paths)} real posters; fusion predict over them in process: {cli_rate:.2f} posters/s (start-up "
          f"excluded); --queue {args.queue}, {os.cpu_count()} cores; every 10th request a bad upload\n")
    print("| max-batch | annotate | clients | seconds | requests | 2xx | 4xx (as expected) | 503 | 5xx | dropped "
          "| posters/s | p50 s | p95 s | p99 s | requests per batch | server peak RSS MB | genres unlike predict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for max_batch, annotate, clients, seconds, r, rss in rows:
        s = r["statuses"]
        four = s.get("4xx", 0)
        print(f"| {max_batch} | {'on' if annotate else 'off'} | {clients} | {seconds:.0f} | {r['requests']} | {s.get('2xx', 0)} "
              f"| {four} ({four - r['wrong_status']}) | {s.get('503', 0)} | {s.get('5xx', 0)} | {r['dropped']} "
              f"| {r['posters_per_s']:.2f} | {r['p50']} | {r['p95']} | {r['p99']} | {r['per_batch']} | {rss:.0f} "
              f"| {r['wrong_genres']} |")


if __name__ == "__main__":
    main()
