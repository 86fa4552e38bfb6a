"""Small asyncio helpers shared by the daemons (not pure: this is the I/O edge of ghostcore)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import signal
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An Event set by SIGTERM or SIGINT, a daemon's clean shutdown; the handlers go when the block ends
    (tests run the daemons in-process, one after another, on loops of their own)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a daemon's main coroutine on uvloop when it is installed (the ``fast`` extra), else asyncio."""
    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


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


class CoreTimer:
    """One loop timer kept at the earliest deadline a sans-IO core asks for (its ``next_timer()``).

    ``arm(when)`` only ever moves the timer earlier: a timer that fires before the core's real deadline
    is harmless (the core does nothing yet and is asked again), one that fires late is not. When it goes
    off, ``fire(clock())`` runs; ``cancel()`` on shutdown. ``clock`` is the core's clock (unix time for
    cores whose credentials expire in unix time), converted to the loop's relative delay here.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float], fire: Callable[[float], None]
    ) -> None:
        self._loop = loop
        self._clock = clock
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, when: float | None) -> None:
        if when is None or (self._at is not None and self._at <= when):
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self._loop.call_later(max(0.0, when - self._clock()), self._run)

    def _run(self) -> None:
        self._handle = None
        self._at = None
        self._fire(self._clock())

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._at = None
