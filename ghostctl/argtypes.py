"""argparse ``type=`` converters shared by the command groups; a bad value is a usage error (exit 2)."""

from __future__ import annotations

import argparse
import re

from ghostcore.config import parse_duration
from ghostcore.errors import ConfigError

_TAG_RE = re.compile(r"^tag:[a-z0-9][a-z0-9-]{0,62}$")


def duration_arg(text: str) -> int:
    """``"1h"``, ``"90d"``, ``"1h30m"`` or seconds -> whole seconds (``ghostcore.config.parse_duration``)."""
    try:
        # parse_duration takes bare numbers only as numbers, not strings; a CLI gets strings.
        seconds = parse_duration(float(text) if text.strip().isdigit() else text, "duration")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("duration: ")) from None
    return round(seconds)


def tags_arg(text: str) -> list[str]:
    """``"tag:a,tag:b"`` -> ``["tag:a", "tag:b"]``; each must look like ``tag:name`` (lower case)."""
    tags = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tags if not _TAG_RE.match(t)]
    if not tags or bad:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated tags like tag:web,tag:db, got {', '.join(bad) or repr(text)}"
        )
    return tags
