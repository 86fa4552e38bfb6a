"""ghostmesh's relay map: ``[relay]`` config, minted credentials, mapper delivery and refresh, home region.

The credentials are checked with the code the relays use: TURN passwords with ghostgate's ``creds`` maths,
relay tokens by a full challenge / AUTH round through ``ghostcore.relaywire.verify_auth``.
"""

from __future__ import annotations

import base64
import os
from dataclasses import replace
from pathlib import Path

import pytest

from ghostcore import relaywire, tlscert, turnrest
from ghostcore.errors import ConfigError, InvalidArgument
from ghostcore.joinkey import parse_pin
from ghostcore.keys import PrivateKey, PublicKey
from ghostgate import creds
from ghostmesh.changes import NodeAdded, NodeChanged
from ghostmesh.config import RelayConfig, load_config
from ghostmesh.mapper import Mapper
from ghostmesh.relaymap import REFRESH_FRACTION, RelayMinter
from ghostmesh.state import State, StateConfig
from ghostmesh.store.base import NodeRec
from ghostmesh.store.sqlite import SqliteStore

SECRET = "s3cret-relay-shared"
NOW = 1_700_000_000.0
REGIONS = [
    {"id": 1, "name": "fra", "host": "192.0.2.10"},
    {"id": 2, "name": "nyc", "host": "2001:db8::2", "stun_port": 5000, "quic_port": 0, "turn": False},
]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ghostmesh.toml"
    p.write_text(text)
    return p


REGIONS_TOML = """
[[relay.regions]]
id = 1
name = "fra"
host = "192.0.2.10"

[[relay.regions]]
id = 2
name = "nyc"
host = "2001:db8::2"
stun_port = 5000
quic_port = 0
turn = false
"""


def _key() -> tuple[PrivateKey, str]:
    k = PrivateKey.generate()
    return k, k.public_key().base64()


def _minter(lifetime: float = 3600.0) -> RelayMinter:
    cfg = RelayConfig(secret=SECRET, regions=REGIONS, credential_lifetime=lifetime)
    return RelayMinter.from_config(cfg, SECRET.encode())


def _rec(i: int, key: str) -> NodeRec:
    return NodeRec(
        id=i, name=f"n{i}", user="default", node_key=key, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i:x}",
        ephemeral=False, tags=(), created=0.0, expires=0.0, last_seen=0.0, endpoints=(), hostname="h",
        auth_key_id=None,
    )  # fmt: skip


# -- config ------------------------------------------------------------------------------------------


def test_defaults_send_no_relay_map() -> None:
    cfg = load_config(None, environ={})
    assert cfg.relay.regions == []
    assert cfg.relay.credential_lifetime == 86400
    assert cfg.relay.fallback == ["ice", "turn", "stun"]
    assert cfg.relay.secret_bytes() is None  # no regions: nothing minted, no secret needed


def test_regions_load_with_port_defaults(tmp_path: Path) -> None:
    text = f'[relay]\nsecret = "{SECRET}"\ncredential_lifetime = "2h"\nfallback = ["turn", "ice"]\n'
    cfg = load_config(_write(tmp_path, text + REGIONS_TOML), environ={})
    fra, nyc = cfg.relay.region_list()
    assert (fra.id, fra.name, fra.host, fra.stun_port, fra.quic_port, fra.tcp_port, fra.turn) == (
        1, "fra", "192.0.2.10", 3478, 3479, 3478, True,
    )  # fmt: skip
    assert (nyc.host, nyc.stun_port, nyc.quic_port, nyc.tcp_port, nyc.turn) == (
        "2001:db8::2",
        5000,
        0,
        5000,
        False,
    )
    assert cfg.relay.credential_lifetime == 7200
    assert cfg.relay.fallback == ["turn", "ice"]
    assert cfg.relay.secret_bytes() == SECRET.encode()
    assert SECRET not in repr(cfg)
    assert StateConfig.from_mesh(cfg).relay_regions == frozenset({1, 2})


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ('id = 0\nname = "a"\nhost = "192.0.2.1"', r"relay\.regions\[0\]\.id: expected 1\.\."),
        ('id = 1\nname = ""\nhost = "192.0.2.1"', r"relay\.regions\[0\]\.name: must not be empty"),
        ('id = 1\nname = "a"\nhost = "relay.example.com"', r"relay\.regions\[0\]\.host: expected an IP"),
        ('id = 1\nname = "a"\nhost = "192.0.2.1"\nstun_port = 0', r"relay\.regions\[0\]\.stun_port"),
        (
            'id = 1\nname = "a"\nhost = "192.0.2.1"\nstun_port = 65535',
            r"relay\.regions\[0\]\.quic_port.*stun_port",
        ),
        ('id = 1\nname = "a"\nhost = "192.0.2.1"\ntcp_port = 70000', r"relay\.regions\[0\]\.tcp_port"),
        ('id = 1\nname = "a"\nhost = "192.0.2.1"\nport = 1', r"relay\.regions\[0\]\.port: unknown key"),
        ('id = "1"\nname = "a"\nhost = "192.0.2.1"', r"relay\.regions\[0\]\.id: expected an integer"),
    ],
)
def test_bad_region_names_its_key(tmp_path: Path, region: str, message: str) -> None:
    text = f'[relay]\nsecret = "x"\n\n[[relay.regions]]\n{region}\n'
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ('id = 1\nname = "b"\nhost = "192.0.2.2"', r"relay\.regions\[1\]\.id: 1 is used by another region"),
        ('id = 2\nname = "a"\nhost = "192.0.2.2"', r"relay\.regions\[1\]\.name: 'a' is used by another"),
    ],
)
def test_region_ids_and_names_unique(tmp_path: Path, second: str, message: str) -> None:
    text = '[relay]\nsecret = "x"\n[[relay.regions]]\nid = 1\nname = "a"\nhost = "192.0.2.1"\n'
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, f"{text}[[relay.regions]]\n{second}\n"), environ={})


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        ('fallback = ["ice", "derp"]', r"relay\.fallback: unknown kind 'derp'"),
        ('fallback = ["ice", "ice"]', r"relay\.fallback: each kind at most once"),
        ('credential_lifetime = "30s"', r"relay\.credential_lifetime: at least 1m"),
        ('secret = "a"\nsecret_file = "b"', r"relay\.secret_file: set either"),
    ],
)
def test_bad_relay_table(tmp_path: Path, relay: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, f"[relay]\n{relay}\n"), environ={})


def test_regions_without_secret_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"relay\.secret: required") as info:
        load_config(_write(tmp_path, REGIONS_TOML), environ={})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"relay\.secret: required"):
        RelayConfig(regions=REGIONS).secret_bytes()  # a config built in code, as start_server sees it


def test_secret_from_environment_and_file(tmp_path: Path) -> None:
    only_regions = _write(tmp_path, REGIONS_TOML)
    cfg = load_config(only_regions, environ={"GHOSTMESH_RELAY_SECRET": SECRET})
    assert cfg.relay.secret_bytes() == SECRET.encode()
    (tmp_path / "relay.secret").write_text(SECRET + "\n")
    with_file = _write(tmp_path, '[relay]\nsecret_file = "relay.secret"\n' + REGIONS_TOML)
    cfg = load_config(with_file, environ={})
    assert cfg.relay.secret_file == str(tmp_path / "relay.secret")  # relative to the config file
    assert cfg.relay.secret_bytes() == SECRET.encode()
    (tmp_path / "relay.secret").write_text("\n")
    with pytest.raises(ConfigError, match=r"relay\.secret_file: .* is empty"):
        load_config(with_file, environ={})
    missing = _write(tmp_path, '[relay]\nsecret_file = "nope"\n' + REGIONS_TOML)
    with pytest.raises(ConfigError, match=r"relay\.secret_file: cannot read"):
        load_config(missing, environ={})


def test_example_region_uncommented_loads(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / "configs" / "ghostmesh.toml").read_text()
    block = example[example.index("# [[relay.regions]]") :].split("\n\n")[0]
    region = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    cfg = load_config(_write(tmp_path, f'[relay]\nsecret = "x"\n{region}\n'), environ={})
    (r,) = cfg.relay.region_list()
    assert (r.id, r.name, r.host, r.stun_port, r.quic_port, r.tcp_port, r.turn) == (
        1, "fra", "192.0.2.10", 3478, 3479, 3478, True,
    )  # fmt: skip


# -- minting -----------------------------------------------------------------------------------------


def test_minted_map_content() -> None:
    _, key = _key()
    m = _minter(lifetime=3600.0).mint(7, key, NOW)
    assert [(r.id, r.name, r.host, r.stun_port, r.quic_port, r.tcp_port, r.turn) for r in m.regions] == [
        (1, "fra", "192.0.2.10", 3478, 3479, 3478, True),
        (2, "nyc", "2001:db8::2", 5000, 0, 5000, False),
    ]
    assert list(m.fallback) == ["ice", "turn", "stun"]
    assert m.expires_unix == int(NOW) + 3600
    assert m.turn_username == f"{int(NOW) + 3600}:7"
    assert creds.parse_rest_username(m.turn_username) == (m.expires_unix, "7")
    # ghostgate's check: the same maths from the same secret
    assert m.turn_password == creds.rest_password(SECRET.encode(), m.turn_username)
    assert m.turn_password == turnrest.rest_password(SECRET.encode(), m.turn_username)
    assert m.turn_password != creds.rest_password(b"other", m.turn_username)
    assert SECRET not in repr(_minter())


def test_relay_token_passes_a_relay_challenge() -> None:
    priv, key = _key()
    m = _minter().mint(7, key, NOW)
    static = relaywire.relay_static_key(SECRET.encode())
    assert m.relay_static_key == static.public_key().raw
    relay_pub = PublicKey(m.relay_static_key)
    raw = base64.b64decode(key)
    challenge = os.urandom(relaywire.CHALLENGE_LEN)
    payload = relaywire.encode_auth(priv, relay_pub, m.expires_unix, m.relay_token, challenge)
    assert relaywire.verify_auth(SECRET.encode(), static, payload, challenge, NOW) == raw
    with pytest.raises(relaywire.RelayProtocolError, match="bad token proof"):
        relaywire.verify_auth(b"wrong secret", static, payload, challenge, NOW)
    other, _ = _key()  # another key cannot use the token
    forged = relaywire.encode_auth(other, relay_pub, m.expires_unix, m.relay_token, challenge)
    with pytest.raises(relaywire.RelayProtocolError, match="bad token proof"):
        relaywire.verify_auth(SECRET.encode(), static, forged, challenge, NOW)
    with pytest.raises(relaywire.RelayProtocolError, match="expired"):
        relaywire.verify_auth(SECRET.encode(), static, payload, challenge, m.expires_unix + 1)


def test_regions_carry_the_derived_pin_unless_configured() -> None:
    own = "sha256:" + "A" * 43
    cfg = RelayConfig(
        secret=SECRET,
        regions=[
            {"id": 1, "name": "fra", "host": "192.0.2.10"},
            {"id": 2, "name": "nyc", "host": "192.0.2.11", "tls_pin": own},
        ],
    )
    m = RelayMinter.from_config(cfg, SECRET.encode()).mint(7, _key()[1], NOW)
    derived = tlscert.key_pin(tlscert.derived_key(relaywire.relay_tls_seed(SECRET.encode())))
    assert [r.tls_pin for r in m.regions] == [derived, parse_pin(own)]
    other = RelayMinter.from_config(cfg, b"another secret").mint(7, _key()[1], NOW)
    assert other.regions[0].tls_pin != derived
    assert other.relay_static_key != m.relay_static_key


def test_a_malformed_region_pin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"relay.regions\[0\].tls_pin"):
        RelayConfig(secret=SECRET, regions=[{"id": 1, "name": "a", "host": "192.0.2.1", "tls_pin": "abc"}])


def test_refresh_before_half_the_lifetime_is_left() -> None:
    minter = _minter(lifetime=1000.0)
    m = minter.mint(1, _key()[1], NOW)
    due = minter.refresh_at(m.expires_unix)
    assert due == pytest.approx(NOW + 1000.0 * REFRESH_FRACTION, abs=1)
    assert m.expires_unix - due > 1000.0 / 2


# -- mapper --------------------------------------------------------------------------------------------


def _mapper(lifetime: float = 1000.0) -> tuple[Mapper, list[str]]:
    keys = [_key()[1] for _ in range(3)]
    m = Mapper(25, relay=_minter(lifetime))
    m.load((NodeAdded(_rec(i, keys[i - 1]), True) for i in (1, 2, 3)), NOW)
    return m, keys


def test_full_map_carries_the_nodes_own_credentials() -> None:
    m, keys = _mapper()
    a, b = m.open_stream(10, 1, NOW), m.open_stream(20, 2, NOW)
    assert a.HasField("relay_map")
    assert b.HasField("relay_map")
    assert a.relay_map.turn_username.endswith(":1")
    assert b.relay_map.turn_username.endswith(":2")
    assert a.relay_map.relay_token == relaywire.token_mac(SECRET.encode(), keys[0], a.relay_map.expires_unix)
    assert len(a.relay_map.regions) == 2
    assert m.flush(10, NOW) is None  # nothing more owed


def test_no_regions_no_relay_map() -> None:
    m = Mapper(25)
    m.load([NodeAdded(_rec(1, _key()[1]), True)], NOW)
    assert not m.open_stream(1, 1).HasField("relay_map")
    assert m.next_relay_refresh() is None
    assert m.refresh_relays(NOW + 10**9) == []


def test_now_is_required_when_minting() -> None:
    m, _ = _mapper()
    with pytest.raises(ValueError, match="now"):
        m.open_stream(1, 1)


def test_refresh_is_due_per_session_and_sent_in_a_delta() -> None:
    m, keys = _mapper(lifetime=1000.0)
    first = m.open_stream(10, 1, NOW).relay_map
    m.open_stream(20, 2, NOW + 100)
    due = m.next_relay_refresh()
    assert due == pytest.approx(NOW + 400, abs=1)
    slack = m.relay.slack if m.relay is not None else 0.0
    assert slack == 50.0  # 5% of the lifetime
    assert m.refresh_relays(NOW + 400 - slack - 1) == []  # not yet: no work, no wake
    assert m.refresh_relays(NOW + 400 - slack + 1) == [10]  # only the due stream (20 is 100 s later)
    assert m.next_relay_refresh() == pytest.approx(NOW + 500, abs=1)
    delta = m.flush(10, NOW + 351)
    assert delta is not None
    assert (delta.serial, delta.full) == (2, False)
    assert list(delta.peers_upserted) == []
    assert not delta.HasField("self")
    fresh = delta.relay_map
    assert fresh.expires_unix == int(NOW + 351) + 1000 > first.expires_unix
    assert fresh.turn_password == creds.rest_password(SECRET.encode(), fresh.turn_username)
    assert fresh.relay_token == relaywire.token_mac(SECRET.encode(), keys[0], fresh.expires_unix)
    assert m.flush(10, NOW + 352) is None
    # the next refresh of stream 10 is scheduled from the new credentials
    assert m.refresh_relays(NOW + 500) == [20]
    assert m.refresh_relays(NOW + 351 + 400 - slack - 1) == []
    assert m.refresh_relays(NOW + 351 + 400) == [10]


def test_refreshes_due_close_together_are_one_batch() -> None:
    m, _ = _mapper(lifetime=1000.0)  # slack 50 s
    m.open_stream(10, 1, NOW)
    m.open_stream(20, 2, NOW + 30)
    m.open_stream(30, 3, NOW + 90)
    assert sorted(m.refresh_relays(NOW + 400)) == [10, 20]  # 20 is due within the slack: same round
    assert m.next_relay_refresh() == pytest.approx(NOW + 490, abs=1)
    assert _minter(lifetime=86400.0).slack == 60.0  # capped: the hub's timer wakes about once a minute
    assert _minter(lifetime=60.0).slack == 3.0


def test_closed_stream_is_not_refreshed_and_heap_stays_bounded() -> None:
    m, _ = _mapper()
    for sid in range(1, 500):
        m.open_stream(sid, 1 + sid % 3, NOW)
        m.close_stream(sid)
    assert len(m._relay_due) <= 64 + 2  # compacted as streams come and go
    assert m.next_relay_refresh() is None
    assert m.refresh_relays(NOW + 10**6) == []


def test_key_rotation_remints_at_once() -> None:
    m, _keys = _mapper()
    m.open_stream(10, 1, NOW)
    m.open_stream(20, 2, NOW)
    rotated = _key()[1]
    touched = m.apply(NodeChanged(_rec(1, rotated), True), NOW + 5)
    assert 10 in touched
    own = m.flush(10, NOW + 5)
    assert own is not None
    assert own.HasField("relay_map")
    assert own.relay_map.relay_token == relaywire.token_mac(
        SECRET.encode(), rotated, own.relay_map.expires_unix
    )
    peer = m.flush(20, NOW + 5)
    assert peer is not None
    assert not peer.HasField("relay_map")
    assert [p.node_key for p in peer.peers_upserted] == [rotated]
    # an ordinary change of the node (same key) does not re-mint
    m.apply(NodeChanged(_rec(1, rotated), False), NOW + 6)
    again = m.flush(10, NOW + 6)
    assert again is not None
    assert not again.HasField("relay_map")


def test_home_region_and_turn_relay_reach_peers() -> None:
    m, keys = _mapper()
    m.open_stream(20, 2, NOW)
    moved = replace(_rec(1, keys[0]), home_region=2, turn_relay="192.0.2.10:50000")
    m.apply(NodeChanged(moved, True), NOW)
    delta = m.flush(20, NOW)
    assert delta is not None
    (peer,) = delta.peers_upserted
    assert (peer.home_region, peer.turn_relay) == (2, "192.0.2.10:50000")


# -- state: ReportStatus's home_region / turn_relay -------------------------------------------------------


def _state(tmp_path: Path) -> tuple[State, NodeRec]:
    cfg = StateConfig(relay_regions=frozenset({1, 2}))
    st = State(SqliteStore(tmp_path / "db.sqlite"), cfg, NOW)
    _, ak = st.create_auth_key(now=NOW)
    node, _ = st.register(_key()[1], ak, "a", NOW)
    return st, node


def test_report_home_region_and_turn_relay(tmp_path: Path) -> None:
    st, node = _state(tmp_path)
    (change,) = st.report_status(
        node.id, ["192.0.2.1:41641"], NOW, home_region=2, turn_relay="192.0.2.10:50000"
    )
    assert isinstance(change, NodeChanged)
    assert (change.node.home_region, change.node.turn_relay) == (2, "192.0.2.10:50000")
    # unchanged values: nothing for peers
    assert (
        st.report_status(node.id, ["192.0.2.1:41641"], NOW + 1, home_region=2, turn_relay="192.0.2.10:50000")
        == []
    )
    # only the home region moves: one change
    (moved,) = st.report_status(
        node.id, ["192.0.2.1:41641"], NOW + 2, home_region=1, turn_relay="192.0.2.10:50000"
    )
    assert isinstance(moved, NodeChanged)
    assert moved.node.home_region == 1
    (cleared,) = st.report_status(node.id, ["192.0.2.1:41641"], NOW + 3)
    assert isinstance(cleared, NodeChanged)
    assert (cleared.node.home_region, cleared.node.turn_relay) == (0, "")
    (v6,) = st.report_status(node.id, [], NOW + 4, turn_relay="[2001:db8::1]:3478")
    assert isinstance(v6, NodeChanged)
    assert v6.node.turn_relay == "[2001:db8::1]:3478"


@pytest.mark.parametrize(
    ("home", "turn", "message"),
    [
        (3, "", r"home_region 3 is not a relay region of this server \(known: 1, 2\)"),
        (0, "192.0.2.10", r"invalid turn_relay '192\.0\.2\.10': expected ip:port"),
        (0, "relay.example:3478", r"invalid turn_relay"),
        (1, "192.0.2.10:0", r"invalid turn_relay"),
        # what a node reports must already be canonical (RFC 5952), never repaired: refused
        (0, "[2001:db8:0::1]:3478", r"invalid turn_relay '\[2001:db8:0::1\]:3478'"),
        (0, "[fe80::1%x\nremove=true]:3478", r"invalid turn_relay"),
    ],
)
def test_bad_report_changes_nothing(tmp_path: Path, home: int, turn: str, message: str) -> None:
    st, node = _state(tmp_path)
    st.report_status(node.id, ["192.0.2.1:41641"], NOW, home_region=1)
    before = st.node(node.id)
    with pytest.raises(InvalidArgument, match=message) as info:
        st.report_status(node.id, ["192.0.2.9:1"], NOW + 1, home_region=home, turn_relay=turn)
    assert "\n" not in str(info.value)
    assert st.node(node.id) == before  # endpoints included: nothing changed


def test_no_regions_only_home_region_zero(tmp_path: Path) -> None:
    st = State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(), NOW)
    _, ak = st.create_auth_key(now=NOW)
    node, _ = st.register(_key()[1], ak, "a", NOW)
    with pytest.raises(InvalidArgument, match="known: none configured"):
        st.report_status(node.id, [], NOW, home_region=1)
    assert st.report_status(node.id, [], NOW, home_region=0) == []


def test_home_region_is_not_persisted(tmp_path: Path) -> None:
    st, node = _state(tmp_path)
    st.report_status(node.id, ["192.0.2.1:41641"], NOW, home_region=2, turn_relay="192.0.2.10:50000")
    st.store.close()
    again = State(SqliteStore(tmp_path / "db.sqlite"), StateConfig(relay_regions=frozenset({1, 2})), NOW)
    rec = again.node(node.id)
    assert rec is not None
    assert rec.endpoints == ("192.0.2.1:41641",)  # endpoints are stored
    assert (rec.home_region, rec.turn_relay) == (0, "")  # live relay state: the node reports it again
