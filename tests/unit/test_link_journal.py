"""The host journal and what the next start makes of it: written before each change, 0600, gone after a
clean stop (durability: test_link_state); read strictly; undone in order, only where and when the
changes can still be."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ghostcore.errors import ConfigError, Unavailable
from ghostlink import exitroute, forwarding, leftovers, nft
from ghostlink.exitroute import RECORD, ExitRouting, leftover_deletes
from ghostlink.forwarding import Forwarding
from ghostlink.hostjournal import HostJournal, Journal, Origin, WireGuardGoRecord, read_journal
from ghostlink.nft import NftFirewall, render_delete
from ghostlink.wg import kernel, wggo

HERE = Origin("boot-1", "net:[4026531833]")


def entries(path: Path) -> Journal:
    """The journal as it is on disk now."""
    doc = read_journal(path)
    assert doc is not None, f"{path} is there"
    return doc


WG = WireGuardGoRecord(4242, 99, ("wireguard-go", "-f", "gl0"), "/var/run/wireguard/gl0.sock")


def test_entries_are_written_0600_and_the_file_goes_with_the_last(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    j = HostJournal(path, "gl0", HERE)
    j.record_nft_table("ghostlink_gl0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    j.record_wireguard_go(WG)
    j.record_sysctls({"/proc/sys/net/ipv4/ip_forward": "0"})
    j.record_exit_routing(RECORD)
    j.record_route_table("ghostlink_bd_gl0")
    doc = json.loads(path.read_text())
    assert doc == {
        "version": 1,
        "boot_id": "boot-1",
        "netns": "net:[4026531833]",
        "interface": "gl0",
        "wireguard_go": {
            "pid": 4242,
            "start_time": 99,
            "argv": ["wireguard-go", "-f", "gl0"],
            "socket": "/var/run/wireguard/gl0.sock",
        },
        "nft_table": "ghostlink_gl0",
        "sysctls": {"/proc/sys/net/ipv4/ip_forward": "0"},
        "exit_routing": {"table": 7277, "bypass": 5210, "suppress": 5230, "lookup": 5270},
        "route_table": "ghostlink_bd_gl0",
    }
    back = read_journal(path)
    assert back is not None
    assert back.to_json() == doc, "read back as written"
    j.record_nft_table("")
    j.record_wireguard_go(None)
    j.record_sysctls({})
    j.record_route_table("")
    assert json.loads(path.read_text())["exit_routing"] == doc["exit_routing"]
    assert set(json.loads(path.read_text())) == {"version", "boot_id", "netns", "interface", "exit_routing"}
    j.record_exit_routing(None)
    assert not path.exists(), "nothing left to undo: no journal"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temp files"


BAD: dict[str, Callable[[dict[str, Any]], object]] = {
    "another version": lambda d: d.update(version=2),
    "another interface than the argv's": lambda d: d.update(interface="gl1"),
    "not wireguard-go -f <if>": lambda d: d["wireguard_go"].update(argv=["/bin/sh", "-c", "gl0"]),
    "pid 1": lambda d: d["wireguard_go"].update(pid=1),
    "a socket of another interface": lambda d: d["wireguard_go"].update(socket="/etc/passwd"),
    "a file outside /proc/sys/net": lambda d: d.update(sysctls={"/etc/shadow": "1"}),
    "a way out of /proc/sys/net": lambda d: d.update(sysctls={"/proc/sys/net/../kernel/x": "1"}),
    "a sysctl value not a number": lambda d: d.update(sysctls={"/proc/sys/net/ipv4/ip_forward": "1 x"}),
    "a table not ghostlink's": lambda d: d.update(nft_table="filter"),
    "a route table not birthday probing's": lambda d: d.update(route_table="ghostlink_gl0"),
    "a routing table by name": lambda d: d.update(exit_routing={"table": "main"}),
    "no boot id": lambda d: d.pop("boot_id"),
}


@pytest.mark.parametrize("change", BAD.values(), ids=BAD.keys())
def test_a_journal_that_does_not_validate_is_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], object]
) -> None:
    path = tmp_path / "host.json"
    HostJournal(path, "gl0", HERE).record_wireguard_go(WG)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        read_journal(path)
    assert str(err.value).startswith(f"{path}: not a journal of host changes this ghostlink can read")
    assert "\n" not in str(err.value)


def test_a_torn_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    path.write_text('{"version": 1, "boot')
    with pytest.raises(ConfigError, match="not a journal of host changes"):
        read_journal(path)


def test_no_journal_is_nothing_to_undo(tmp_path: Path) -> None:
    assert read_journal(tmp_path / "host.json") is None


# ----- the parts journal before they change the host


async def test_nft_table_is_journaled_before_it_is_created_and_forgotten_once_deleted(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    journal = HostJournal(path, "gl0", HERE)
    seen: list[tuple[str, str]] = []

    class Recording(NftFirewall):
        async def _run(self, script: str) -> None:
            seen.append((script.splitlines()[-1], entries(path).nft_table))

    fw = Recording("gl0", journal=journal)
    await fw.apply(())
    await fw.apply((), masquerade=True)
    assert [t for _, t in seen] == ["ghostlink_gl0", "ghostlink_gl0"], "on disk before nft ran"
    await fw.close()
    assert not path.exists()


async def test_a_table_nft_failed_to_delete_stays_journaled(tmp_path: Path) -> None:
    journal = HostJournal(tmp_path / "host.json", "gl0", HERE)

    class Failing(NftFirewall):
        async def _run(self, script: str) -> None:
            if script == render_delete("gl0"):
                raise OSError("nft refused: busy")

    fw = Failing("gl0", journal=journal)
    await fw.apply(())
    await fw.close()
    assert entries(tmp_path / "host.json").nft_table == "ghostlink_gl0"


async def test_forwarding_journals_the_values_it_found_before_writing(tmp_path: Path) -> None:
    v4, v6 = tmp_path / "ip_forward", tmp_path / "forwarding"
    v4.write_text("0\n")
    v6.write_text("1\n")
    path = tmp_path / "host.json"
    journal = HostJournal(path, "gl0", HERE)
    fw = Forwarding((v4, v6), journal=journal)
    await fw.apply(True)
    assert v4.read_text() == "1\n"
    assert json.loads(path.read_text())["sysctls"] == {str(v4): "0", str(v6): "1"}
    forwarding.restore({str(v4): "0"})
    assert v4.read_text() == "0\n"
    await fw.close()
    assert not path.exists()


async def test_exit_routing_is_journaled_before_the_first_rule(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    journal = HostJournal(path, "gl0", HERE)
    ran: list[bool] = []

    class Recording(ExitRouting):
        async def _run(self, args: list[str], *, check: bool = True) -> None:
            ran.append(entries(path).exit_routing == RECORD)

    er = Recording("gl0", ["192.0.2.1"], journal=journal)
    await er.apply(True, frozenset({"198.51.100.7"}))
    assert ran
    assert all(ran)
    await er.close()
    assert not path.exists()


async def test_exit_routing_that_fails_halfway_is_taken_back_and_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    journal = HostJournal(path, "gl0", HERE)
    ran: list[str] = []

    class Refusing(ExitRouting):
        async def _run(self, args: list[str], *, check: bool = True) -> None:
            ran.append(" ".join(args))
            if "suppress_prefixlength" in args and "add" in args:
                raise OSError("ip -4 rule add ...: RTNETLINK answers: Operation not supported")

    er = Refusing("gl0", ["192.0.2.1"], journal=journal)
    with pytest.raises(OSError, match="Operation not supported"):
        await er.apply(True, frozenset())
    added = [c for c in ran if " add " in c or " replace " in c]
    assert added == [
        "-4 rule add to 192.0.2.1/32 lookup main priority 5210",
        "-4 route replace default dev gl0 table 7277",
        "-4 rule add lookup main suppress_prefixlength 0 priority 5230",
    ]
    deleted = [c for c in ran if " del " in c]
    assert "-4 rule del to 192.0.2.1/32 lookup main priority 5210" in deleted
    assert "-4 route del default dev gl0 table 7277" in deleted
    assert not er.active
    assert not path.exists(), "nothing of it left on the host: nothing journaled"


def test_leftover_exit_rules_are_exactly_the_shapes_exit_routing_adds() -> None:
    # as `ip -j -4 rule show` prints them, ours among rules that are not
    rules = [
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 5210, "src": "all", "dst": "192.0.2.1", "table": "main"},
        {"priority": 5210, "src": "all", "dst": "198.51.100.7", "table": "main"},
        {"priority": 5210, "src": "all", "dst": "10.0.0.0", "dstlen": 8, "table": "main"},  # not a host
        {"priority": 5210, "src": "10.1.1.1", "table": "main"},  # a source
        {"priority": 5230, "src": "all", "table": "main", "suppress_prefixlen": 0},
        {"priority": 5230, "src": "all", "table": "main", "suppress_prefixlen": 8},
        {"priority": 5270, "src": "all", "table": "7277"},
        {"priority": 5270, "src": "all", "fwmark": "0x1", "table": "7277"},  # a mark: someone else's
        {"priority": 5270, "src": "all", "table": "100"},
        {"priority": 32766, "src": "all", "table": "main"},
    ]
    assert leftover_deletes("-4", rules, RECORD) == [
        ["-4", "rule", "del", "to", "192.0.2.1/32", "lookup", "main", "priority", "5210"],
        ["-4", "rule", "del", "to", "198.51.100.7/32", "lookup", "main", "priority", "5210"],
        ["-4", "rule", "del", "lookup", "main", "suppress_prefixlength", "0", "priority", "5230"],
        ["-4", "rule", "del", "lookup", "7277", "priority", "5270"],
    ]
    v6 = [{"priority": 5210, "src": "all", "dst": "2001:db8::1", "table": "main"}]
    assert leftover_deletes("-6", v6, RECORD) == [
        ["-6", "rule", "del", "to", "2001:db8::1/128", "lookup", "main", "priority", "5210"]
    ]


# ----- undoing a previous run's leftovers


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each undo step replaced by one that records itself."""
    done: list[str] = []

    async def reap(rec: WireGuardGoRecord) -> None:
        done.append(f"reap {rec.pid}")

    async def exit_rules(rec: object, ip: str = "ip") -> None:
        done.append("exit routing")

    def sysctls(saved: dict[str, str]) -> None:
        done.append(f"sysctls {sorted(saved.items())}")

    async def table(name: str, nft: str = "nft") -> None:
        done.append(f"nft {name}")

    def link(name: str) -> None:
        done.append(f"link {name}")

    monkeypatch.setattr(wggo, "reap_leftover", reap)
    monkeypatch.setattr(exitroute, "remove_leftovers", exit_rules)
    monkeypatch.setattr(forwarding, "restore", sysctls)
    monkeypatch.setattr(nft, "delete_table", table)
    monkeypatch.setattr(kernel, "remove_leftover", link)
    return done


def crashed_run(path: Path, origin: Origin) -> None:
    j = HostJournal(path, "gl0", origin)
    j.record_wireguard_go(WG)
    j.record_kernel_interface("gl0")
    j.record_nft_table("ghostlink_gl0")
    j.record_sysctls({"/proc/sys/net/ipv4/ip_forward": "0"})
    j.record_exit_routing(RECORD)
    j.record_route_table("ghostlink_bd_gl0")


async def test_leftovers_are_undone_in_reverse_and_the_journal_goes(tmp_path: Path, steps: list[str]) -> None:
    path = tmp_path / "host.json"
    crashed_run(path, HERE)
    await leftovers.undo_leftovers(path, HERE)
    assert steps == [
        "reap 4242",
        "exit routing",
        "sysctls [('/proc/sys/net/ipv4/ip_forward', '0')]",
        "nft ghostlink_gl0",
        "nft ghostlink_bd_gl0",
        "link gl0",
    ]
    assert not path.exists()
    await leftovers.undo_leftovers(path, HERE)
    assert len(steps) == 6, "no journal: nothing to do"


async def test_after_a_reboot_nothing_is_left_to_undo(tmp_path: Path, steps: list[str]) -> None:
    path = tmp_path / "host.json"
    crashed_run(path, Origin("boot-0", HERE.netns))
    await leftovers.undo_leftovers(path, HERE)
    assert steps == []
    assert not path.exists()


async def test_from_another_namespace_only_the_process_is_stopped(tmp_path: Path, steps: list[str]) -> None:
    path = tmp_path / "host.json"
    crashed_run(path, Origin(HERE.boot_id, "net:[1]"))
    await leftovers.undo_leftovers(path, HERE)
    assert steps == ["reap 4242"]
    assert not path.exists()


async def test_a_step_that_fails_stops_the_start_and_keeps_the_journal(
    tmp_path: Path, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(name: str, nft: str = "nft") -> None:
        raise OSError("nft refused deleting table inet ghostlink_gl0: Operation not permitted")

    monkeypatch.setattr(nft, "delete_table", refused)
    path = tmp_path / "host.json"
    crashed_run(path, HERE)
    with pytest.raises(Unavailable) as err:
        await leftovers.undo_leftovers(path, HERE)
    assert str(err.value) == (
        "undoing what the previous ghostlink left failed: nft refused deleting table inet ghostlink_gl0: "
        "Operation not permitted; fix that and start again"
    )
    assert path.exists()
