"""The open-file limit a daemon needs for the limits it was configured with.

Every TURN allocation holds a UDP socket, every relay or gRPC connection a socket; a common soft limit of
1024 descriptors would fail long before the configured limits do, with EMFILE at some unlucky accept. So a
daemon computes what its limits need and calls :func:`ensure_open_files` at start: the soft limit is raised
to that (up to the hard limit, which an unprivileged process may not exceed), and when even the hard limit
is lower the start is refused with one line naming the numbers, not left to fail later.
"""

from __future__ import annotations

import resource

from ghostcore.errors import ConfigError


def ensure_open_files(needed: int, what: str) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``needed`` if it is lower; the soft limit now in force.

    ``what`` says which settings need it (for the error). ConfigError if the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"the open-file limit is {hard} (hard), below the {needed} that {what} need; raise it "
            "(LimitNOFILE= in the service unit, or ulimit -Hn) or lower those limits"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed
