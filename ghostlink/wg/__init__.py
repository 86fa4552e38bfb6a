"""WireGuard backends: the Protocol (``base``), the UAPI codec and client, wireguard-go, kernel, fake."""
