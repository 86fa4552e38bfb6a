"""Backend selection (kernel if the module works, else wireguard-go), the kernel netlink translation, and
the kernel interface's life: journaled while it exists, never one this ghostlink did not create."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ghostcore.errors import ConfigError, Unavailable
from ghostcore.keys import PrivateKey
from ghostlink import iproute
from ghostlink.hostjournal import HostJournal, Origin, read_journal
from ghostlink.wg import kernel
from ghostlink.wg.kernel import KernelBackend, peer_dict
from ghostlink.wg.select import Choice, choose, make_backend
from ghostlink.wg.uapi_codec import PeerChange
from ghostlink.wg.wggo import WireGuardGoBackend

KEY = PrivateKey.generate().public_key().base64()


def has(_: str) -> str | None:
    return "/usr/bin/wireguard-go"


def missing(_: str) -> str | None:
    return None


def test_auto_prefers_kernel() -> None:
    c = choose("auto", probe=lambda: True, which=has)
    assert c.backend == "kernel"


def test_auto_falls_back_to_wireguard_go() -> None:
    c = choose("auto", probe=lambda: False, which=has)
    assert c == Choice("wireguard-go", "auto: no kernel WireGuard module, using wireguard-go")


def test_auto_with_nothing_available() -> None:
    with pytest.raises(ConfigError, match="install wireguard-go"):
        choose("auto", probe=lambda: False, which=missing)


def test_explicit_kernel_without_module() -> None:
    with pytest.raises(ConfigError, match="kernel WireGuard is not available"):
        choose("kernel", probe=lambda: False, which=has)


def test_explicit_wireguard_go_never_probes_kernel() -> None:
    def boom() -> bool:
        raise AssertionError("probe must not run")

    assert choose("wireguard-go", probe=boom, which=has).backend == "wireguard-go"
    with pytest.raises(ConfigError, match="not found"):
        choose("wireguard-go", "/nope/wireguard-go", probe=boom, which=missing)


def test_make_backend_types() -> None:
    assert isinstance(make_backend(Choice("kernel", "x"), "gl0"), KernelBackend)
    b = make_backend(Choice("wireguard-go", "x"), "gl0", "/usr/bin/wireguard-go")
    assert isinstance(b, WireGuardGoBackend)
    assert b.name == "wireguard-go"
    assert str(b.sock) == "/var/run/wireguard/gl0.sock"


def test_kernel_peer_dict_is_incremental() -> None:
    assert peer_dict(PeerChange(KEY, remove=True)) == {"public_key": KEY, "remove": True}
    d = peer_dict(PeerChange(KEY, endpoint="[2001:db8::1]:51820"))
    assert d == {
        "public_key": KEY,
        "update_only": True,
        "endpoint_addr": "2001:db8::1",
        "endpoint_port": 51820,
    }
    d = peer_dict(PeerChange(KEY, create=True, allowed_ips=("10.0.0.0/8",), keepalive=25))
    assert d["replace_allowed_ips"] is True
    assert d["allowed_ips"] == ["10.0.0.0/8"]
    assert d["update_only"] is False
    assert d["persistent_keepalive"] == 25


def test_kernel_info_parsing() -> None:
    from ghostlink.wg.kernel import _device_from_info  # noqa: PLC0415 - a private helper, tested alone

    msgs = [
        {
            "WGDEVICE_A_LISTEN_PORT": 41641,
            "WGDEVICE_A_PEERS": [
                {
                    "WGPEER_A_PUBLIC_KEY": KEY.encode(),
                    "WGPEER_A_ENDPOINT": {"addr": "2001:db8::1", "port": 51820},
                    "WGPEER_A_LAST_HANDSHAKE_TIME": {"tv_sec": 1700000000, "tv_nsec": 3},
                    "WGPEER_A_RX_BYTES": 10,
                    "WGPEER_A_TX_BYTES": 20,
                    "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL": 25,
                    "WGPEER_A_ALLOWEDIPS": [{"addr": "100.64.0.2/32"}],
                }
            ],
        }
    ]
    dev = _device_from_info(msgs)
    assert dev.listen_port == 41641
    p = dev.peers[KEY]
    assert p.endpoint == "[2001:db8::1]:51820"
    assert (p.last_handshake_sec, p.rx_bytes, p.tx_bytes, p.keepalive) == (1700000000, 10, 20, 25)
    assert p.allowed_ips == ("100.64.0.2/32",)


# ----- kernel WireGuard's interface outlives the process: journaled, and never one it did not create


@dataclass
class FakeNetlink:
    """ghostlink.iproute's link calls and pyroute2's WireGuard, as the kernel backend uses them, over a
    dict name -> kind."""

    links: dict[str, str]
    journal: HostJournal
    added_while_journaled: list[str] = field(default_factory=list)
    refuse_add: bool = False

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def link_exists(self, ifname: str, netns: str | None = None) -> bool:
        return ifname in self.links

    def link_kind(self, ifname: str, netns: str | None = None) -> str | None:
        return self.links.get(ifname)

    def add_link(self, ifname: str, kind: str, netns: str | None = None) -> None:
        on_disk = read_journal(self.journal.path)
        self.added_while_journaled.append(on_disk.kernel_interface if on_disk else "")
        if self.refuse_add:
            raise OSError(95, "Operation not supported")
        self.links[ifname] = kind

    def delete_link(self, ifname: str, netns: str | None = None) -> None:
        if ifname not in self.links:
            raise OSError(19, "Cannot find device")
        del self.links[ifname]

    def set_up(self, ifname: str, mtu: int, netns: str | None = None) -> None:
        assert ifname in self.links

    def set(self, ifname: str, **_: object) -> None:
        return None


@pytest.fixture
def netlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNetlink:
    fake = FakeNetlink({}, HostJournal(tmp_path / "host.json", "gl0", Origin("boot", "net:[1]")))
    for name in ("link_exists", "link_kind", "add_link", "delete_link", "set_up"):
        monkeypatch.setattr(iproute, name, getattr(fake, name))
    monkeypatch.setattr(kernel, "_wireguard", lambda: fake)
    return fake


async def test_kernel_interface_is_journaled_before_it_is_created_and_forgotten_once_deleted(
    netlink: FakeNetlink,
) -> None:
    be = KernelBackend("gl0", netlink.journal)
    await be.up(PrivateKey.generate(), 41641, 1280)
    assert netlink.added_while_journaled == ["gl0"]
    assert netlink.journal.path.exists()
    await be.close()
    assert netlink.links == {}
    assert not netlink.journal.path.exists()


async def test_kernel_refuses_an_interface_it_did_not_create_and_leaves_it(netlink: FakeNetlink) -> None:
    netlink.links["gl0"] = "wireguard"  # e.g. someone's `ip link add gl0 type wireguard`
    be = KernelBackend("gl0", netlink.journal)
    with pytest.raises(ConfigError) as err:
        await be.up(PrivateKey.generate(), 41641, 1280)
    assert str(err.value) == (
        "interface gl0 exists and this ghostlink did not create it; remove it (ip link del gl0) or "
        "choose another --interface"
    )
    await be.close()
    assert netlink.links == {"gl0": "wireguard"}, "not ours: not deleted"
    assert not netlink.journal.path.exists()


async def test_a_kernel_interface_that_could_not_be_created_is_not_left_journaled(
    netlink: FakeNetlink,
) -> None:
    netlink.refuse_add = True
    be = KernelBackend("gl0", netlink.journal)
    with pytest.raises(Unavailable, match="cannot create kernel WireGuard interface gl0"):
        await be.up(PrivateKey.generate(), 41641, 1280)
    assert netlink.added_while_journaled == ["gl0"]
    await be.close()
    assert not netlink.journal.path.exists()


def test_a_leftover_kernel_interface_is_deleted_only_while_it_is_a_wireguard_link(
    netlink: FakeNetlink,
) -> None:
    kernel.remove_leftover("gl0")  # gone already: nothing to do
    netlink.links.update(gl0="wireguard", gl1="bridge")
    kernel.remove_leftover("gl0")
    assert netlink.links == {"gl1": "bridge"}
    with pytest.raises(ConfigError, match="interface gl1 exists and this ghostlink did not create it"):
        kernel.remove_leftover("gl1")
    assert netlink.links == {"gl1": "bridge"}
