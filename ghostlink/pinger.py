"""ICMP echo through the tunnel, for ``ghostctl ping``: the echo codec (pure functions) and its socket edge.

``ghostctl ping PEER`` must measure a real round trip to the peer, not show a number stored earlier: the
daemon (:meth:`ghostlink.daemon.Daemon.ping`) sends one ICMP (or ICMPv6) echo request to the peer's overlay
address and times the reply. The socket is bound to the WireGuard interface (``SO_BINDTODEVICE``), so the
echo can only travel through the tunnel, whatever path WireGuard takes at that moment (direct, relay or
TURN): if the tunnel does not carry it, there is no answer rather than an answer from somewhere else.

Why ICMP and not a probe of our own (Tailscale's disco ping): every peer already answers ICMP echo in its
kernel, and the ACL policy grants ICMP unless it says otherwise; a peer whose policy refuses ICMP from us
does not answer, and ``ghostctl ping`` says that this may be why. A raw socket is used (ghostlink runs as
root, or with CAP_NET_RAW) rather than an unprivileged ICMP datagram socket, which
``net.ipv4.ping_group_range`` often forbids even to root.

Each echo carries a random identifier and a random token in its payload; only a reply from the pinged
address with the same identifier, sequence number and payload counts (a raw socket sees every ICMP packet
the host receives).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import time

ECHO_REQUEST = {4: 8, 6: 128}  # ICMP type 8, ICMPv6 type 128 (RFC 792, RFC 4443 §4.1)
ECHO_REPLY = {4: 0, 6: 129}
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(version: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An echo request. ICMPv6's checksum covers a pseudo-header only the kernel knows: it is left 0 and
    the kernel fills it in (raw ICMPv6 sockets always do, RFC 3542 §3.1)."""
    head = _HEADER.pack(ECHO_REQUEST[version], 0, 0, ident, seq)
    if version == 6:
        return head + payload
    return _HEADER.pack(ECHO_REQUEST[version], 0, checksum(head + payload), ident, seq) + payload


def parse_echo_reply(version: int, packet: bytes) -> tuple[int, int, bytes] | None:
    """(identifier, sequence, payload) of an echo reply; None for anything else. An IPv4 raw socket hands
    over the IP header too; an ICMPv6 one does not."""
    if version == 4:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < _HEADER.size:
        return None
    kind, code, _sum, ident, seq = _HEADER.unpack_from(packet)
    if kind != ECHO_REPLY[version] or code != 0:
        return None
    return ident, seq, packet[_HEADER.size :]


class IcmpPinger:
    """Echo requests on ``ifname`` through a raw socket per echo (closed after it); see the module
    docstring. :meth:`echo` returns the round trip in seconds, or None when no reply came in time."""

    def __init__(self, ifname: str) -> None:
        self._ifname = ifname
        self._seq = 0

    async def echo(self, address: str, wait: float) -> float | None:
        ip = ipaddress.ip_address(address)
        version = ip.version
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        proto = socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6
        self._seq = (self._seq + 1) & 0xFFFF
        ident, seq, token = int.from_bytes(os.urandom(2)), self._seq, os.urandom(16)
        loop = asyncio.get_running_loop()
        with socket.socket(family, socket.SOCK_RAW, proto) as sock:
            sock.setblocking(False)
            # Only through the tunnel: bound to the interface, the echo cannot leave by another one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self._ifname.encode())
            answered: asyncio.Future[float] = loop.create_future()

            def readable() -> None:
                # add_reader, not loop.sock_recvfrom: ghostlink runs on uvloop, which has no sock_recvfrom
                while not answered.done():
                    try:
                        data, src = sock.recvfrom(65535)
                    except BlockingIOError:
                        return
                    except OSError as exc:
                        answered.set_exception(exc)
                        return
                    with contextlib.suppress(ValueError):
                        mine = parse_echo_reply(version, data) == (ident, seq, token)
                        if mine and ipaddress.ip_address(src[0]) == ip:
                            answered.set_result(time.monotonic())

            loop.add_reader(sock.fileno(), readable)
            try:
                start = time.monotonic()
                # A raw socket's send does not wait for room: it queues the packet or fails (OSError).
                sock.sendto(echo_request(version, ident, seq, token), (str(ip), 0))
                try:
                    async with asyncio.timeout(wait):
                        return await answered - start
                except TimeoutError:
                    return None
            finally:
                loop.remove_reader(sock.fileno())
