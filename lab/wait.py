"""Bounded waits: retry a read until it returns something truthy, bounded in time and in attempts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from lab.errors import WaitTimeout

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Retry a READ until it returns something truthy; ``WaitTimeout`` naming ``what`` when time runs out."""
    deadline = time.monotonic() + timeout
    attempts = int(timeout / max(interval, 0.001)) + 2
    last: T | None = None
    for _ in range(attempts):
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
