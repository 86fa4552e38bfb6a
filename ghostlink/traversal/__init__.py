"""NAT traversal: how WireGuard reaches each peer, directly when a check finds a path, else relayed.

The daemon drives one :class:`ghostlink.traversal.edge.Traversal` (through the ``PathLayer`` protocol of
:mod:`ghostlink.daemon`); the rest of the package is behind it. Pure cores (no sockets, no clock; time is
passed in, decisions come out) and their I/O edges:

* ``edge``: the I/O edge the daemon drives: the check loop, STUN, the relay proxy, what to report;
* ``path_core`` (pure): per-peer path choice: relay first, direct on a check, back on silence;
* ``stun_core`` (pure): STUN requests, connectivity checks and their answers, netcheck;
  ``stunport``: its asyncio edge on ``sharedsock``, the raw socket + BPF filter on WireGuard's UDP port;
* ``proxy_core`` (pure): the relayed data path's routing: home region, which relay or TURN a peer's
  packets take, held first handshakes, re-sends after PEER_GONE; ``proxy``: its sockets (one local socket
  per relayed peer), relay connections and TURN allocation;
* ``relayclient``: one authenticated connection to a relay region, over a ``relaylink`` transport (QUIC,
  else TLS over TCP); ``turnclient``: this node's TURN allocation (RFC 8656).

Nothing is imported here, so the daemon can name the pure value types without loading aioquic or the
raw-socket code.
"""
