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


class ProtocolError(GhostError):
    """The peer violated the wire contract."""
