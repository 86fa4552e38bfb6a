"""Small asyncio helpers shared by the daemons (not pure: this is the I/O edge of ghostcore)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter"), bounded.

    ``next()`` returns the delay before the next attempt; ``reset()`` after a success. Pure arithmetic
    so unit tests can drive it; ``rng`` is injectable for determinism.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (self.factor**self._attempt))
        self._attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
