"""IP protocols as a policy names them and as a packet filter carries them. PURE.

Tailscale's policy file (tailscale.com/kb/1337/policy-syntax, "proto") takes a protocol as a name or as
its IANA number (1-255, "Assigned Internet Protocol Numbers"). This module is the one table of those
names, shared by the policy parser (ghostmesh), the filter's enforcement (``ghostlink.nft``) and the
admission of filter rules from a map (``ghostlink.admission``), so the three can never disagree.

A protocol travels in ``FilterRule.protocols`` as its canonical text: the name below when it has one
(``"tcp"``, ``"ipv6-icmp"``), else the decimal number (``"132"`` is written ``"sctp"``; ``"99"`` stays
``"99"``). An empty list means Tailscale's default: TCP, UDP, ICMP and ICMPv6, never "any protocol".

Ports exist for TCP, UDP and SCTP only. As in Tailscale's packet filter (wgengine/filter): ICMP and
ICMPv6 match on addresses alone, and any other protocol matches only a rule that covers every port.
"""

from __future__ import annotations

NUMBERS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
}
NAMES: dict[int, str] = {n: name for name, n in NUMBERS.items() if name != "ip-in-ip"}
DEFAULT: tuple[str, ...] = ("tcp", "udp", "icmp", "ipv6-icmp")  # a rule that names no protocol
WITH_PORTS = frozenset({"tcp", "udp", "sctp"})
PORTLESS_ICMP = frozenset({"icmp", "ipv6-icmp"})  # matched on addresses alone, whatever the ports
ALL_PORTS = (0, 65535)


def canonical(text: str) -> str:
    """``text`` (a name, any case, or a number 1-255) as the canonical protocol text.

    ``ValueError`` with a one-line reason otherwise.
    """
    t = text.strip().lower() if text.isascii() else text
    if t != text.lower() or not t:
        raise ValueError(f'bad protocol "{text[:40]}": use a name such as tcp, udp, icmp or a number 1-255')
    if t in NUMBERS:
        return NAMES[NUMBERS[t]]
    if t.isdigit() and t.isascii():
        n = int(t)
        if 1 <= n <= 255 and str(n) == t:
            return NAMES.get(n, t)
    raise ValueError(
        f'unknown protocol "{text[:40]}": use a number 1-255 or one of {", ".join(sorted(NUMBERS))}'
    )


def number(proto: str) -> int:
    """The IANA number of a canonical protocol text."""
    return NUMBERS[proto] if proto in NUMBERS else int(proto)


def is_canonical(proto: str) -> bool:
    try:
        return canonical(proto) == proto
    except ValueError:
        return False


def effective(protos: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What a rule's protocol list admits: the list, or :data:`DEFAULT` when it is empty."""
    return tuple(protos) if protos else DEFAULT
