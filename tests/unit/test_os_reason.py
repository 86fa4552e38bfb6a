"""ghostcore.errors.os_reason: one line from an OSError, also uvloop's bare wrapper around the real one."""

from __future__ import annotations

import errno

from ghostcore.errors import os_reason


def test_plain_oserror_gives_strerror_and_errno_name() -> None:
    assert os_reason(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "Address already in use (EADDRINUSE)"
    )


def test_uvloop_style_wrapper_is_read_through_its_cause() -> None:
    wrapper = OSError("could not bind to local_addr ('127.0.0.1', 3479)")
    wrapper.__cause__ = OSError(errno.EADDRINUSE, "Address already in use")
    assert wrapper.strerror is None  # what made the message end in ": None"
    assert os_reason(wrapper) == "Address already in use (EADDRINUSE)"


def test_errno_without_strerror_is_named_by_the_os() -> None:
    exc = OSError()
    exc.errno = errno.EACCES
    assert os_reason(exc).endswith("(EACCES)")
    assert "None" not in os_reason(exc)


def test_no_errno_anywhere_gives_the_message() -> None:
    assert os_reason(OSError("could not bind")) == "could not bind"
