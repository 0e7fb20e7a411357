"""TLS on every NATS connection when a certificate is configured (docs/operations.md):
certificates made here with ``cryptography``, a real nats-server, `mnemos up`'s stack."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from mnemos.client import Client, job_spec
from mnemos.config import NatsSettings
from mnemos.connection import connect
from mnemos.embedded import EmbeddedNats, free_port
from mnemos.errors import Unavailable


def _certificates(root: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signs for 127.0.0.1 and localhost: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    root.mkdir(parents=True, exist_ok=True)
    paths = root / f"{name}-ca.pem", root / f"{name}-server.pem", root / f"{name}-server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tls")
    ca, cert, key = _certificates(root / "pki", "mnemos")
    other_ca, _, _ = _certificates(root / "pki", "other")
    server = EmbeddedNats(store_dir=root / "nats", port=free_port(), log_file=root / "nats.log", tls_cert=cert,
                          tls_key=key)
    server.start()
    yield server, ca, other_ca
    server.stop()


async def test_connections_are_tls_and_verify_the_server(tls_server: Any) -> None:
    server, ca, other_ca = tls_server
    assert server.url.startswith("tls://")
    nc = await connect(NatsSettings(nats_url=server.url, nats_tls_ca=str(ca)), "pytest-tls")
    try:
        assert nc._transport is not None and nc._transport._io_writer.get_extra_info("ssl_object") is not None
        assert (await nc.jetstream().account_info()).limits is not None
    finally:
        await nc.close()
    # A server certificate that the configured CA did not sign: refused by the client.
    with pytest.raises(Unavailable, match="(?i)certificate verify failed"):
        await connect(NatsSettings(nats_url=server.url, nats_tls_ca=str(other_ca), nats_connect_timeout_s=1),
                      "pytest-wrong-ca")
    # A client that will not do TLS: the server requires it and drops a plain CONNECT.
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        info = json.loads((await reader.readline()).decode().removeprefix("INFO "))
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), timeout=10)
        assert b"PONG" not in answer
    finally:
        writer.close()


def test_settings_turn_tls_on_for_a_ca_or_a_tls_url(tmp_path: Path) -> None:
    assert NatsSettings(nats_url="nats://127.0.0.1:4222").tls_context() is None
    assert NatsSettings(nats_url="tls://127.0.0.1:4222").tls_context() is not None
    ca, _, _ = _certificates(tmp_path, "x")
    assert NatsSettings(nats_url="nats://127.0.0.1:4222", nats_tls_ca=str(ca)).tls
    with pytest.raises(FileNotFoundError):
        NatsSettings(nats_url="tls://h:1", nats_tls_ca=str(tmp_path / "missing.pem")).tls_context()


def test_mnemos_up_serves_tls_with_users_per_role(tmp_path: Path) -> None:
    """`mnemos up --tls-cert ... --tls-key ... --tls-ca ...`: every child connects over TLS
    with its role's credentials; a job runs end to end."""
    from launchers.up import LocalStack, UpOptions

    ca, cert, key = _certificates(tmp_path / "pki", "up")
    options = UpOptions(data_dir=tmp_path / "data", port=free_port(), workers=1, gateway_port=0, tls_cert=cert,
                        tls_key=key, tls_ca=ca)
    with LocalStack(options) as stack:
        assert stack.settings.nats_url.startswith("tls://") and stack.settings.nats_tls_ca == str(ca.resolve())

        async def run_one() -> Any:
            async with await Client.connect(stack.settings) as client:
                return await client.run(job_spec("demo-fn:v1", function="add", args=[2, 3]), timeout=60)

        done = asyncio.run(run_one())
        assert done.status == "completed" and done.output is not None and done.output.result == 5
        log = (stack.logs / "nats-server.log").read_text()
        assert "TLS" in log and "Violation" not in log
