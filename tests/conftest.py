"""Fixtures every test layer shares.

``_root_logging_restored``: a test that runs a program's ``main()`` in this process lets it configure logging
(:func:`ghostcore.logsetup.configure` replaces the root logger's handlers with one writing to the
``sys.stderr`` of that moment, which under pytest is the test's capture file). Left in place, that handler
writes to a closed file in every later test, and the "--- Logging error ---" it prints fails tests that
check stderr for tracebacks, depending only on which tests ran before. After each test the handlers it
added are removed and the root level is restored; pytest's own capture handlers, which pytest adds and
removes around every phase, are left to pytest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler).__module__ != "_pytest.logging":
            root.removeHandler(handler)
    root.setLevel(level)
