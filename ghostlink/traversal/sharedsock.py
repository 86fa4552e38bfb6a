"""Raw sockets that share WireGuard's UDP port for STUN, so no Python process is on the direct path.

It owns, per WireGuard listen port, one ``AF_INET, SOCK_RAW, IPPROTO_UDP`` socket and its ``AF_INET6`` twin
(WireGuard listens on both families), the classic BPF filter attached to each, and the crafting and
parsing of the UDP/IP headers that go with them. Nothing else.

Why a raw socket: wireguard-go (or the kernel module) owns the UDP socket bound to the listen port, and a
second UDP socket cannot share it usefully (``SO_REUSEPORT`` would split WireGuard's own packets between the
two). A raw UDP socket gets a *copy* of every UDP datagram the host receives, before and independently of
the UDP socket lookup (``raw_local_deliver`` in the kernel), so WireGuard keeps all its traffic; the filter
below keeps our copy down to STUN sent to WireGuard's port. Sending through the raw socket with a UDP
header whose source port is WireGuard's port makes our STUN leave from exactly the 5-tuple WireGuard uses,
so a NAT maps both with the same public endpoint: STUN discovers WireGuard's public endpoint, and a
connectivity check that succeeds proves the path WireGuard will use. NetBird's ``sharedsock`` package does
the same in Go.

The filter (classic BPF, ``SO_ATTACH_FILTER``; a raw socket's filter sees the packet from the IPv4 header
on) accepts only: protocol UDP, not a non-first fragment, UDP destination port == WireGuard's port, the
first two bits of the UDP payload zero and the STUN magic cookie 0x2112A442 at payload offset 4 (RFC 8489
§5: how STUN is told apart from other protocols on a shared port), and a STUN length field that matches the
UDP length. A WireGuard message (type byte 1..4, three reserved zero bytes, then a random 32-bit index)
has the cookie at offset 4 once in 2^32 indexes, but its zero "length" never matches: no WireGuard packet
reaches Python, and WireGuard gets every packet either way. Received packets are checked again in
Python (:func:`parse_ipv4_udp` / :func:`parse_udp`, :func:`ghostlink.traversal.stun_core.is_stun`):
datagrams queued between ``socket()`` and the filter's attachment were not filtered.

Checksum: computed (RFC 768 pseudo-header checksum) with the source address the kernel will pick for the
destination (a route lookup: ``connect()`` of a throw-away UDP socket, which sends nothing), cached briefly.
IPv4 allows a zero checksum ("no checksum"), and we fall back to it when the lookup fails, but some
middleboxes drop zero-checksum UDP, and NetBird computes it too; a checksum is cheap next to a syscall.

IPv6 differs in three ways (RFC 3542 §3.1, Linux ``raw(7)``/``ipv6(7)``): a raw IPv6 socket receives the
packet from the transport header on (no IPv6 header: the source address comes from ``recvfrom``), so its
filter (:func:`bpf_program6`) reads UDP offsets directly; the UDP checksum is mandatory over IPv6
(RFC 8200 §8.1), so the kernel is told to compute it (``IPV6_CHECKSUM`` at offset 6, which also makes it
drop received datagrams with a bad one); and the destination address is not known without ancillary
data, so a received IPv6 datagram's ``dst`` host is ``::`` (only its port is used). The IPv6 socket is
optional: a host without IPv6 keeps the IPv4 one, and sends to IPv6 addresses then fail (counted).

I/O: non-blocking, read through ``loop.add_reader``, drained in batches of up to ``BATCH`` datagrams per
wake-up. Pure helpers (:func:`bpf_program`, :func:`bpf_program6`, :func:`pack_filter`, :func:`build_udp`,
:func:`udp_checksum`, :func:`parse_ipv4_udp`, :func:`parse_udp`) are separate from :class:`SharedSocket`,
so they are unit-tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ghostcore.addr import HostPort
from ghostlink.traversal.stun_core import STUN_COOKIE, is_stun

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # linux/asm-generic/socket.h
BATCH = 64  # datagrams read per wake-up: bounds the time one burst holds the loop
RCVBUF = 1 << 20
SNAPLEN = 0xFFFF  # what the filter lets through of an accepted packet: all of it
SOURCE_TTL = 10.0  # seconds a route lookup (source address for a destination) is reused
SOURCE_CACHE_MAX = 1024

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x20, 0x40, 0x60, 0xA0
BPF_ADD, BPF_JEQ, BPF_JSET = 0x00, 0x10, 0x40
BPF_K, BPF_X = 0x00, 0x08

Insn = tuple[int, int, int, int]  # (code, jt, jf, k): struct sock_filter


def bpf_program(port: int) -> list[Insn]:
    """The filter for WireGuard's ``port``: IPv4 UDP to ``port`` whose payload looks like STUN."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a UDP port")
    reject = 18  # index of "ret #0"; jump offsets count from the next instruction

    def to_reject(i: int) -> int:
        return reject - (i + 1)

    return [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, 9),  # 0: A = IPv4 protocol
        (BPF_JMP | BPF_JEQ | BPF_K, 0, to_reject(1), socket.IPPROTO_UDP),  # 1
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 6),  # 2: A = flags + fragment offset
        (BPF_JMP | BPF_JSET | BPF_K, to_reject(3), 0, 0x1FFF),  # 3: a later fragment has no UDP header
        (BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0),  # 4: X = 4 * IHL (where the UDP header starts)
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 2),  # 5: A = UDP destination port
        (BPF_JMP | BPF_JEQ | BPF_K, 0, to_reject(6), port),  # 6
        (BPF_LD | BPF_B | BPF_IND, 0, 0, 8),  # 7: A = first payload byte
        (BPF_JMP | BPF_JSET | BPF_K, to_reject(8), 0, 0xC0),  # 8: STUN's top two bits are zero (§5)
        (BPF_LD | BPF_W | BPF_IND, 0, 0, 12),  # 9: A = payload bytes 4..7
        (BPF_JMP | BPF_JEQ | BPF_K, 0, to_reject(10), STUN_COOKIE),  # 10: the magic cookie
        # The STUN length field + 20 (its header) + 8 (UDP's) must be the UDP length: a WireGuard message
        # has zeros there (its reserved bytes), so one whose random index equals the cookie still fails.
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 10),  # 11: A = STUN message length
        (BPF_ALU | BPF_ADD | BPF_K, 0, 0, 28),  # 12
        (BPF_ST, 0, 0, 0),  # 13: M[0] = A
        (BPF_LD | BPF_H | BPF_IND, 0, 0, 4),  # 14: A = UDP length
        (BPF_LDX | BPF_W | BPF_MEM, 0, 0, 0),  # 15: X = M[0] (the header offset is not needed any more)
        (BPF_JMP | BPF_JEQ | BPF_X, 0, to_reject(16), 0),  # 16
        (BPF_RET | BPF_K, 0, 0, SNAPLEN),  # 17: accept the whole packet
        (BPF_RET | BPF_K, 0, 0, 0),  # 18: reject
    ]


def bpf_program6(port: int) -> list[Insn]:
    """The same filter for the IPv6 raw socket, which sees the packet from the UDP header on."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a UDP port")
    reject = 13

    def to_reject(i: int) -> int:
        return reject - (i + 1)

    return [
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 2),  # 0: A = UDP destination port
        (BPF_JMP | BPF_JEQ | BPF_K, 0, to_reject(1), port),  # 1
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, 8),  # 2: A = first payload byte
        (BPF_JMP | BPF_JSET | BPF_K, to_reject(3), 0, 0xC0),  # 3: STUN's top two bits are zero
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, 12),  # 4: A = payload bytes 4..7
        (BPF_JMP | BPF_JEQ | BPF_K, 0, to_reject(5), STUN_COOKIE),  # 5: the magic cookie
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 10),  # 6: A = STUN message length
        (BPF_ALU | BPF_ADD | BPF_K, 0, 0, 28),  # 7: + STUN header + UDP header
        (BPF_ST, 0, 0, 0),  # 8: M[0] = A
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, 4),  # 9: A = UDP length
        (BPF_LDX | BPF_W | BPF_MEM, 0, 0, 0),  # 10: X = M[0]
        (BPF_JMP | BPF_JEQ | BPF_X, 0, to_reject(11), 0),  # 11
        (BPF_RET | BPF_K, 0, 0, SNAPLEN),  # 12: accept
        (BPF_RET | BPF_K, 0, 0, 0),  # 13: reject
    ]


def pack_filter(prog: list[Insn]) -> bytes:
    """The ``struct sock_filter`` array (host byte order, as the kernel reads it)."""
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def run_filter(prog: list[Insn], packet: bytes) -> int:
    """A tiny classic-BPF interpreter for the instructions we use: what the kernel's would return.

    For tests (the filter is checked against real packets without a socket) and nothing else. Loads past
    the packet's end reject, as in the kernel.
    """
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(len(prog) + 1):  # no backward jumps in classic BPF: at most one pass
        code, jt, jf, k = prog[pc]
        cls = code & 0x07
        mode = code & 0xE0
        pc += 1
        if cls == BPF_RET:
            return k
        if cls == BPF_LDX and mode == BPF_MSH:
            if k >= len(packet):
                return 0
            x = 4 * (packet[k] & 0x0F)
        elif cls == BPF_LDX and mode == BPF_MEM:
            x = mem[k]
        elif cls == BPF_LD and mode in (BPF_ABS, BPF_IND):
            size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[code & 0x18]
            off = k + (x if mode == BPF_IND else 0)
            if off + size > len(packet):
                return 0
            a = int.from_bytes(packet[off : off + size], "big")
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_ALU and code & 0xF0 == BPF_ADD:
            a = (a + (x if code & BPF_X else k)) & 0xFFFFFFFF
        elif cls == BPF_JMP and code & 0xF0 in (BPF_JEQ, BPF_JSET):
            operand = x if code & BPF_X else k
            hit = (a == operand) if code & 0xF0 == BPF_JEQ else bool(a & operand)
            pc += jt if hit else jf
        else:
            raise ValueError(f"opcode {code:#x} not supported by this interpreter")
    raise ValueError("filter did not return")


def udp_checksum(src_ip: str, dst_ip: str, segment: bytes) -> int:
    """RFC 768 checksum of a UDP ``segment`` (header with checksum 0, then payload); over IPv6 with
    RFC 8200 §8.1's pseudo-header (the kernel computes that one for our IPv6 socket: used by tests)."""
    if ":" in dst_ip:
        pseudo = (
            socket.inet_pton(socket.AF_INET6, src_ip)
            + socket.inet_pton(socket.AF_INET6, dst_ip)
            + struct.pack("!I3xB", len(segment), 17)
        )
    else:
        pseudo = (
            socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, 17, len(segment))
        )
    data = pseudo + segment
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    csum = ~total & 0xFFFF
    return csum or 0xFFFF  # RFC 768: a computed zero is sent as all ones (zero means "none")


def build_udp(src_port: int, dst_port: int, payload: bytes, src_ip: str | None, dst_ip: str) -> bytes:
    """A UDP header + ``payload``; checksum computed when ``src_ip`` is known, else 0 (IPv4: none)."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP payload of {len(payload)} bytes does not fit a datagram")
    segment = struct.pack("!HHHH", src_port, dst_port, length, 0) + payload
    if src_ip is None:
        return segment
    csum = udp_checksum(src_ip, dst_ip, segment)
    return segment[:6] + struct.pack("!H", csum) + segment[8:]


@dataclass(frozen=True)
class Datagram:
    """One received IPv4 UDP datagram."""

    src: HostPort
    dst: HostPort
    payload: bytes


def parse_ipv4_udp(packet: bytes) -> Datagram | None:
    """An IPv4 packet as a raw socket returns it (from the IP header on) -> its UDP datagram, or None."""
    if len(packet) < 28 or packet[0] >> 4 != 4:
        return None
    ihl = 4 * (packet[0] & 0x0F)
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total > len(packet) or total < ihl + 8 or packet[9] != socket.IPPROTO_UDP:
        return None
    if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
        return None  # not the first fragment
    sport, dport, ulen = struct.unpack_from("!HHH", packet, ihl)
    if ulen < 8 or ihl + ulen > total:
        return None
    src = socket.inet_ntoa(packet[12:16])
    dst = socket.inet_ntoa(packet[16:20])
    return Datagram((src, sport), (dst, dport), packet[ihl + 8 : ihl + ulen])


def parse_udp(segment: bytes, src_ip: str, dst_ip: str = "::") -> Datagram | None:
    """A UDP segment as a raw IPv6 socket returns it (from the UDP header on) -> its datagram, or None."""
    if len(segment) < 8:
        return None
    sport, dport, ulen = struct.unpack_from("!HHH", segment)
    if ulen < 8 or ulen > len(segment):
        return None
    return Datagram((src_ip, sport), (dst_ip, dport), segment[8:ulen])


def _attach(sock: socket.socket, prog: list[Insn]) -> None:
    raw = pack_filter(prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } with native alignment.
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies buf before returning


IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)  # linux/in6.h


class SharedSocket:
    """The raw sockets on WireGuard's ``port``: ``on_datagram`` gets each STUN datagram sent to it.

    The IPv4 socket is required (OSError when it cannot be opened); the IPv6 one is opened alongside when
    the host has IPv6, else ``families`` is ``{4}`` and sends to IPv6 addresses fail (counted).
    """

    def __init__(self, port: int, on_datagram: Callable[[Datagram], None]) -> None:
        self.port = port
        self.on_datagram = on_datagram
        self.counters: Counter[str] = Counter()
        self._sources: dict[str, tuple[str | None, float]] = {}
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._open()

    @classmethod
    def open(cls, port: int, on_datagram: Callable[[Datagram], None]) -> SharedSocket:
        """Open it (needs a running loop); OSError: EPERM without CAP_NET_RAW, EINVAL for a bad port."""
        return cls(port, on_datagram)

    def _open(self) -> None:
        if not 0 < self.port < 65536:  # callers handle OSError ("no shared port"), so a bad port is one too
            raise OSError(errno.EINVAL, f"WireGuard port {self.port} is not a UDP port")
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        try:
            _attach(sock, bpf_program(self.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._readable, sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        try:
            sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except OSError as exc:  # no IPv6 in this kernel or namespace: IPv4 only
            log.info("no IPv6 raw socket on WireGuard's port %d (%s): IPv4 paths only", self.port, exc)
            return
        try:
            _attach(sock6, bpf_program6(self.port))
            # RFC 8200 §8.1: UDP over IPv6 must carry a checksum; the kernel fills it in at offset 6.
            sock6.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
            sock6.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock6.setblocking(False)
            self._loop.add_reader(sock6.fileno(), self._readable, sock6)
        except OSError as exc:
            sock6.close()
            log.info("IPv6 raw socket on port %d unusable (%s): IPv4 paths only", self.port, exc)
            return
        self._sock6 = sock6

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def families(self) -> frozenset[int]:
        """The IP versions this port can send and receive on now."""
        return frozenset(v for v, s in ((4, self._sock), (6, self._sock6)) if s is not None)

    def reopen(self, port: int) -> None:
        """WireGuard's listen port changed: filter and send for ``port`` from now on."""
        self.close()
        self.port = port
        self._open()

    def close(self) -> None:
        """Stop reading and close the sockets (idempotent)."""
        socks = (self._sock, self._sock6)
        self._sock = self._sock6 = None
        for sock in socks:
            if sock is not None:
                with contextlib.suppress(ValueError, RuntimeError):  # loop already closed: nothing to remove
                    self._loop.remove_reader(sock.fileno())
                sock.close()

    def _readable(self, sock: socket.socket) -> None:
        v6 = sock.family == socket.AF_INET6
        for _ in range(BATCH):
            if sock not in (self._sock, self._sock6):
                return  # closed (or reopened) by a callback
            try:
                packet, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.counters["recv_errors"] += 1
                log.debug("raw socket recv on port %d failed: %s", self.port, exc)
                return
            dg = parse_udp(packet, str(addr[0]).split("%", 1)[0]) if v6 else parse_ipv4_udp(packet)
            if dg is None or dg.dst[1] != self.port or not is_stun(dg.payload):
                self.counters["filtered"] += 1  # queued before the filter was attached, or not UDP
                continue
            self.counters["received"] += 1
            try:
                self.on_datagram(dg)
            except Exception:  # the reader must survive any handler bug; it is counted and logged
                self.counters["handler_errors"] += 1
                log.exception("handler for STUN on port %d failed", self.port)

    def _source_for(self, dst_ip: str) -> str | None:
        now = time.monotonic()
        hit = self._sources.get(dst_ip)
        if hit is not None and hit[1] > now:
            return hit[0]
        src: str | None = None
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((dst_ip, 9))  # a route lookup only: connect() on UDP sends nothing
            src = probe.getsockname()[0]
        except OSError:
            src = None  # no route: the send below fails too and says so
        finally:
            probe.close()
        if len(self._sources) >= SOURCE_CACHE_MAX:
            self._sources.clear()
        self._sources[dst_ip] = (src, now + SOURCE_TTL)
        return src

    def sendto(self, payload: bytes, dst: HostPort) -> bool:
        """Send ``payload`` to ``dst`` (IPv4 or IPv6) from WireGuard's port; False when it was not sent."""
        if self._sock is None:
            self.counters["send_closed"] += 1
            return False
        ip = ipaddress.ip_address(dst[0])
        if ip.version == 6:
            sock6 = self._sock6
            if sock6 is None:
                self.counters["send_no_ipv6"] += 1
                return False
            # The kernel computes the checksum (IPV6_CHECKSUM) with the source it picks.
            segment = build_udp(self.port, dst[1], payload, None, dst[0])
            target: tuple[str, int] | tuple[str, int, int, int] = (dst[0], 0, 0, 0)
            sock = sock6
        else:
            segment = build_udp(self.port, dst[1], payload, self._source_for(dst[0]), dst[0])
            target = (dst[0], 0)  # the port of a raw socket's address is unused
            sock = self._sock
        try:
            sock.sendto(segment, target)
        except OSError as exc:  # full buffer (EAGAIN), no route, ...: UDP semantics, the caller retries
            self.counters["send_errors"] += 1
            log.debug("send from port %d to %s:%d failed: %s", self.port, dst[0], dst[1], exc)
            return False
        self.counters["sent"] += 1
        return True
