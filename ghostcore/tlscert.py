"""TLS server certificates for any ghost* server: a configured PEM pair, or a self-signed one made at start.

:func:`load` reads a certificate file and its unencrypted private key and checks that they match,
naming the config keys (``<where>.cert_file`` / ``<where>.key_file``) in every error. :func:`self_signed`
makes an ECDSA P-256 key (what aioquic and OpenSSL both handle) and a certificate for it whose subject
alternative names are the common name and ``sans`` (IP addresses as IP entries, anything else as DNS
names). Both return a :class:`CertPair`: the ``cryptography`` objects (aioquic takes those) and the PEMs
(gRPC takes those). :func:`spki_sha256` / :func:`fingerprint` identify a certificate by its public key
(SHA-256 of the DER SubjectPublicKeyInfo, as in RFC 7469 pins), so a client can pin a server across
certificate renewals that keep the key.

Not in the "pure ghostcore modules" import contract, on purpose: :func:`load` reads files and
:func:`server_ssl_context` writes the PEMs to a temporary file, because Python's ``ssl`` loads a
certificate chain only from a file (0600, in a private 0700 directory, removed before returning).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from ghostcore.errors import ConfigError
from ghostcore.joinkey import format_pin

SELF_SIGNED_DAYS = 365

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both as objects and as PEM (the key stays out of reprs)."""

    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    self_signed: bool


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def self_signed(
    common_name: str, sans: Sequence[str] = (), *, key: PrivateKey | None = None, days: int = SELF_SIGNED_DAYS
) -> CertPair:
    """A self-signed certificate valid from an hour ago for ``days``, for ``key`` (default: a fresh ECDSA
    P-256 key; pass the old key to renew a certificate without changing what clients pinned).

    The subject alternative names are ``common_name`` then ``sans`` (duplicates once): a client checks
    the name it connected to against these and ignores the common name once any is there (RFC 6125 §6.4.4).
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    alt_names = [_general_name(n) for n in dict.fromkeys([common_name, *sans])]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertPair(cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem, True)


def derived_key(seed: bytes) -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 private key that is a function of ``seed`` (at least 48 bytes, from a KDF): the same
    seed always gives the same key, so a party that knows the seed knows the key's pin in advance.

    The scalar is the seed, as an integer, reduced into [1, n - 1]; 48 bytes make the bias of the reduction
    negligible (FIPS 186-5 appendix A.4.1 draws n's bit length plus 64 bits for the same reason).
    """
    if len(seed) < 48:
        raise ValueError("derived_key needs at least 48 bytes of seed")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's n (SEC 2, 2.4.2)
    scalar = int.from_bytes(seed, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def key_pin(key: PrivateKey) -> bytes:
    """:func:`spki_sha256` of ``key``'s public half: the pin of every certificate made for ``key``."""
    return hashlib.sha256(_spki_der(key.public_key())).digest()


def load(cert_file: str, key_file: str, *, where: str) -> CertPair:
    """The certificate in ``cert_file`` (the first of its PEM chain) and the unencrypted key in ``key_file``.

    ``where`` is the config section both keys live in: errors name ``<where>.cert_file`` or
    ``<where>.key_file``, the file, and what is wrong with it.
    """
    try:
        cert_pem = Path(cert_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}.cert_file: cannot read {cert_file}: {exc.strerror}") from None
    try:
        key_pem = Path(key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}.key_file: cannot read {key_file}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(f"{where}.cert_file: {cert_file} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}.key_file: {key_file} is not an unencrypted PEM private key") from None
    if not isinstance(key, PrivateKey):
        raise ConfigError(f"{where}.key_file: {key_file}: only ECDSA and RSA keys are supported")
    if _spki_der(key.public_key()) != _spki_der(cert.public_key()):
        raise ConfigError(f"{where}.key_file: {key_file} does not match the certificate in {cert_file}")
    return CertPair(cert, key, cert_pem, key_pem, False)


def _spki_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo: the same for every certificate of one key."""
    return hashlib.sha256(_spki_der(cert.public_key())).digest()


def fingerprint(cert: x509.Certificate) -> str:
    """:func:`spki_sha256` as users see and pin it (:func:`ghostcore.joinkey.format_pin`: ``sha256:…``)."""
    return format_pin(spki_sha256(cert))


def server_ssl_context(pair: CertPair, alpn: Sequence[str] = ()) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``pair``, offering ``alpn`` (RFC 7301) when given.

    The PEMs touch disk only in a 0600 file inside a private directory, removed before this returns.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    with tempfile.TemporaryDirectory(prefix="ghost-tls-") as tmp:  # the directory itself is 0700
        path = os.path.join(tmp, "cert.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.key_pem + pair.cert_pem)
        ctx.load_cert_chain(path)
    return ctx
