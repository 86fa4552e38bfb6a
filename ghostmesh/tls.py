"""ghostmesh's TLS identity: the certificate chain and key its TCP port serves (the I/O edge).

Where it comes from (:class:`ghostmesh.config.TlsConfig`):

* ``[tls] cert_file`` / ``key_file``: a chain a certificate authority issued (the server's certificate
  first, then any intermediates), read with :func:`ghostcore.tlscert.load`. It is served whole: a TLS 1.3
  Certificate message carries the sender's certificate followed by the certificates that certify it
  (RFC 8446 section 4.4.2), so a client holding only the root can build the path.
* nothing configured: ghostmesh's own self-signed ECDSA P-256 certificate (common name ``ghostmesh``),
  kept in the directory of the database. ``tls.key`` is made once (created ``O_EXCL`` with mode 0600,
  file and directory fsynced) and never replaced by ghostmesh; ``tls.crt`` is issued for it (replaced
  atomically, the directory fsynced after the rename: :mod:`ghostcore.files`), valid
  ``SELF_SIGNED_DAYS``. Clients trust this certificate by its pin, the SHA-256 of its public key
  (:func:`ghostcore.tlscert.fingerprint`), so at every start a certificate that expires within
  ``RENEW_BEFORE`` (or has expired, is missing, unreadable or for another key) is issued again for the
  SAME key: every pin handed out stays valid.

The private key appears in no log, repr or message; only the pin (public) is logged.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ghostcore import tlscert
from ghostcore.errors import ConfigError
from ghostcore.files import create_private, read_private, replace_file
from ghostcore.tlscert import CertPair
from ghostmesh.config import TlsConfig

COMMON_NAME = "ghostmesh"
SELF_SIGNED_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=30)
KEY_FILE = "tls.key"
CERT_FILE = "tls.crt"
CERT_MODE = 0o644  # public


def load_identity(cfg: TlsConfig, directory: Path) -> CertPair:
    """The configured chain and key, else the self-signed pair kept in ``directory`` (made or renewed
    there as needed). ConfigError, naming the file, when either cannot be used."""
    if cfg.cert_file:
        return tlscert.load(cfg.cert_file, cfg.key_file, where="tls")
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not key_path.exists():
        pair = tlscert.self_signed(COMMON_NAME, days=SELF_SIGNED_DAYS)
        _create_key(key_path, pair.key_pem)
        _write_cert(cert_path, pair.cert_pem)
        return pair
    key_pem, key = _read_key(key_path)
    cert = _read_cert(cert_path)
    now = datetime.datetime.now(datetime.UTC)
    if cert is None or cert.public_key() != key.public_key() or cert.not_valid_after_utc - now < RENEW_BEFORE:
        pair = tlscert.self_signed(COMMON_NAME, key=key, days=SELF_SIGNED_DAYS)
        _write_cert(cert_path, pair.cert_pem)
        return pair
    return CertPair(cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem, True)


def _create_key(path: Path, pem: bytes) -> None:
    """Write a new key file: born 0600, never over an existing one, durable before it is used."""
    try:
        create_private(path, pem)
    except OSError as exc:
        raise ConfigError(f"cannot create ghostmesh's TLS key {path}: {exc.strerror}") from None


def _write_cert(path: Path, pem: bytes) -> None:
    """Replace the certificate file atomically and durably (a crash leaves the old one or the new one)."""
    try:
        replace_file(path, pem, CERT_MODE)
    except OSError as exc:
        raise ConfigError(f"cannot write ghostmesh's TLS certificate {path}: {exc.strerror}") from None


def _read_key(path: Path) -> tuple[bytes, tlscert.PrivateKey]:
    """The key file's PEM and key; refused when others may read it (as ssh refuses such a key)."""
    pem = read_private(path, "ghostmesh's TLS key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, tlscert.PrivateKey):
        raise ConfigError(
            f"ghostmesh's TLS key {path} is not an unencrypted ECDSA or RSA PEM key: restore it from a "
            "backup (nodes pin it), or remove it to make a new one and hand out new keys"
        )
    return pem, key


def _read_cert(path: Path) -> x509.Certificate | None:
    """The certificate file, or None when it is missing or unreadable (it is issued again then)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
