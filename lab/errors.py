"""The lab's two exceptions: misuse or a failed setup command, and a bounded wait that ran out of time."""

from __future__ import annotations


class LabError(RuntimeError):
    """The lab was misused (bad name, forbidden address) or a setup command failed."""


class WaitTimeout(AssertionError):
    """A bounded wait (``Lab.wait_for``) ran out of time; an AssertionError: pytest reports a test failure."""
