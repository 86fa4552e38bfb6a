"""Outgoing datagrams of one read batch of the TURN edge, sent as UDP GSO trains (Linux ``UDP_SEGMENT``).

On loopback and on real NICs most of a relayed datagram's cost is the kernel's per-send path (measured here:
~11 µs per 1204-byte ``sendto`` on a busy 2-core host, ~1.2 µs per datagram when 54 go out in one GSO send).
So the edge queues what it forwards during one batch here, keyed by route, and :meth:`Trains.flush` sends
each destination's run of equal-sized datagrams (the last may be shorter: the kernel's rule) with one
``sendmsg`` carrying ``UDP_SEGMENT``; the kernel (or the NIC) cuts it back into the same datagrams, so the
receiver sees exactly what it would have seen from single sends, in the same order. Only what was already
waiting in the socket is batched: the edge flushes at the end of every batch and before anything the core
handles, so no datagram waits for a later one.

A train is at most ``MAX_SEGMENTS`` datagrams and ``MAX_BYTES`` bytes (one UDP datagram before
segmentation), and only segments up to ``MAX_SEGMENT`` bytes are coalesced, so a segment always fits a
1500-byte path (IPv6 + UDP headers); bigger or empty datagrams go out alone. Where GSO is not supported
(``EIO``, ``EOPNOTSUPP``, ``ENOPROTOOPT``: old kernels, devices without checksum offload) it is turned off
for good and the datagrams are sent one by one; any other failure (an unroutable peer) is counted per
datagram, like a failed single send.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable, Hashable

from ghostcore.addr import HostPort

log = logging.getLogger(__name__)

UDP_SEGMENT = 103  # linux/udp.h; Python's socket module does not name it
MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS is at least this
MAX_BYTES = 65507 - 40  # the largest UDP payload over IPv4, minus slack for IPv6's bigger header
MAX_SEGMENT = 1500 - 40 - 8  # a segment must fit the path MTU: 1500 minus IPv6 and UDP headers
_UNSUPPORTED = {errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT}


class _Train:
    __slots__ = ("closed", "count", "data", "dest", "size", "sock")

    def __init__(self, sock: socket.socket, dest: HostPort, size: int) -> None:
        self.sock = sock
        self.dest = dest
        self.size = size
        self.count = 0
        self.data = bytearray()
        self.closed = False  # a shorter datagram ends a train


class Trains:
    """The pending trains of one batch, by key (a route); ``failed(dest, exc)`` counts a datagram not sent."""

    def __init__(self, failed: Callable[[HostPort, OSError], None], gso: bool = True) -> None:
        self._failed = failed
        self.gso = gso
        self._pending: dict[Hashable, _Train] = {}

    def add(self, key: Hashable, sock: socket.socket, dest: HostPort, datagram: memoryview) -> None:
        """Queue ``datagram`` (copied) for ``dest`` from ``sock``; one key, one ``(sock, dest)``."""
        size = len(datagram)
        train = self._pending.get(key)
        if train is not None and (
            train.closed
            or size > train.size
            or train.count >= MAX_SEGMENTS
            or len(train.data) + size > MAX_BYTES
            or train.sock is not sock
        ):
            del self._pending[key]
            self._send(train)
            train = None
        if not 0 < size <= MAX_SEGMENT:
            if train is not None:
                del self._pending[key]
                self._send(train)
            self._send_one(sock, dest, datagram)
            return
        if train is None:
            train = self._pending[key] = _Train(sock, dest, size)
        train.data += datagram
        train.count += 1
        if size < train.size:
            train.closed = True

    def flush(self) -> None:
        """Send every pending train, in the order they were started."""
        pending = self._pending
        if pending:
            self._pending = {}
            for train in pending.values():
                self._send(train)

    def _send(self, train: _Train) -> None:
        if train.count == 1 or not self.gso:
            if train.count == 1:
                self._send_one(train.sock, train.dest, train.data)
            else:
                self._one_by_one(train)
            return
        try:
            train.sock.sendmsg(
                [train.data], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", train.size))], 0, train.dest
            )
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                log.info("UDP GSO unavailable (%s): relayed datagrams are sent one by one", exc.strerror)
                self.gso = False
            self._one_by_one(train)

    def _one_by_one(self, train: _Train) -> None:
        view = memoryview(train.data)
        for start in range(0, len(view), train.size):
            self._send_one(train.sock, train.dest, view[start : start + train.size])

    def _send_one(self, sock: socket.socket, dest: HostPort, data: bytearray | memoryview) -> None:
        try:
            sock.sendto(data, dest)
        except OSError as exc:
            self._failed(dest, exc)
