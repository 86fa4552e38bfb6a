"""ghostgate: a ghost* relay region. STUN and TURN on one UDP port, and a node relay over QUIC and over TLS.

STUN binding (RFC 8489) answers nodes asking for their public address; TURN (RFC 8656 over UDP, TURN REST
credentials) relays for any TURN client; the node relay forwards WireGuard packets between authenticated
nodes by node key (frames and auth: :mod:`ghostcore.relaywire`), over QUIC DATAGRAM frames or over a TLS
byte stream where UDP is blocked. Cores are sans-IO; each edge owns its sockets and drives one core.

Modules:

* :mod:`ghostgate.app`: the ``ghostgate`` command (serve, ``config check``).
* :mod:`ghostgate.config`: ``ghostgate.toml`` as frozen dataclasses; the secret, ports and certificate.
* :mod:`ghostgate.creds`: TURN REST credential maths and stateless nonces (pure).
* :mod:`ghostgate.turn_core`: the STUN / TURN state machine (:class:`~ghostgate.turn_core.TurnCore`, pure).
* :mod:`ghostgate.turn_edge`: its UDP edge (:class:`~ghostgate.turn_edge.TurnEdge`; listen, relayed sockets).
* :mod:`ghostgate.turn_gso`: the TURN edge's batched sends (UDP GSO trains).
* :mod:`ghostgate.relay_core`: the node relay's handshake and routing state machine (pure).
* :mod:`ghostgate.relay_hub`: the core shared by every relay connection, and the ``Edge`` protocol.
* :mod:`ghostgate.quic`, :mod:`ghostgate.stream`: the relay's QUIC and TLS-over-TCP edges.
* :mod:`ghostgate.relay`: starts both relay edges on one hub and closes them.
"""
