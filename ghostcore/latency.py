"""Latency histograms kept as plain bucket counts (pure): what a hot path can afford to observe into, and
what a metrics collector turns into a Prometheus histogram at scrape time (``ghostcore.metrics_http``
readers). Bounds are fixed at construction, so the label set (``le``) is bounded.
"""

from __future__ import annotations

import bisect

# Seconds: from a quick in-memory change to a slow, batched fan-out over thousands of streams.
DEFAULT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Buckets:
    """Observations counted per upper bound (not cumulative; :meth:`cumulative` makes them so)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as a Prometheus histogram has them, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out
