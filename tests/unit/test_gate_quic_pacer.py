"""The relay's QUIC pacer (ghostcore.relayquic.TickPacer; the driver installs it at both ends, which
test_core_quicdriver checks).

aioquic's own pacer lets out 16 packets and then waits on a loop timer of 1 ms resolution; these check that
the relay pacers let a tick's worth out at once, never more than one window, and keep aioquic's rate.
"""

from __future__ import annotations

from aioquic.quic.recovery import QuicPacketPacer

from ghostcore.relayquic import MAX_DATAGRAM_SIZE, PACING_TICK, TickPacer


def _burst(pacer: QuicPacketPacer, now: float) -> int:
    """Packets the pacer lets out back to back at ``now`` (a full bucket)."""
    pacer.update_bucket(now=now)
    sent = 0
    while pacer.next_send_time(now) is None and sent < 100_000:
        pacer.update_after_send(now)
        sent += 1
    return sent


def test_burst_covers_a_tick_at_lan_rates() -> None:
    cwnd, srtt = 800_000, 0.01  # 80 MB/s: ~55k 1452-byte packets/s
    stock = QuicPacketPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    ours = TickPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    for p in (stock, ours):
        p.update_rate(congestion_window=cwnd, smoothed_rtt=srtt)
    assert ours.packet_time == stock.packet_time  # same rate
    assert _burst(stock, 10.0) <= 17
    per_tick = PACING_TICK * cwnd / srtt / MAX_DATAGRAM_SIZE
    assert _burst(ours, 10.0) >= int(per_tick) - 1


def test_burst_never_exceeds_one_window() -> None:
    cwnd, srtt = 20 * MAX_DATAGRAM_SIZE, 0.0005  # RTT below a tick: the whole window may go at once, no more
    pacer = TickPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    pacer.update_rate(congestion_window=cwnd, smoothed_rtt=srtt)
    assert _burst(pacer, 10.0) <= 21
