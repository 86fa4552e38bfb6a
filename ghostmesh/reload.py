"""Re-reading ghostmesh's config file while it runs (on SIGHUP, as Headscale and most daemons do): the I/O
edge of a reload. What a reload may change is ``[dns]``; everything else needs a restart.

:meth:`ConfigReloader.reload` loads the file with the code a start uses (:func:`ghostmesh.config.load_config`
with the same environment and flags on top), so it accepts exactly what a start would accept. Then:

- the file does not load (unreadable, not TOML, an unknown key, a bad value in any table): one warning
  naming the file and the key path; nothing changes (a file that would not start the server does not
  half-apply either); counted as ``refused``;
- tables other than ``[dns]`` differ from what the server started with: one warning naming them, they
  are ignored until a restart (the ``[dns]`` of the same file still applies);
- ``[dns]`` as nodes would get it (:func:`ghostmesh.dnsmap.dns_map`) differs from the settings in force:
  one audit row (``dns.update`` by ``system``, target ``dns``, detail: the keys that changed, never their
  values) commits, then :meth:`ghostmesh.hub.Hub.set_dns` marks every map stream, so each stream's next
  delta carries the new settings and every later full map does too; counted as ``applied``. Otherwise
  ``unchanged``, and nothing is sent.

The counters are ``ghostmesh_config_reloads_total{result}`` (:mod:`ghostmesh.metrics`). A reload runs on
the event loop between two callbacks, so it never interleaves with another transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields

from ghostcore.errors import GhostError
from ghostmesh.audit import ACTOR_SYSTEM, DNS_UPDATE
from ghostmesh.config import MeshConfig
from ghostmesh.dnsmap import dns_changes, dns_map
from ghostmesh.hub import Hub

log = logging.getLogger(__name__)

RESULTS = ("applied", "unchanged", "refused")
DNS_TARGET = "dns"  # the audit target of a reloaded [dns]


class ConfigReloader:
    """Applies what a reload of the config file may change; see the module docstring.

    ``load`` re-reads the file as the start did (None: the server was started without a file, so there
    is nothing to re-read); ``started`` is the config the server runs with.
    """

    def __init__(self, hub: Hub, started: MeshConfig, load: Callable[[], MeshConfig] | None) -> None:
        self._hub = hub
        self._started = started
        self._load = load
        self._dns = started.dns  # the [dns] in force
        self.counts = dict.fromkeys(RESULTS, 0)

    def reload(self) -> str:
        """Re-read the file and apply its ``[dns]``; the result (one of :data:`RESULTS`, or "" when there
        is no file to read)."""
        if self._load is None:
            log.warning("config reload: ghostmesh was started without --config; nothing to re-read")
            return ""
        try:
            cfg = self._load()
        except (GhostError, OSError) as exc:  # OSError: a path the loader does not expect (a directory)
            return self._count("refused", "config reload refused, nothing changed: %s", exc)
        restart = [
            f.name
            for f in fields(MeshConfig)
            if f.name != "dns" and getattr(cfg, f.name) != getattr(self._started, f.name)
        ]
        if restart:
            log.warning(
                "config reload: [%s] changed; ignored until a restart (only [dns] is applied live)",
                "], [".join(restart),
            )
        new = dns_map(cfg.dns)
        if new == dns_map(self._dns):
            return self._count("unchanged", "config reload: [dns] unchanged")
        changed = dns_changes(self._dns, cfg.dns)
        try:
            with self._hub.transaction() as tx:
                tx.record(ACTOR_SYSTEM, DNS_UPDATE, DNS_TARGET, {"changed": changed})
        except GhostError as exc:  # the audit row could not commit: the hub is stopping the server
            return self._count("refused", "config reload: [dns] not applied: %s", exc)
        self._dns = cfg.dns
        woken = self._hub.set_dns(new)
        return self._count(
            "applied",
            "config reload: [dns] applied (%s changed); sent to %d map streams",
            ", ".join(changed),
            woken,
        )

    def _count(self, result: str, msg: str, *args: object) -> str:
        self.counts[result] += 1
        (log.warning if result == "refused" else log.info)(msg, *args)
        return result
