"""ghostcore.tlscert: self-signed certificates, loading a PEM pair with config-key errors, SPKI pins, and
the server context (a TLS handshake over memory BIOs, no socket)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ghostcore import tlscert
from ghostcore.errors import ConfigError


def _write(tmp_path: Path, cert_pem: bytes, key_pem: bytes) -> tuple[str, str]:
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    return str(tmp_path / "c.pem"), str(tmp_path / "k.pem")


def _reissue(pair: tlscert.CertPair, common_name: str) -> x509.Certificate:
    """Another certificate for the same key (a renewal)."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pair.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(pair.private_key, hashes.SHA256())
    )


def test_self_signed_names_and_validity() -> None:
    pair = tlscert.self_signed(
        "mesh.example", sans=["192.0.2.7", "alt.example", "mesh.example", "2001:db8::1"]
    )
    cert = pair.certificate
    assert pair.self_signed
    assert cert.subject.rfc4514_string() == "CN=mesh.example"
    assert cert.issuer == cert.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mesh.example", "alt.example"]  # the repeat once
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=364)
    assert isinstance(pair.private_key, ec.EllipticCurvePrivateKey)
    assert x509.load_pem_x509_certificate(pair.cert_pem) == cert
    assert "key_pem" not in repr(pair)
    assert "private_key" not in repr(pair)


def test_self_signed_without_sans_names_the_common_name_only() -> None:
    sans = tlscert.self_signed("ghostgate").certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert list(sans.value) == [x509.DNSName("ghostgate")]


def test_load_round_trip(tmp_path: Path) -> None:
    made = tlscert.self_signed("mesh.example")
    loaded = tlscert.load(*_write(tmp_path, made.cert_pem, made.key_pem), where="control")
    assert loaded.certificate == made.certificate
    assert not loaded.self_signed
    assert tlscert.spki_sha256(loaded.certificate) == tlscert.spki_sha256(made.certificate)


def test_load_errors_name_the_config_keys(tmp_path: Path) -> None:
    pair = tlscert.self_signed("x")
    cert, key = _write(tmp_path, pair.cert_pem, pair.key_pem)
    missing = str(tmp_path / "missing.pem")
    cases: list[tuple[str, str, str]] = [
        (missing, key, r"^control\.cert_file: cannot read .*missing\.pem"),
        (cert, missing, r"^control\.key_file: cannot read .*missing\.pem"),
        (key, key, r"^control\.cert_file: .* is not a PEM certificate"),
        (cert, cert, r"^control\.key_file: .* is not an unencrypted PEM private key"),
    ]
    for cert_file, key_file, message in cases:
        with pytest.raises(ConfigError, match=message):
            tlscert.load(cert_file, key_file, where="control")

    other = tlscert.self_signed("x").key_pem
    (tmp_path / "other.pem").write_bytes(other)
    with pytest.raises(
        ConfigError, match=r"^relay\.key_file: .*other\.pem does not match the certificate in"
    ):
        tlscert.load(cert, str(tmp_path / "other.pem"), where="relay")

    encrypted = pair.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    (tmp_path / "enc.pem").write_bytes(encrypted)
    with pytest.raises(ConfigError, match=r"^relay\.key_file: .* not an unencrypted PEM private key"):
        tlscert.load(cert, str(tmp_path / "enc.pem"), where="relay")

    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ed.pem").write_bytes(ed)
    with pytest.raises(ConfigError, match=r"^relay\.key_file: .*: only ECDSA and RSA keys are supported"):
        tlscert.load(cert, str(tmp_path / "ed.pem"), where="relay")


def test_spki_sha256_pins_the_key_not_the_certificate() -> None:
    pair = tlscert.self_signed("a")
    spki = pair.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = tlscert.spki_sha256(pair.certificate)
    assert digest == hashlib.sha256(spki).digest()
    renewed = _reissue(pair, "b")
    assert renewed != pair.certificate
    assert tlscert.spki_sha256(renewed) == digest  # a renewal with the same key keeps the pin
    assert tlscert.spki_sha256(tlscert.self_signed("a").certificate) != digest  # a new key does not


def test_fingerprint_is_base64url_of_the_spki_digest() -> None:
    cert = tlscert.self_signed("a").certificate
    fp = tlscert.fingerprint(cert)
    assert fp.startswith("sha256:")
    body = fp.removeprefix("sha256:")
    assert len(body) == 43  # 32 bytes, unpadded
    assert "=" not in body
    assert "+" not in body
    assert "/" not in body
    assert base64.urlsafe_b64decode(body + "=") == tlscert.spki_sha256(cert)


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Run a TLS handshake between the two contexts over memory BIOs; returns the client's end."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="ghost.test")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return c
    raise AssertionError("TLS handshake did not finish")


def test_server_ssl_context_serves_the_pair_with_alpn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pair = tlscert.self_signed("ghost.test")
    server = tlscert.server_ssl_context(pair, ["ghostrelay"])
    assert list(tmp_path.iterdir()) == []  # the PEM file and its directory are gone
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["ghostrelay"])
    end = _handshake(server, client)
    assert end.selected_alpn_protocol() == "ghostrelay"
    der = end.getpeercert(binary_form=True)
    assert der is not None
    assert x509.load_der_x509_certificate(der) == pair.certificate


def test_server_ssl_context_without_alpn() -> None:
    pair = tlscert.self_signed("ghost.test")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=pair.cert_pem.decode())  # pinned: the self-signed cert is its CA
    end = _handshake(tlscert.server_ssl_context(pair), client)
    assert end.selected_alpn_protocol() is None
