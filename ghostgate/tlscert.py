"""The relay's TLS certificate: ``relay.cert_file`` / ``relay.key_file``, or a self-signed one made at start.

Both relay transports use it: QUIC (aioquic takes the ``cryptography`` objects) and TLS over TCP (Python's
``ssl`` reads only files, so :func:`server_ssl_context` writes the PEMs to a 0600 file in a private temporary
directory, loads them and removes the directory before returning). Clients do not verify the certificate:
the payloads are WireGuard-encrypted end to end and relay auth is a challenge-response over a fresh
challenge (ghostcore.relaywire), so a man in the middle learns nothing reusable; that is a documented gap,
not an oversight. The self-signed certificate is ECDSA P-256 (what aioquic and OpenSSL both handle).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ghostcore.errors import ConfigError
from ghostgate.config import GateConfig

SELF_SIGNED_DAYS = 365


@dataclass(frozen=True)
class CertPair:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    self_signed: bool


def self_signed(common_name: str = "ghostgate") -> CertPair:
    """A fresh ECDSA P-256 key and a self-signed certificate for it, valid from an hour ago for a year."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertPair(cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem, True)


def load(cert_file: str, key_file: str) -> CertPair:
    """The configured certificate (first of the PEM chain) and its unencrypted private key."""
    try:
        cert_pem = Path(cert_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"relay.cert_file: cannot read {cert_file}: {exc.strerror}") from None
    try:
        key_pem = Path(key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"relay.key_file: cannot read {key_file}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(f"relay.cert_file: {cert_file} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"relay.key_file: {key_file} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"relay.key_file: {key_file}: only ECDSA and RSA keys are supported")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"relay.key_file: {key_file} does not match the certificate in {cert_file}")
    return CertPair(cert, key, cert_pem, key_pem, False)


def for_config(cfg: GateConfig) -> CertPair:
    """``relay.cert_file`` / ``relay.key_file`` when set, else a self-signed certificate made now."""
    if cfg.relay.cert_file:
        return load(cfg.relay.cert_file, cfg.relay.key_file)
    return self_signed()


def server_ssl_context(pair: CertPair, alpn: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``pair``; the PEMs touch disk only in a 0600 file, removed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([alpn])
    with tempfile.TemporaryDirectory(prefix="ghostgate-tls-") as tmp:  # the directory itself is 0700
        path = os.path.join(tmp, "relay.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.key_pem + pair.cert_pem)
        ctx.load_cert_chain(path)
    return ctx
