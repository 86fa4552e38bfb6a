"""The fleet benchmark's table (:func:`bench.fleet._row`): a row whose later phases did not finish (the
memory guard stopped a reconnect storm) keeps the columns measured and shows ``-`` in the rest, aligned
with the header."""

from __future__ import annotations

from bench.fleet import HEADER, _row

WAVE = {
    "register_per_s": 23.7,
    "all_maps_s": 424.6,
    "converged_s": 424.6,
    "messages": 919_600,
    "bytes": 2.082e10,
    "idle_rss_kib": 634_573,
    "server_cpu_s": 335.4,
    "sim_cpu_share": 0.41,
    "change_p50_s": 2.494,
    "change_p99_s": 3.546,
    "sim_hwm_kib": 10_000_000,
    "mapper_s": 22.5,
}


def test_a_row_without_its_storm_shows_dashes_there_and_keeps_the_rest() -> None:
    row = _row(10000, WAVE).split()
    assert len(row) == len(HEADER.split())
    cols = dict(zip(HEADER.split(), row, strict=True))
    assert cols["N"] == "10000"
    assert cols["reg/s"] == "24"
    assert cols["wave_MB"] == "20820.0"
    assert cols["sim%"] == "41%"
    assert cols["chg_p50"] == "2494"
    assert cols["storm_s"] == "-"
    assert cols["d/node"] == "-"
    assert cols["cpu/map"] == "15x"


def test_a_complete_row_lines_up_with_the_header() -> None:
    row = _row(500, {**WAVE, "storm_maps_s": 1.5, "storm_deltas_per_node": 0.0})
    assert len(row) == len(HEADER)
    assert "-" not in row.split()
