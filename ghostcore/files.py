"""How every ghost* daemon writes, reads and places the files that hold its state and secrets (an I/O edge).

- :func:`replace_file`: a new version replaces the file atomically and durably: a temporary file in the same
  directory (born 0600), written and fsynced, renamed over the old one, then the DIRECTORY fsynced. Without
  the last step a crash soon after the rename may bring back the old name, or none (rename(2) changes the
  directory, which only fsync of the directory makes durable).
- :func:`create_private`: a new secret file, born 0600 (``O_EXCL``: never over an existing one), fsynced
  with its directory before anyone relies on it.
- :func:`read_private`: a secret file, refused when its group or others have any permission on it (as ssh
  refuses such a key): a key others may read or write is a key that may be known or swapped.
- :func:`remove_file`: unlink, then fsync the directory (gone already is fine).
- :func:`umask`: a process umask for the duration of a block (files created inside are born private).
- :func:`make_private_dir`: a directory a daemon keeps files in. Missing components are created 0700; a
  directory that exists is never chmodded (it may be shared, or systemd's 0755 ``StateDirectory=``) but is
  refused when another user could add, remove or rename entries in it (group- or world-writable), since
  they could then swap the daemon's files.
- :func:`check_socket_dir`: the rule for a unix socket's directory, where the socket itself (0600, root's)
  is the access control: the directory must be root's, and one that group or others can write to is fine
  only with the sticky bit (``/tmp``), since without it they may delete the socket and put their own in its
  place.

Errors about configured paths are one line (``ConfigError``): the path, what is wrong, what to do, naming
the setting (``flag``) that chose the path.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ghostcore.errors import ConfigError

PRIVATE = 0o600


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename or unlink in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int | None = PRIVATE) -> None:
    """Replace ``path`` with ``data`` atomically and durably (a crash leaves the old file or the new one).

    ``mode``: the new file's mode (0600 unless said); None keeps the mode of the file replaced (0600 when
    there is none). OSError when it cannot be written; the old file is then untouched.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # born 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is None:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, path.stat().st_mode & 0o7777)
        elif mode != PRIVATE:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def create_private(path: Path, data: bytes) -> None:
    """Write a new 0600 file (FileExistsError if ``path`` exists), durable before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def read_private(path: Path, what: str) -> bytes:
    """The bytes of the secret file ``path`` (``what`` names it in errors): ConfigError when it cannot be
    read or when its group or others have any permission on it."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what} {path}: others may read it (mode {st.st_mode & 0o777:o}); chmod 600 it")
    return data


def remove_file(path: Path) -> None:
    """Remove ``path`` (gone already is fine), durably."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def _owned(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _shared(st: os.stat_result) -> bool:
    """Group or world may add, remove or rename entries of the directory ``st`` describes."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _describe(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}"


def make_private_dir(path: Path, what: str, flag: str) -> None:
    """``path`` exists as a directory only its owner (root or us) can change: created 0700 (each missing
    component), or one that exists, left as it is, that no other user can write to. ConfigError (naming
    ``what`` and the ``flag`` choosing it) otherwise."""
    missing: list[Path] = []
    here = path
    # bounded by the path's depth: the walk stops at the first component that exists (at worst "/")
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    try:
        for d in reversed(missing):
            d.mkdir(mode=0o700)
        st = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot create the {what} ({exc.strerror}); choose another {flag}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: the {what} is not a directory; choose another {flag}")
    if not _owned(st) or _shared(st):
        raise ConfigError(
            f"{path}: other users can write to the {what} ({_describe(st)}); "
            f"make it root's and not group/world-writable (chmod go-w) or choose another {flag}"
        )


def check_socket_dir(path: Path, flag: str) -> None:
    """A unix socket's directory: created 0700 when missing; one that exists must be root's (or ours) and
    either writable only by its owner or sticky (as ``/tmp``). ConfigError otherwise."""
    if not path.exists():
        make_private_dir(path, "socket's directory", flag)
        return
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the socket's directory ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: the socket's directory is not a directory; choose another {flag}")
    if not _owned(st) or (_shared(st) and not st.st_mode & stat.S_ISVTX):
        raise ConfigError(
            f"{path}: other users could replace the socket in this directory ({_describe(st)}, not "
            f"sticky); choose another {flag} (in a directory only root can write to, or a sticky one "
            "such as /tmp)"
        )
