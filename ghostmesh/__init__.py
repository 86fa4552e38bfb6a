"""ghostmesh: the coordination server (users, auth keys, node registry, IP allocation, peer maps, admin)."""
