"""ghostmesh's TLS identity (ghostmesh.tls): the self-signed key made once and kept, its certificate renewed
with the same key, a configured pair used as given, and refusals that name the file."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from ghostcore import tlscert
from ghostcore.errors import ConfigError
from ghostmesh.config import TlsConfig
from ghostmesh.tls import CERT_FILE, KEY_FILE, RENEW_BEFORE, SELF_SIGNED_DAYS, load_identity


def _days_left(pair: tlscert.CertPair) -> float:
    left = pair.certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left / datetime.timedelta(days=1)


def test_first_start_makes_a_private_key_and_a_ten_year_certificate(tmp_path: Path) -> None:
    pair = load_identity(TlsConfig(), tmp_path)
    assert pair.self_signed
    key_file, cert_file = tmp_path / KEY_FILE, tmp_path / CERT_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (key_file.read_bytes(), cert_file.read_bytes()) == (pair.key_pem, pair.cert_pem)
    assert SELF_SIGNED_DAYS - 1 < _days_left(pair) <= SELF_SIGNED_DAYS
    assert pair.certificate.subject.rfc4514_string() == "CN=ghostmesh"
    assert "PRIVATE" not in repr(pair)


def test_later_starts_keep_the_key_and_the_pin(tmp_path: Path) -> None:
    first = load_identity(TlsConfig(), tmp_path)
    again = load_identity(TlsConfig(), tmp_path)
    assert again.cert_pem == first.cert_pem  # not close to expiry: the same certificate
    assert tlscert.fingerprint(again.certificate) == tlscert.fingerprint(first.certificate)


@pytest.mark.parametrize("state", ["expiring", "expired", "missing", "damaged", "other-key"])
def test_certificate_is_issued_again_for_the_same_key(tmp_path: Path, state: str) -> None:
    first = load_identity(TlsConfig(), tmp_path)
    cert_file = tmp_path / CERT_FILE
    if state == "expiring":
        soon = tlscert.self_signed("ghostmesh", key=first.private_key, days=RENEW_BEFORE.days - 1)
        cert_file.write_bytes(soon.cert_pem)
    elif state == "expired":
        cert_file.write_bytes(tlscert.self_signed("ghostmesh", key=first.private_key, days=0).cert_pem)
    elif state == "missing":
        cert_file.unlink()
    elif state == "damaged":
        cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    else:
        cert_file.write_bytes(tlscert.self_signed("ghostmesh").cert_pem)
    renewed = load_identity(TlsConfig(), tmp_path)
    assert tlscert.fingerprint(renewed.certificate) == tlscert.fingerprint(first.certificate)  # pins hold
    assert renewed.certificate.serial_number != first.certificate.serial_number
    assert _days_left(renewed) > SELF_SIGNED_DAYS - 1
    assert cert_file.read_bytes() == renewed.cert_pem
    assert (tmp_path / KEY_FILE).read_bytes() == first.key_pem  # the key file is never rewritten


def test_a_key_others_may_read_is_refused(tmp_path: Path) -> None:
    load_identity(TlsConfig(), tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match=r"tls\.key: others may read it \(mode 644\); chmod 600 it"):
        load_identity(TlsConfig(), tmp_path)


def test_a_damaged_key_is_refused_not_replaced(tmp_path: Path) -> None:
    load_identity(TlsConfig(), tmp_path)
    key_file = tmp_path / KEY_FILE
    key_file.write_bytes(b"not a key")
    with pytest.raises(ConfigError) as info:
        load_identity(TlsConfig(), tmp_path)
    assert str(info.value).startswith(f"ghostmesh's TLS key {key_file} is not an unencrypted")
    assert key_file.read_bytes() == b"not a key"


def test_configured_pair_is_used_as_given(tmp_path: Path) -> None:
    own = tlscert.self_signed("mesh.example.com")
    (tmp_path / "chain.pem").write_bytes(own.cert_pem)
    (tmp_path / "key.pem").write_bytes(own.key_pem)
    cfg = TlsConfig(cert_file=str(tmp_path / "chain.pem"), key_file=str(tmp_path / "key.pem"))
    pair = load_identity(cfg, tmp_path / "state")
    assert (pair.self_signed, pair.cert_pem) == (False, own.cert_pem)
    assert not (tmp_path / "state").exists()  # nothing made next to the database
    other = tlscert.self_signed("x")
    (tmp_path / "key.pem").write_bytes(other.key_pem)
    with pytest.raises(ConfigError, match=r"^tls\.key_file: .* does not match the certificate"):
        load_identity(cfg, tmp_path / "state")
