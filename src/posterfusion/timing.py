"""Per-stage wall-clock accounting, so the benchmark can read where time goes in real runs."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


@contextlib.contextmanager
def timed(sink: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the block's wall time to ``sink[stage]``; free when ``sink`` is None."""
    if sink is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        sink[stage] = sink.get(stage, 0.0) + time.perf_counter() - start
