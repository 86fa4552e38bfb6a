"""The error hierarchy of ghost*: one root, subclasses by who must react.

::

    GhostError                      anything ghost* raises on purpose
    ├── ConfigError                 the operator must fix a config file, flag or environment variable
    ├── InvalidArgument             the caller sent something malformed (bad key, bad name, bad prefix)
    ├── AuthError                   credentials are missing, wrong, expired or spent
    │   └── PermissionDenied        credentials are fine but do not allow this
    ├── NotFound                    the thing named does not exist
    ├── Conflict                    it exists already / clashes with what exists
    ├── Unavailable                 retry later: a peer or server is down, a resource is exhausted
    └── ProtocolError               the other side broke the wire contract

``ghostcore.grpcerr`` maps these to gRPC status codes and back (the only place that does); ghostctl maps
them to an exit code and a one-line message. Messages say what, where, and what to do, and never carry
secrets.
"""

from __future__ import annotations

import errno
import os


class GhostError(Exception):
    """Root of every deliberate ghost* error. ``str(err)`` is a one-line, secret-free message."""


class ConfigError(GhostError):
    """Configuration is invalid: the message names the key path (``server.bind: ...``)."""


class InvalidArgument(GhostError):
    """Malformed input from a caller."""


class AuthError(GhostError):
    """Missing, wrong, expired or spent credentials."""


class PermissionDenied(AuthError):
    """Authenticated, but not allowed to do this."""


class NotFound(GhostError):
    """The named object does not exist."""


class Conflict(GhostError):
    """The object exists already or clashes with an existing one."""


class Unavailable(GhostError):
    """Transient: a server or peer is unreachable or overloaded; retrying may help."""


class ResourceExhausted(Unavailable):
    """A limit was reached (a quota, a rate): nothing changed; retrying later may work."""


class ProtocolError(GhostError):
    """The peer violated the wire contract."""


def os_reason(exc: BaseException) -> str:
    """One line saying why a system call failed: ``Address already in use (EADDRINUSE)``.

    uvloop raises a bare ``OSError("could not bind to local_addr …")`` (errno and strerror None) with the
    real error as its ``__cause__``, so the chain is searched for the first error carrying an errno;
    without one, the message itself.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            return f"{seen.strerror or os.strerror(seen.errno)} ({name})"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__
