"""The one place in ghostctl that turns a failure into a one-line message and an exit code.

Every command raises a ``ghostcore.errors.GhostError`` (RPC failures are converted with
``ghostcore.grpcerr.from_rpc_error`` by ``rpc_failure``); ``cli.main`` prints ``ghostctl: <message>`` on
stderr and returns the exit code below. Never a traceback, never a secret: ``redact`` removes the API key
from any text before it is printed.

Exit codes::

    0  success
    1  generic failure (server-side error, config precondition, protocol error, anything unexpected)
    2  usage: bad flags or arguments (argparse), or the server rejected the input (InvalidArgument)
    3  authentication or permission: missing/wrong/expired API key, not root for a root-only socket
    4  not found: the user, node or key named does not exist
    5  unavailable: the socket/server cannot be reached or timed out (retrying may help)
    6  conflict: the thing exists already
    7  verification failed: ``audit verify`` found the log edited, truncated or signed by another key
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import grpc

from ghostcore import errors as e
from ghostcore.grpcerr import from_rpc_error

EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_CONFLICT = 6
EXIT_VERIFY = 7
EXIT_INTERRUPTED = 130


class VerifyFailed(e.GhostError):
    """A check ghostctl ran itself failed (``audit verify``): the data is not what it must be."""


_EXIT_FOR: tuple[tuple[type[e.GhostError], int], ...] = (
    (VerifyFailed, EXIT_VERIFY),
    (e.InvalidArgument, EXIT_USAGE),
    (e.AuthError, EXIT_AUTH),  # PermissionDenied included
    (e.NotFound, EXIT_NOT_FOUND),
    (e.Unavailable, EXIT_UNAVAILABLE),
    (e.Conflict, EXIT_CONFLICT),
)


def exit_code_for(err: BaseException) -> int:
    for cls, code in _EXIT_FOR:
        if isinstance(err, cls):
            return code
    return EXIT_GENERIC


def rpc_failure(exc: grpc.RpcError, target: str, hint: str) -> e.GhostError:
    """The GhostError for a failed call to ``target``; unreachable targets get ``hint`` (what to do)."""
    if hasattr(exc, "code") and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        hint = f"raise --timeout if it is just slow; {hint}"
    return from_rpc_error(exc, target, hint)


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` replaced, so an API key can never reach stderr even if a server echoes it.

    The key part alone (before the ``.sha256:`` pin a handed-out key carries) is redacted too.
    """
    for part in (secret, (secret or "").split(".")[0]):
        if part:
            text = text.replace(part, "<redacted>")
    return " ".join(text.splitlines()).strip()
