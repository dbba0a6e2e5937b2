"""TLS: the server behind its own certificate, the SDK verifying it against a CA bundle."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fedclient
from tests.conftest import LiveServer


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedserver test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_device_trains_over_tls_verifying_the_server(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    live: LiveServer = live_server(tls=(cert, key), devices_per_round=1)
    assert live.url.startswith("https://")
    data = (digits.x_train[:100], digits.y_train[:100])
    device = fedclient.Client(live.url, "digits", data, verify=str(cert))
    assert device.run_once().status == "uploaded"
    device.close()
    assert live.server.service.job_status("digits").model_version == 1
    # Without the CA bundle the certificate does not verify: the device sends nothing.
    stranger = fedclient.Client(
        live.url, "digits", data, retry=fedclient.RetryPolicy(max_attempts=1)
    )
    with pytest.raises(fedclient.TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        stranger.run_once()
    stranger.close()
