"""Importing a module on a worker thread ahead of its first use, while the event loop waits on the network.

A library that takes a tenth of a second to import and that the node is about to need (pyroute2 once
WireGuard comes up) would otherwise be imported on the path to the first packet, by whichever call
needs it first. :func:`preload` starts the import on the loop's default executor and returns at once;
the first real use then finds the module in ``sys.modules``, or waits on Python's import lock for the
rest of it. A failed preload is dropped silently: the same ImportError is raised by the real import, at
the place that needs the module.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from types import ModuleType


def preload(name: str) -> None:
    """Import module ``name`` on a worker thread, unless it is loaded already. Call from the loop."""
    if name in sys.modules:
        return
    future = asyncio.get_running_loop().run_in_executor(None, importlib.import_module, name)
    future.add_done_callback(_consume)


def _consume(future: asyncio.Future[ModuleType]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failure is the real import's to report
