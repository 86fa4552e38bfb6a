"""The TURN edge's GSO trains with a recording stand-in for a socket: what would go out, in which calls."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, cast

from ghostcore.addr import HostPort
from ghostgate.turn_gso import MAX_BYTES, MAX_SEGMENT, MAX_SEGMENTS, UDP_SEGMENT, Trains

A: HostPort = ("198.51.100.1", 1)
B: HostPort = ("198.51.100.2", 2)


class Recorder:
    """Records ``sendto`` and GSO ``sendmsg`` calls as (destination, [datagrams])."""

    def __init__(self, fail_gso: int = 0, fail_all: int = 0) -> None:
        self.calls: list[tuple[HostPort, list[bytes]]] = []
        self.fail_gso = fail_gso
        self.fail_all = fail_all

    def sendto(self, data: Any, dest: HostPort) -> int:
        if self.fail_all:
            raise OSError(self.fail_all, "failed")
        self.calls.append((dest, [bytes(data)]))
        return len(data)

    def sendmsg(
        self, buffers: list[Any], cmsgs: list[tuple[int, int, bytes]], flags: int, dest: HostPort
    ) -> int:
        if self.fail_gso or self.fail_all:
            raise OSError(self.fail_gso or self.fail_all, "failed")
        ((level, kind, value),) = cmsgs
        assert (level, kind) == (socket.SOL_UDP, UDP_SEGMENT)
        (size,) = struct.unpack("=H", value)
        data = b"".join(bytes(b) for b in buffers)
        self.calls.append((dest, [data[i : i + size] for i in range(0, len(data), size)]))
        return len(data)


def trains(gso: bool = True) -> tuple[Trains, list[tuple[HostPort, OSError]]]:
    failures: list[tuple[HostPort, OSError]] = []
    return Trains(lambda dest, exc: failures.append((dest, exc)), gso=gso), failures


def add(t: Trains, key: object, sock: Recorder, dest: HostPort, data: bytes) -> None:
    t.add(key, cast(socket.socket, sock), dest, memoryview(data))


def test_a_run_of_equal_datagrams_is_one_send_and_a_shorter_one_ends_it() -> None:
    t, failures = trains()
    sock = Recorder()
    for i in range(5):
        add(t, "r", sock, A, bytes([i]) * 100)
    add(t, "r", sock, A, b"s" * 10)  # shorter: may end a train
    assert sock.calls == []  # nothing leaves before the flush or the train's end
    add(t, "r", sock, A, b"z" * 100)  # so this starts the next one, and the ended one leaves
    assert len(sock.calls) == 1
    t.flush()
    assert sock.calls == [
        (A, [bytes([i]) * 100 for i in range(5)] + [b"s" * 10]),
        (A, [b"z" * 100]),
    ]
    assert failures == []


def test_keys_keep_their_own_order_and_limits_split_trains() -> None:
    t, _ = trains()
    sock = Recorder()
    for i in range(MAX_SEGMENTS + 1):
        add(t, "a", sock, A, i.to_bytes(2, "big") * 100)
        add(t, "b", sock, B, b"b" * 8)
    add(t, "b", sock, B, b"big" * 1000)  # longer than the train's segments and than MAX_SEGMENT: alone
    t.flush()
    to_a = [d for dest, sent in sock.calls if dest == A for d in sent]
    assert to_a == [i.to_bytes(2, "big") * 100 for i in range(MAX_SEGMENTS + 1)]
    assert [len(sent) for dest, sent in sock.calls if dest == A] == [MAX_SEGMENTS, 1]
    to_b = [d for dest, sent in sock.calls if dest == B for d in sent]
    assert to_b == [b"b" * 8] * (MAX_SEGMENTS + 1) + [b"big" * 1000]
    assert len(b"big" * 1000) > MAX_SEGMENT


def test_a_train_is_at_most_one_udp_datagram_of_bytes() -> None:
    t, _ = trains()
    sock = Recorder()
    for _ in range(MAX_SEGMENTS):
        add(t, "r", sock, A, b"w" * 1200)
    t.flush()
    sizes = [len(sent) for _, sent in sock.calls]
    assert sizes == [MAX_BYTES // 1200, MAX_SEGMENTS - MAX_BYTES // 1200]
    assert all(sum(map(len, sent)) <= MAX_BYTES for _, sent in sock.calls)


def test_empty_datagram_goes_alone_after_its_train() -> None:
    t, _ = trains()
    sock = Recorder()
    add(t, "r", sock, A, b"x" * 10)
    add(t, "r", sock, A, b"")
    t.flush()
    assert sock.calls == [(A, [b"x" * 10]), (A, [b""])]


def test_without_gso_support_it_is_turned_off_and_datagrams_go_one_by_one() -> None:
    t, failures = trains()
    sock = Recorder(fail_gso=errno.EIO)
    for _ in range(3):
        add(t, "r", sock, A, b"q" * 50)
    t.flush()
    assert sock.calls == [(A, [b"q" * 50])] * 3
    assert not t.gso
    assert failures == []


def test_an_unroutable_destination_counts_each_datagram_and_keeps_gso() -> None:
    t, failures = trains()
    sock = Recorder(fail_all=errno.ENETUNREACH)
    for _ in range(3):
        add(t, "r", sock, A, b"q" * 50)
    t.flush()
    assert [dest for dest, _ in failures] == [A, A, A]
    assert all(exc.errno == errno.ENETUNREACH for _, exc in failures)
    assert t.gso
