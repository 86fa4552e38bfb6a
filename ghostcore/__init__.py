"""ghostcore: what every ghost* program shares and none of them owns.

Model-free helpers only: errors, keys, config loading, IP allocation, addresses (``addr``: the one strict
parser), node authentication proofs, node-key signing (``lock``), keys as handed out (``joinkey``), TLS
certificates and pinned channels (``tlscert``, ``tlschannel``), audit chain verification, the relay wire
protocol, its QUIC profile and driver (``relaywire``, ``relayquic``, ``quicdriver``), TURN REST maths,
generated protobuf code (``ghostcore.pb``), gRPC error mapping, logging setup and a few asyncio helpers. It
imports no program package (import-linter enforces it), and its pure modules do no I/O.
"""

__version__ = "0.1.0"
