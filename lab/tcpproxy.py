"""An attacker on the path of a TCP connection, for the hostile-network tests: records, or terminates TLS.

Run inside a lab namespace as its own process::

    python -m lab.tcpproxy --listen IP:PORT --upstream IP:PORT --capture DIR [--mitm]
    python -m lab.tcpproxy --replay FILE --upstream IP:PORT [--substitute OLD NEW]

* plain mode: forwards bytes both ways unchanged and appends each direction of each connection to
  ``DIR/<n>.c2s`` and ``DIR/<n>.s2c`` (what a passive eavesdropper, or a byte-forwarding proxy, sees);
* ``--mitm``: terminates TLS with a certificate of its own (its pin written to ``DIR/pin``), opens its own
  TLS connection upstream (verifying nothing), forwards plaintext between the two and records it. A
  client pinned to the real server must refuse it; a client that trusts it (pinned to the proxy's key, the
  way a compromised middlebox would be trusted) shows what an attacker who can read and change requests
  achieves, and :func:`replay` sends a recorded client stream to the server again.

Both directions and connection numbers are in the capture file names, so a test finds what it needs
without parsing. ``DIR/ready`` appears once the listener is bound. Stops on SIGTERM. ``--replay`` sends a
recorded client stream's requests (``requests_only``; optionally with one byte string of the request
bodies replaced by another of the same length, so HTTP/2 frame lengths still hold) on a fresh TLS
connection and prints how many bytes came back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import socket
import ssl
from pathlib import Path

from ghostcore import addr, tlscert

ALPN = ["h2"]
_CHUNK = 65536


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(ALPN)
    return ctx


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: Path) -> None:
    with record.open("ab") as out:
        try:
            while data := await reader.read(_CHUNK):
                out.write(data)
                out.flush()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return  # a reset (or a TLS alert) ends a proxied connection like an EOF; the other pump follows
    with contextlib.suppress(OSError):
        writer.write_eof()


class Proxy:
    def __init__(self, upstream: tuple[str, int], capture: Path, mitm: bool) -> None:
        self.upstream = upstream
        self.capture = capture
        self.server_ctx: ssl.SSLContext | None = None
        if mitm:
            pair = tlscert.self_signed("ghostmesh")
            (capture / "pin").write_text(tlscert.fingerprint(pair.certificate) + "\n")
            self.server_ctx = tlscert.server_ssl_context(pair, ALPN)
        self._ids = itertools.count(1)

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        n = next(self._ids)
        ssl_up = _client_ctx() if self.server_ctx is not None else None
        try:
            ur, uw = await asyncio.open_connection(*self.upstream, ssl=ssl_up)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(
                _pump(cr, uw, self.capture / f"{n}.c2s"),
                _pump(ur, cw, self.capture / f"{n}.s2c"),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # stopping: the connection just ends
        finally:
            for w in (uw, cw):
                w.close()


async def serve(listen: tuple[str, int], proxy: Proxy) -> None:
    server = await asyncio.start_server(proxy.handle, *listen, ssl=proxy.server_ctx, reuse_address=True)
    (proxy.capture / "ready").write_text("1\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
_DATA, _SETTINGS, _PING, _GOAWAY, _RST_STREAM = 0x0, 0x4, 0x6, 0x7, 0x3
_ACK = 0x1


def requests_only(stream: bytes, substitute: tuple[bytes, bytes] | None = None) -> bytes:
    """A recorded HTTP/2 client stream without what answered the original server (RFC 9113 section 6):
    SETTINGS acknowledgements, PINGs, and the RST_STREAM / GOAWAY frames that ended its calls. What is
    left (the preface, the client's SETTINGS, HEADERS, CONTINUATION, DATA, WINDOW_UPDATE) makes the same
    requests on a new connection, with the same HPACK state. ``substitute`` (old, new: equal lengths)
    rewrites request bodies only: DATA frames, never the headers that carry the proofs."""
    if not stream.startswith(_PREFACE):
        raise ValueError("not an HTTP/2 client stream")
    out, pos = bytearray(_PREFACE), len(_PREFACE)
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        ftype, flags = stream[pos + 3], stream[pos + 4]
        frame = stream[pos : pos + 9 + length]
        pos += 9 + length
        if ftype in (_PING, _GOAWAY, _RST_STREAM) or (ftype == _SETTINGS and flags & _ACK):
            continue
        if ftype == _DATA and substitute is not None:
            frame = frame[:9] + frame[9:].replace(*substitute)
        out += frame
    return bytes(out)


def replay(target: tuple[str, int], data: bytes, wait: float = 2.0) -> bytes:
    """Open a fresh TLS connection to ``target``, send ``data`` (a recorded client stream), return what came
    back within ``wait`` seconds (blocking; for tests)."""
    with (
        socket.create_connection(target, timeout=wait) as raw,
        _client_ctx().wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        tls.settimeout(wait)
        got = bytearray()
        with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
            while chunk := tls.recv(_CHUNK):
                got += chunk
        return bytes(got)


def captured(capture: Path, direction: str = "c2s") -> bytes:
    """Every recorded byte in one direction, all connections, in connection order."""
    files = sorted(capture.glob(f"*.{direction}"), key=lambda p: int(p.name.split(".")[0]))
    return b"".join(p.read_bytes() for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--capture", type=Path)
    ap.add_argument("--mitm", action="store_true")
    ap.add_argument("--replay", type=Path)
    ap.add_argument("--substitute", nargs=2, metavar=("OLD", "NEW"))
    args = ap.parse_args()
    upstream = addr.split_hostport(args.upstream, "--upstream")
    if args.replay is not None:
        data = args.replay.read_bytes()
        swap = None
        if args.substitute:
            old, new = (x.encode() for x in args.substitute)
            if len(old) != len(new) or old not in data:
                raise SystemExit("--substitute: OLD must occur in the stream and NEW have its length")
            swap = (old, new)
        print(len(replay(upstream, requests_only(data, swap))), flush=True)
        return
    args.capture.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(upstream, args.capture, args.mitm)
    asyncio.run(serve(addr.split_hostport(args.listen, "--listen"), proxy))


if __name__ == "__main__":
    main()
