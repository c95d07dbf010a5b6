"""The redis backend over TLS (``rediss://``) with a password and an ACL
user from the URL.

A module fixture makes a throwaway CA and a server certificate for
127.0.0.1 with the `cryptography` package, then starts a redis-server
that listens on a TLS port of 127.0.0.1 only (``--port 0`` turns plain
TCP off). Clients pass the CA in the URL: ``?ssl_ca_certs=<path>``.
"""

import datetime
import ipaddress
import os
import socket
import subprocess
import time
import urllib.parse

import pytest

import mqs

redis = pytest.importorskip("redis")
x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

PASSWORD = "tls-default-pw"
USER, USER_PASSWORD = "alice", "alice-tls-pw"
START_TIMEOUT_S = 20.0


def _write_key(path, key):
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _make_certificates(directory):
    """Write ca.pem, server.pem and server.key; return their paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from = now - datetime.timedelta(minutes=5)
    valid_to = now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            "mqs test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                       critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .sign(ca_key, hashes.SHA256()))
    paths = {name: directory / name
             for name in ("ca.pem", "server.pem", "server.key")}
    paths["ca.pem"].write_bytes(
        ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["server.pem"].write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server.key"], server_key)
    return paths


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tls_url(port, ca_path, user="", password=PASSWORD):
    ca = urllib.parse.quote(str(ca_path), safe="")
    return (f"rediss://{user}:{password}@127.0.0.1:{port}/0"
            f"?ssl_ca_certs={ca}")


def _launch(binary, directory, paths):
    """Start redis-server on a free TLS port and wait until it answers.

    Returns (process, port), or (None, log text) if the server exited,
    such as when another process took the port first.
    """
    port = _free_port()
    log_path = directory / f"redis-{port}.log"
    command = [
        binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port",
        str(port), "--tls-cert-file", str(paths["server.pem"]),
        "--tls-key-file", str(paths["server.key"]), "--tls-ca-cert-file",
        str(paths["ca.pem"]), "--tls-auth-clients", "no", "--dir",
        str(directory), "--save", "", "--appendonly", "no",
        "--requirepass", PASSWORD, "--user", USER, "on",
        f">{USER_PASSWORD}", "~*", "&*", "+@all",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(_tls_url(port, paths["ca.pem"]),
                                  socket_timeout=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while process.poll() is None:
            try:
                if client.ping():
                    return process, port
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                _stop(process)
                pytest.fail(f"redis-server did not answer over TLS on port "
                            f"{port} within {START_TIMEOUT_S} s")
            time.sleep(0.05)
    finally:
        client.close()
    return None, log_path.read_text(errors="replace")


def _stop(process):
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """Start a TLS-only redis-server; yield (port, CA path)."""
    from mqs._redis_server import find_redis_server

    binary = find_redis_server()
    if binary is None:
        # As tests/conftest.py: CI must run every Redis test.
        reason = ("no redis-server binary on PATH (Debian: apt-get install "
                  "redis-server)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set", pytrace=False)
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("redis-tls")
    paths = _make_certificates(directory)
    for _ in range(3):
        process, found = _launch(binary, directory, paths)
        if process is not None:
            break
        lower = found.lower()
        # A build without TLS rejects the tls-* options or logs that TLS
        # is not supported.
        if "tls" in lower and ("not supported" in lower
                               or "not available" in lower
                               or "bad directive" in lower):
            pytest.skip(f"this redis-server build has no TLS support; its "
                        f"log: {found[-300:]}")
        if "address already in use" not in lower:
            pytest.fail(f"redis-server with --tls-port exited; its log: "
                        f"{found[-1000:]}")
    else:
        pytest.fail("redis-server found its TLS port taken 3 times")
    try:
        yield found, paths["ca.pem"]
    finally:
        _stop(process)


def test_tls_acl_user_publish_consume_ack(tls_server):
    port, ca_path = tls_server
    url = _tls_url(port, ca_path, user=USER, password=USER_PASSWORD)
    broker = mqs.Broker(backend="redis", url=url, namespace="tls-acl")
    try:
        assert USER_PASSWORD not in repr(broker._backend)
        consumer = broker.consume("t", "g", prefetch=10)
        ids = broker.publish_many("t", [b"one", b"two", b"three"])
        got = consumer.get_many(10, timeout=5)
        assert [m.body for m in got] == [b"one", b"two", b"three"]
        assert [m.id for m in got] == ids
        assert consumer.ack_many(got) == 3
        stats = broker.stats("t")
        assert stats["acked"] == 3
        assert stats["stored"] == 0
    finally:
        broker.close()


def test_tls_requirepass_default_user(tls_server):
    port, ca_path = tls_server
    broker = mqs.Broker(backend="redis", url=_tls_url(port, ca_path),
                        namespace="tls-default")
    try:
        broker.publish("t", b"x")
        message = broker.consume("t", "g").get(timeout=5)
        assert message.body == b"x"
        assert message.ack()
    finally:
        broker.close()


def test_tls_wrong_password_rejected(tls_server):
    port, ca_path = tls_server
    url = _tls_url(port, ca_path, user=USER, password="wrong-pw")
    with pytest.raises(mqs.BackendConnectionError,
                       match="rejected the credentials") as info:
        mqs.Broker(backend="redis", url=url)
    assert "wrong-pw" not in str(info.value)


def test_tls_unknown_ca_fails_at_once(tls_server):
    # Without the test CA the server's certificate cannot be verified. No
    # retry can change that, so the error comes before retry_timeout.
    port, _ = tls_server
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
    started = time.monotonic()
    with pytest.raises(mqs.CertificateVerifyError) as info:
        mqs.Broker(backend="redis", url=url, retry_timeout=60)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "ssl_ca_certs" in message
    assert "ssl_cert_reqs=none" in message
    assert PASSWORD not in message
    assert isinstance(info.value, mqs.BackendConnectionError)
    # Generous, and still far below the 60 s retry_timeout.
    assert elapsed < 30


def test_tls_unverified_url_connects(tls_server):
    # The second fix the error names: skip the certificate check.
    port, _ = tls_server
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none"
    broker = mqs.Broker(backend="redis", url=url, namespace="tls-noverify")
    try:
        broker.publish("t", b"x")
        assert broker.consume("t", "g").get(timeout=5).body == b"x"
    finally:
        broker.close()


def test_plain_tcp_to_tls_port_fails(tls_server):
    port, _ = tls_server
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    with pytest.raises(mqs.BackendConnectionError):
        mqs.Broker(backend="redis", url=url, retry_timeout=0.3,
                   socket_timeout=0.5)
