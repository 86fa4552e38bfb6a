"""Ping streams and what they measure: loss, the missing sequence numbers, and outages in seconds.

``Host.ping_stream`` starts a ``PingStream``; ``stream.stop() -> PingStats(transmitted, received,
missing_seqs)`` with ``stats.lost`` and ``stats.loss``: ping is stopped with SIGINT so it prints its summary.
``gaps(stats, interval)`` / ``longest_gap(stats, interval)``: the outages of a stream, in seconds.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass

from lab.errors import LabError
from lab.procs import Proc


@dataclass(frozen=True)
class PingStats:
    transmitted: int
    received: int
    missing_seqs: tuple[int, ...]

    @property
    def lost(self) -> int:
        """Echoes that got no reply, not counting the last one if it was still in flight when stopped.

        ping stops on SIGINT without waiting for the reply to its last echo, so a request sent less than
        a round trip before the stop shows as unanswered: that is the stop, not the network.
        """
        in_flight = 1 if self.transmitted in self.missing_seqs else 0
        return max(self.transmitted - self.received - in_flight, 0)

    @property
    def loss(self) -> float:
        return self.lost / self.transmitted if self.transmitted else 1.0


_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_SEQ_RE = re.compile(r"icmp_seq=(\d+)")


class PingStream:
    """A background ``ping -i interval`` whose loss is read when it is stopped (SIGINT -> summary)."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def stop(self, grace: float = 5.0) -> PingStats:
        self.proc.signal(signal.SIGINT)
        try:
            self.proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        text = self.proc.log_text()
        m = _SUMMARY_RE.search(text)
        if m is None:
            raise LabError(f"ping printed no summary; see {self.proc.log_path}")
        sent, got = int(m.group(1)), int(m.group(2))
        seen = {int(s) for s in _SEQ_RE.findall(text)}
        missing = tuple(s for s in range(1, sent + 1) if s not in seen)
        return PingStats(sent, got, missing)


def gaps(stats: PingStats, interval: float) -> list[float]:
    """Every outage of a ping stream, in seconds: runs of consecutive lost sequence numbers times interval.

    The last sequence number may still have been in flight when the stream was stopped: not an outage.
    """
    missing = [s for s in stats.missing_seqs if s != stats.transmitted]
    runs: list[int] = []
    prev = -2
    for s in missing:
        if s == prev + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = s
    return [r * interval for r in runs]


def longest_gap(stats: PingStats, interval: float) -> float:
    return max(gaps(stats, interval), default=0.0)
