"""MQTT telemetry over TLS with a user name and password, on a real mosquitto: a node publishes and the router
reads through mqtts:// with the broker's CA; a wrong password, a foreign CA or plaintext get nothing."""

from __future__ import annotations

import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from faasmoe.proto import telemetry as tm
from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.local_mesh import start_node
from faasmoe.router.observe.telemetry import TelemetryCollector
from mosquitto import start_broker


def _ca_and_server_cert(root):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test mqtt ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    root.mkdir(parents=True, exist_ok=True)
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "broker.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "broker.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return root / "ca.pem", root / "broker.pem", root / "broker.key"


@pytest.fixture
def tls_broker(tmp_path):
    ca, cert, key = _ca_and_server_cert(tmp_path / "pki")
    other_ca, _, _ = _ca_and_server_cert(tmp_path / "other")
    broker = start_broker(tmp_path / "broker", cert_file=cert, key_file=key, users={"mesh": "s3cret pass"})
    try:
        yield broker, ca, other_ca
    finally:
        broker.stop()


def test_node_publishes_and_router_reads_over_tls_with_a_password(tmp_path, tls_broker, monkeypatch):
    broker, ca, other_ca = tls_broker
    url = f"mqtts://mesh@127.0.0.1:{broker.port}?ca={ca}"
    node = start_node(tmp_path / "node", extra_args=["--node-id", "tls-node", "--mqtt", url],
                      env={**os.environ, "FAASMOE_MQTT_PASSWORD": "s3cret pass"})
    try:
        monkeypatch.setenv("FAASMOE_MQTT_PASSWORD", "s3cret pass")
        with TelemetryCollector(url) as tc:
            assert tc.wait_for(lambda c: c.nodes().get("tls-node", {}).get("online"), 15), (tc.nodes(), broker.log())
            assert tc.nodes()["tls-node"]["status"]["address"] == node.address
        monkeypatch.setenv("FAASMOE_MQTT_PASSWORD", "wrong")
        for bad in (url, f"mqtts://mesh:s3cret%20pass@127.0.0.1:{broker.port}?ca={other_ca}",
                    f"mqtt://127.0.0.1:{broker.port}"):
            with TelemetryCollector(bad) as tc:
                assert not tc.wait_for(lambda c: c.subscribed, 2.0), bad
                assert not tc.nodes()
    finally:
        node.stop()


@pytest.mark.parametrize("url, why", [
    ("mqtt://h?ca=/etc/hosts", "needs mqtts"),
    ("mqtts://h?ca=/nonexistent.pem", "does not exist"),
    ("mqtts://h?cafile=x", "only option"),
    ("mqtt://u:p@h", "cleartext"),
])
def test_broker_url_options_are_checked(url, why):
    with pytest.raises(ConfigError, match=why):
        tm.parse_broker_url(url)


def test_password_comes_from_the_environment_when_the_url_has_none(monkeypatch):
    monkeypatch.setenv("FAASMOE_MQTT_PASSWORD", "from-env")
    assert tm.parse_broker_url("mqtts://u@h").password == "from-env"
    assert tm.parse_broker_url("mqtts://u:inline@h").password == "inline"
    assert "from-env" not in str(tm.parse_broker_url("mqtts://u@h"))


def test_a_plus_in_the_ca_path_stays_a_plus(tmp_path):
    ca = tmp_path / "my+ca.pem"
    ca.write_text("x")
    assert tm.parse_broker_url(f"mqtts://h?ca={ca}").ca_file == str(ca)
