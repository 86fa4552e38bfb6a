"""Output formatting for ghostctl: aligned human tables, humanised times and sizes, JSON documents.

Pure functions (no I/O, ``now`` passed in) so unit tests pin every format. Two modes exist:

* ``table`` (default): what a person reads. Times relative ("12s ago", "in 59m", "never"), byte counts
  in binary units ("1.5 KiB"), lists joined with ",", empty cells shown as "-".
* ``json``: one JSON document per invocation (lists are arrays) for scripts. Times appear twice: as
  ``<name>_unix`` (int seconds, 0 meaning never/unset, as on the wire) and ``<name>`` (ISO 8601 UTC, or
  null when unset).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

OUTPUT_MODES = ("table", "json")
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SPANS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns left-aligned, separated by two spaces, no trailing blanks. Empty cells become "-"."""
    cells = [[c if c != "" else "-" for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *cells]
    ]
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """``key:  value`` lines with the values aligned (for one object, e.g. ``ghostctl status``)."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v if v != '' else '-'}".rstrip() for k, v in pairs)


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"; whole bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _BYTE_UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_span(seconds: float) -> str:
    """3725 -> "1h2m": the largest unit plus the next one when it is non-zero; below 1 s -> "0s"."""
    s = int(seconds)
    if s <= 0:
        return "0s"
    parts: list[str] = []
    for unit, size in _SPANS:
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return "".join(parts)


def ago(unix: int, now: float, zero: str = "never") -> str:
    """A past moment relative to ``now``: "12s ago"; ``zero`` when unset (0); "in 5m" if in the future."""
    if unix <= 0:
        return zero
    delta = now - unix
    if delta < 0:
        return f"in {human_span(-delta)}"
    return f"{human_span(delta)} ago"


def until(unix: int, now: float, zero: str = "never") -> str:
    """A deadline relative to ``now``: "in 59m", "expired 3m ago", or ``zero`` when unset (0)."""
    if unix <= 0:
        return zero
    delta = unix - now
    if delta <= 0:
        return f"expired {human_span(-delta)} ago"
    return f"in {human_span(delta)}"


def iso(unix: int) -> str | None:
    """Unix seconds -> ISO 8601 UTC ("2026-11-22T04:37:54Z"); None when unset (0)."""
    if unix <= 0:
        return None
    return dt.datetime.fromtimestamp(unix, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_fields(name: str, unix: int) -> dict[str, Any]:
    """The JSON pair for one timestamp: ``{name}_unix`` and ``{name}`` (ISO or null)."""
    return {f"{name}_unix": int(unix), name: iso(unix)}


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def joined(items: Sequence[str]) -> str:
    return ",".join(items)


def to_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)
