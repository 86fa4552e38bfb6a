"""Relay maps: the ``RelayMap`` each node gets in its map stream (regions + its own credentials). PURE.

ghostmesh shares one secret with every relay region (``relay.secret``; the ghostgates' ``turn.secret``),
so a relay checks a node's credentials without asking ghostmesh and without a user table:

* TURN (RFC 8656) with TURN REST credentials (draft-uberti-behave-turn-rest-00 §2.2): username
  ``"<expiry>:<node id>"``, password ``base64(HMAC-SHA1(secret, username))`` (:mod:`ghostcore.turnrest`, the
  maths ghostgate checks with; coturn's ``use-auth-secret`` accepts the same);
* the QUIC / TLS-stream relay: ``relay_token = HMAC-SHA256(secret, "ghostrelay-v1\\n" node key "\\n" expiry)``
  (:func:`ghostcore.relaywire.token_mac`). It is bound to the node key, so a node's key rotation needs a
  fresh token, and the node only ever proves possession of it over a relay's fresh challenge, together
  with possession of the node key's private half, against the relays' static X25519 key whose public half
  is in the map (``relay_static_key``, derived from the secret: :func:`ghostcore.relaywire.relay_static_key`).

Each region also carries the pin of its relay certificate (``tls_pin``): the region's configured
``tls_pin`` for a gate with its own certificate, else the pin of the key every gate derives from the
secret (:func:`ghostcore.relaywire.relay_tls_seed`), so nodes refuse a relay that is not one of ours.

Both expire at ``expires_unix = now + relay.credential_lifetime``. :meth:`RelayMinter.refresh_at` says when
the mapper re-mints them for a stream (at 40% of the lifetime, so a node always holds credentials with more
than half their life left), which keeps a node's credentials valid for as long as its stream lives without
any request from the node. Refreshes due within :attr:`RelayMinter.slack` of each other are done in one
timer round, and the hub's timer never sleeps longer than the slack, so a refresh happens between 35% and
45% of the lifetime (plus the stream's ``mapper.batch_delay``), and the timer wakes about once a minute
at most, however many streams there are. The regions part is built once; minting is two HMACs and a
message copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ghostcore import tlscert
from ghostcore.joinkey import parse_pin
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostcore.relaywire import relay_static_key, relay_tls_seed, token_mac
from ghostcore.turnrest import rest_password, rest_username
from ghostmesh.config import RelayConfig

REFRESH_FRACTION = 0.4  # re-mint once this share of the lifetime has passed (before half is left)
SLACK_FRACTION = 0.05  # refreshes run up to this share of the lifetime early or late (batching, timer)
MAX_SLACK = 60.0


@dataclass(frozen=True)
class RelayMinter:
    """Mints ``RelayMap`` messages for nodes from the configured regions and the shared secret."""

    template: pb.RelayMap  # regions and fallback; never mutated after construction
    secret: bytes = field(repr=False)
    lifetime: float  # seconds the minted credentials stay valid

    @classmethod
    def from_config(cls, cfg: RelayConfig, secret: bytes) -> RelayMinter:
        """From a validated ``[relay]`` table and its secret (:meth:`RelayConfig.secret_bytes`)."""
        derived_pin = tlscert.key_pin(tlscert.derived_key(relay_tls_seed(secret)))
        template = pb.RelayMap(
            regions=[
                pb.RelayRegion(
                    id=r.id,
                    name=r.name,
                    host=r.host,
                    stun_port=r.stun_port,
                    quic_port=r.quic_port,
                    tcp_port=r.tcp_port,
                    turn=r.turn,
                    tls_pin=parse_pin(r.tls_pin) if r.tls_pin else derived_pin,
                )
                for r in cfg.region_list()
            ],
            fallback=list(cfg.fallback),
            relay_static_key=relay_static_key(secret).public_key().raw,
        )
        return cls(template, secret, cfg.credential_lifetime)

    @property
    def region_ids(self) -> frozenset[int]:
        return frozenset(r.id for r in self.template.regions)

    def mint(self, node_id: int, node_key: str, now: float) -> pb.RelayMap:
        """The relay map for node ``node_id`` holding ``node_key`` (base64), valid until now + lifetime."""
        expiry = int(now + self.lifetime)
        username = rest_username(expiry, str(node_id))
        out = pb.RelayMap()
        out.CopyFrom(self.template)
        out.turn_username = username
        out.turn_password = rest_password(self.secret, username)
        out.expires_unix = expiry
        out.relay_token = token_mac(self.secret, node_key, expiry)
        return out

    @property
    def slack(self) -> float:
        """How early a refresh may be batched with another, and how late the hub's timer may notice one."""
        return min(MAX_SLACK, self.lifetime * SLACK_FRACTION)

    def refresh_at(self, expires_unix: int) -> float:
        """When credentials expiring at ``expires_unix`` are re-minted: after 40% of their lifetime."""
        return expires_unix - self.lifetime * (1.0 - REFRESH_FRACTION)
