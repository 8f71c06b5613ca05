"""Stage timings stay whole when both threads of a batch add to the same stage."""

from __future__ import annotations

import sys
import threading

from posterfusion import timing


def test_two_threads_adding_to_one_stage_lose_no_time(monkeypatch) -> None:
    clock = threading.local()

    def tick() -> float:  # each thread's own clock: every block lasts exactly one second
        clock.now = getattr(clock, "now", 0.0) + 1.0
        return clock.now

    monkeypatch.setattr(timing.time, "perf_counter", tick)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, as a busy build does
    sink: dict[str, float] = {}

    def work() -> None:
        for _ in range(20_000):
            with timing.timed(sink, "backbone"):
                pass

    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert sink == {"backbone": 4 * 20_000 * 1.0}
