"""Per-stage wall-clock accounting, so the benchmark can read where time goes in real runs."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

_ADDING = threading.Lock()
"""Both threads of a batch add to the same stages (frozen.py): a read-add-write is not atomic."""


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
        elapsed = time.perf_counter() - start
        with _ADDING:
            sink[stage] = sink.get(stage, 0.0) + elapsed
