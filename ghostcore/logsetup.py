"""Logging for the daemons: the ``[log]`` config table, and handlers (text or one JSON object per line)
that only ``app`` modules install.

Library modules only ``logging.getLogger(__name__)`` and pass context through ``extra={"node": ..., "peer":
...}``; these formatters append that context. Nothing here ever sees a secret because nothing logs one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass

from ghostcore.errors import ConfigError

_CONTEXT_KEYS = ("node", "peer", "session", "user", "method")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LogConfig:
    """The ``[log]`` table every program's config has."""

    level: str = "info"
    format: str = "text"

    def __post_init__(self) -> None:
        if self.level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log.level: expected one of {', '.join(LOG_LEVELS)}, got {self.level!r}")
        if self.format not in LOG_FORMATS:
            raise ConfigError(f"log.format: expected one of {', '.join(LOG_FORMATS)}, got {self.format!r}")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT_KEYS if hasattr(record, k))
        return f"{base} {ctx}" if ctx else base


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in _CONTEXT_KEYS:
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# Libraries' own chatter (grpc at INFO, every netlink message pyroute2 sees at DEBUG, aioice's every TURN
# channel bind, aioquic's every connection event, SSDP traffic, asyncio's selector per pyroute2 call) drowns
# ours: below WARNING they are dropped at the handler. A filter, not a logger level, because importing
# pyroute2 resets its logger's level.
QUIET_LIBRARIES = ("grpc", "pyroute2", "aioice", "quic", "async_upnp_client", "asyncio")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in QUIET_LIBRARIES)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QuietLibraries())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
