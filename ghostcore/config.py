"""Config loading for every ghost* program: TOML -> frozen dataclasses, strictly.

Each program declares its config as nested frozen dataclasses (one per TOML table). ``load`` reads the
file with ``tomllib``, rejects unknown keys and wrong types with the key path in
the message (``server.bind: expected host:port, got "x"``), and applies the precedence
defaults < file < environment < flags. Environment names are derived from the schema: prefix, table and
key upper-cased and joined by ``_`` (``GHOSTMESH_SERVER_BIND``). Flags are passed in as a dotted-path dict
by the program's CLI.

Field types understood: ``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``dict[str, list[str]]``
(a table of string lists), nested dataclasses, and
durations: a ``float`` field with ``metadata={"duration": True}`` takes ``"90s"``, ``"1h30m"``, ``"50ms"``,
``"180d"`` or a number of seconds. Validators beyond types live in each schema's ``__post_init__`` and
raise ``ConfigError`` naming their key path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tomllib  # stdlib since 3.11, our floor; tomli is the same parser for older Pythons we don't support
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ghostcore import addr
from ghostcore.errors import ConfigError

T = TypeVar("T")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_hostport(text: str, where: str, *, ip_only: bool = False) -> tuple[str, int]:
    """``"0.0.0.0:7777"`` / ``"[::]:7777"`` / ``"host:7777"`` -> (host, port); ConfigError naming ``where``.

    The rules are :func:`ghostcore.addr.split_hostport`'s (an IPv6 address in brackets, no zone ID, port
    0..65535); ``ip_only`` refuses host names (a socket to bind, a relay address).
    """
    try:
        return addr.split_hostport(text, "address", ip_only=ip_only)
    except addr.AddressError as exc:
        raise ConfigError(exc.for_key(where)) from None


# The relay path kinds, in the spec's order: ghostgate's relay.fallback and ghostmesh's (sent to nodes).
FALLBACK_KINDS = ("ice", "turn", "stun")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]`` of ghostmesh and ghostgate: where ``/metrics``, ``/healthz`` and ``/readyz`` are served
    (:mod:`ghostcore.metrics_http`); empty ``listen``: not served. An IP, not a name: it is a socket to bind,
    and it should be a private one (the pages need no credentials)."""

    listen: str = ""  # e.g. "127.0.0.1:9090"

    def __post_init__(self) -> None:
        check_metrics_listen(self.listen, "metrics.listen")


def check_metrics_listen(text: str, where: str) -> None:
    """Empty (off) or ``ip:port``; ConfigError naming ``where``."""
    if text:
        parse_hostport(text, where, ip_only=True)


def check_fallback(items: list[str], where: str) -> None:
    """A relay ``fallback`` list: known kinds, each at most once (ConfigError naming ``where``)."""
    for item in items:
        if item not in FALLBACK_KINDS:
            kinds = ", ".join(FALLBACK_KINDS)
            raise ConfigError(f"{where}: unknown kind {item!r} (expected some of {kinds})")
    if len(set(items)) != len(items):
        raise ConfigError(f"{where}: each kind at most once, got {items!r}")


def parse_duration(text: str | int | float, where: str = "duration") -> float:
    """``"1h30m"`` -> 5400.0 seconds. Bare numbers are seconds. Raises ConfigError naming ``where``."""
    if isinstance(text, bool):
        raise ConfigError(f'{where}: expected a duration like "30s", "5m", "1h", got {text!r}')
    if isinstance(text, int | float):
        if text < 0:
            raise ConfigError(f"{where}: a duration cannot be negative, got {text}")
        return float(text)
    s = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ConfigError(f'{where}: expected a duration like "30s", "5m", "1h30m", "180d", got {text!r}')
    return total


def duration(default: float) -> Any:
    """A dataclass field holding seconds that TOML may write as ``"30s"``."""
    return dataclasses.field(default=default, metadata={"duration": True})


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str, *, is_duration: bool, from_env: bool) -> Any:
    if is_duration:
        return parse_duration(value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}")
        return list(value)
    if origin is dict:  # only dict[str, list[str]]: a TOML table of string lists (dns.split)
        if from_env and isinstance(value, str):
            raise ConfigError(f"{where}: a table cannot be set from the environment; use the config file")
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of string lists, got {value!r}")
        return {k: list(v) for k, v in value.items()}
    if tp is bool:
        if from_env and isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if from_env and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if from_env and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a schema bug, caught by tests


def build(cls: type[T], data: Mapping[str, Any], path: str = "", *, from_env: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys; errors name the key path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<top>'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else key
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}: unknown key (known here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = f"{path}.{name}" if path else name
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = build(tp, data[name], where, from_env=from_env)
        else:
            kwargs[name] = _convert(
                data[name], tp, where, is_duration=bool(f.metadata.get("duration")), from_env=from_env
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or '<top>'}: {exc}") from None


def env_overrides(cls: type[Any], prefix: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict of the values set in ``environ`` for ``cls``'s leaves (``PREFIX_TABLE_KEY``)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}_{f.name.upper()}"
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            sub = env_overrides(tp, name, environ)
            if sub:
                out[f.name] = sub
        elif name in environ:
            out[f.name] = environ[name]
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass --config with an existing file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read config file (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 (TOML 1.0, "Spec")
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load(
    cls: type[T],
    path: Path | None,
    *,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> T:
    """defaults < file < environment < flags. ``flags`` maps dotted key paths to values (None = unset)."""
    file_data = read_toml(path) if path is not None else {}
    try:
        build(cls, file_data)  # validate the file alone first so its errors name the file's keys
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    env_data = env_overrides(cls, env_prefix, environ or {})
    try:
        build(cls, env_data, from_env=True)
    except ConfigError as exc:
        raise ConfigError(f"environment ({env_prefix}_*): {exc}") from None
    merged = _merge(_merge(file_data, env_data), _nest(flags or {}))
    return build(cls, merged, from_env=True)
