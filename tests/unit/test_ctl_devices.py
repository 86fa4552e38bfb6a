"""ghostctl devices: the wg-quick file holds only values checked to be what they claim (wg-quick runs a
``PostUp`` line as root, so ghostmesh's answer must not be able to add one)."""

from __future__ import annotations

import pytest

from ghostcore import errors as e
from ghostcore.keys import PrivateKey
from ghostcore.pb.ghostmesh.v1 import coordination_pb2 as pb
from ghostctl.devices import wg_quick_config

KEY = PrivateKey.generate()
GW_KEY = PrivateKey.generate().public_key().base64()


def _nodes(**over: str) -> tuple[pb.Node, pb.Node]:
    device = pb.Node(
        id=9, name=over.get("name", "phone"), addresses=["100.64.0.9", "fd7a:115c:a1e0::9"], via=2
    )
    gateway = pb.Node(id=2, name=over.get("gw_name", "gw"), node_key=over.get("gw_key", GW_KEY))
    return device, gateway


def test_a_config_carries_the_key_the_addresses_and_the_gateway() -> None:
    text = wg_quick_config(KEY.base64(), *_nodes(), "192.0.2.7:41641", ["100.64.0.0/10"])
    assert text.splitlines()[:4] == [
        "[Interface]",
        "# ghost* device phone (id 9)",
        f"PrivateKey = {KEY.base64()}",
        "Address = 100.64.0.9/32, fd7a:115c:a1e0::9/128",
    ]
    assert f"PublicKey = {GW_KEY}" in text
    assert "Endpoint = 192.0.2.7:41641" in text


@pytest.mark.parametrize(
    "over",
    [
        {"name": "phone\nPostUp = touch /tmp/pwned"},
        {"gw_name": "gw\nPostUp = id"},
        {"gw_key": GW_KEY + "\nPostUp = id"},
        {"gw_key": "not-a-key"},
    ],
)
def test_a_value_from_ghostmesh_that_is_not_canonical_writes_no_config(over: dict[str, str]) -> None:
    with pytest.raises(e.ProtocolError):
        wg_quick_config(KEY.base64(), *_nodes(**over), "192.0.2.7:41641", ["100.64.0.0/10"])
