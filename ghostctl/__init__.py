"""ghostctl: one CLI for every role (node status and peers; users, nodes, auth keys, API keys)."""
