"""The client end of ghostmesh's TLS control channel: how ghostlink and a remote ghostctl decide to trust it.

Two ways to trust the server, chosen by what the client was given:

* **a pin** (``sha256:<base64url>``, carried in the key the admin handed out, :mod:`ghostcore.joinkey`):
  the client opens one TLS connection first (:func:`fetch_certificate`), takes the certificate the server
  presents, and compares the SHA-256 of its public key with the pin. A mismatch is :class:`PinMismatch`
  naming both fingerprints, before any request is sent. On a match, that very certificate becomes the
  only trust anchor of the gRPC channel (``ssl_channel_credentials(root_certificates=...)``), so every
  handshake gRPC makes afterwards, reconnects included, succeeds only with the pinned key: a man in the
  middle would need the server's private key. Host name checks are then moot and the certificate's own
  name is used (``grpc.ssl_target_name_override``), so a self-signed certificate for "ghostmesh" works
  behind any address.
* **no pin**: ordinary web PKI. The certificate must chain to a trusted CA (``ca_file``, else gRPC's
  default roots, which ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` overrides) and name the host dialled.

gRPC's Python API has no certificate-verification callback, hence the extra connection for the pin
check. Its cost is one TLS handshake per channel (a channel is made per join, per ghostctl command and
per map-stream reconnect of ghostlink), measured in ``bench.join_and_idle``.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ghostcore import addr
from ghostcore.errors import AuthError, ConfigError, Unavailable
from ghostcore.joinkey import format_pin
from ghostcore.tlscert import spki_sha256

ALPN_H2 = "h2"  # RFC 7540 section 3.3; gRPC servers refuse TLS without it


class PinMismatch(AuthError):
    """The server presented a TLS key other than the pinned one: nothing was sent, nothing written."""


@dataclass(frozen=True)
class Trust:
    """What the client trusts: a pinned key digest, or CAs (``ca_file``; None: gRPC's default roots)."""

    pin: bytes | None = None
    ca_file: str | None = None

    def describe(self) -> str:
        if self.pin is not None:
            return f"pinned key {format_pin(self.pin)}"
        return f"CAs in {self.ca_file}" if self.ca_file else "the system's certificate authorities"


@dataclass(frozen=True)
class ChannelSetup:
    """Credentials and options for ``grpc.secure_channel`` / ``grpc.aio.secure_channel``."""

    credentials: grpc.ChannelCredentials = field(repr=False)
    options: tuple[tuple[str, str], ...]


def fetch_certificate(target: str, timeout: float) -> x509.Certificate:
    """The leaf certificate ``host:port`` presents in a TLS handshake that verifies nothing (blocking)."""
    host, port = addr.split_hostport(target, "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verification is the pin comparison that follows
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_H2])
    sni = host if addr.is_hostname(host) else None
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise Unavailable(f"cannot reach ghostmesh at {target} over TLS ({why})") from None
    if not der:
        raise Unavailable(f"ghostmesh at {target} presented no TLS certificate")
    return x509.load_der_x509_certificate(der)


def check_pin(cert: x509.Certificate, pin: bytes, target: str) -> None:
    got = spki_sha256(cert)
    if got != pin:
        raise PinMismatch(
            f"ghostmesh at {target} presents TLS key {format_pin(got)}, not the pinned {format_pin(pin)}: "
            "someone may be intercepting the connection, or the server's TLS key changed (then get a new "
            "key from its admin: `ghostctl server pin` on the server)"
        )


def _certificate_name(cert: x509.Certificate) -> str | None:
    """The first DNS name of the certificate (else its common name): what gRPC checks the host against."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    names: list[str] = sans.get_values_for_type(x509.DNSName)
    if names:
        return names[0]
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = common[0].value if common else None
    return value if isinstance(value, str) else None


def prepare(target: str, trust: Trust, timeout: float) -> ChannelSetup:
    """Credentials for a channel to ``target`` under ``trust`` (blocking: a pin costs one TLS handshake).

    PinMismatch if the pinned key is not the server's; Unavailable if the server cannot be reached;
    ConfigError if ``trust.ca_file`` cannot be read.
    """
    if trust.pin is not None:
        cert = fetch_certificate(target, timeout)
        check_pin(cert, trust.pin, target)
        name = _certificate_name(cert)
        options = (("grpc.ssl_target_name_override", name),) if name else ()
        root = cert.public_bytes(serialization.Encoding.PEM)
        return ChannelSetup(grpc.ssl_channel_credentials(root_certificates=root), options)
    roots = None
    if trust.ca_file:
        try:
            roots = Path(trust.ca_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA file {trust.ca_file}: {exc.strerror}") from None
    return ChannelSetup(grpc.ssl_channel_credentials(root_certificates=roots), ())
