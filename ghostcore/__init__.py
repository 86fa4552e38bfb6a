"""ghostcore: what every ghost* program shares and none of them owns.

Model-free helpers only: errors, keys, config loading, IP allocation, node authentication proofs,
the client-side peer-map model, generated protobuf code (``ghostcore.pb``), gRPC error mapping and a few
asyncio helpers. It imports no program package (import-linter enforces it), and its pure modules do no I/O.
"""

__version__ = "0.1.0"
