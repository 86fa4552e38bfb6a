"""ghostlink: the node agent (joins, programs WireGuard, addresses and routes, serves ghostctl locally)."""

import os

# ghostlink forks exactly one kind of child, wireguard-go, which execs at once and never touches gRPC, so
# gRPC's fork handlers have nothing to protect; with them on, every spawn while a channel is busy logged
# "Other threads are currently calling into gRPC, skipping fork() handlers". gRPC reads this variable when
# it is first imported, which is why it is set here, before any module of ours imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
