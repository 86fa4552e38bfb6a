"""ghostgate: the ghost* relay. A STUN binding server and a TURN server (RFC 8489, RFC 8656) on one UDP port.

Layout: :mod:`ghostgate.config` (the ``ghostgate.toml`` schema), :mod:`ghostgate.creds` (TURN REST
credential maths and stateless nonces, pure), :mod:`ghostgate.turn_core` (the sans-IO STUN/TURN state
machine, pure), :mod:`ghostgate.server` (the asyncio UDP edge), :mod:`ghostgate.app` (the command).
"""
