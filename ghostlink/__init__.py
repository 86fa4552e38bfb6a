"""ghostlink: the node agent (joins, programs WireGuard, addresses and routes, serves ghostctl locally)."""
