"""ghostlink: the node agent of a ghost* mesh.

It joins a ghostmesh (pre-auth key or OIDC login), keeps the node's map in sync and turns it into WireGuard
peers, interface addresses and routes, an nftables filter, forwarding and exit-node routing; reaches every
peer directly through NATs when a connectivity check finds a path and through ghostgate relays otherwise;
rotates its key without losing a packet; and answers ghostctl on a local socket. Its parts:

* ``app``: the command line (arguments, config, logging, exit codes); ``node``: the join / run flows and
  the wiring of the parts below;
* ``daemon``: the reconcile loop (map -> plan -> WireGuard and the net layer), status reports, and the
  narrow API ``localapi`` and ``rotate`` use;
* ``client``: the Coordination RPCs; ``nodekey``: the one holder of the node's private key;
* ``engine`` (pure): NetMap -> desired state -> plan of differences;
* ``wg/``: WireGuard backends (kernel, wireguard-go over UAPI, an in-memory fake) and the UAPI codec;
* ``net``: addresses and routes; ``nft``: the packet filter; ``forwarding``, ``exitroute``: routing for
  and through other nodes;
* ``traversal/``: NAT traversal and the relayed path (pure cores for path choice, STUN and the proxy's
  routing, and their socket edges);
* ``rotate``: zero-loss key rotation; ``localapi``: the LocalNode service for ghostctl;
  ``state``: the state directory (its files written and checked by ``ghostcore.files``); ``config``: the
  config schema;
* ``hostjournal``: what a run changed on the host, written before each change; ``leftovers``: undoing,
  at the next start, what a run that did not stop cleanly left.
"""

import os

# ghostlink forks exactly one kind of child, wireguard-go, which execs at once and never touches gRPC, so
# gRPC's fork handlers have nothing to protect; with them on, every spawn while a channel is busy logged
# "Other threads are currently calling into gRPC, skipping fork() handlers". gRPC reads this variable when
# it is first imported, which is why it is set here, before any module of ours imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
