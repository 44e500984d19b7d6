"""Connection settings over the real HTTP path: credentials (also from files), TLS with a CA file,
compression, and several endpoints with failover."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from buffer.config import load
from buffer.errors import classify
from buffer.sink import ClickHouseSink
from tests.conftest import HttpEndpoint
from tests.faultproxy import FaultProxy

ROWS = b"".join(b'{"id":%d,"s":"x"}\n' % i for i in range(100))


def prepare(url: str, user: str = "default", password: str = "", ca: str | None = None) -> None:
    import clickhouse_connect

    from buffer.config import clickhouse_target

    t = clickhouse_target(url)
    client = clickhouse_connect.get_client(interface=t.interface, host=t.host, port=t.port, username=user,
                                           password=password, ca_cert=ca, verify=ca is not None)
    client.command("CREATE DATABASE IF NOT EXISTS app")
    client.command("CREATE TABLE IF NOT EXISTS app.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                   "SETTINGS non_replicated_deduplication_window = 1000")
    client.close()


def sink(url: str, **flags: str) -> ClickHouseSink:
    return ClickHouseSink(load({"clickhouse_url": url, "database": "app", **flags}, env={}))


def count(s: ClickHouseSink) -> int:
    return int(s.query_rows("SELECT count() FROM app.t")[0][0])


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[HttpEndpoint]:
    endpoint = HttpEndpoint(tmp_path / "chdb", user="alice:s3cret")
    prepare(endpoint.url, "alice", "s3cret")
    yield endpoint
    endpoint.stop()


def test_password_from_a_file_as_a_kubernetes_secret_would_mount_it(secured: HttpEndpoint, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    s = sink(secured.url.replace("http://", "http://alice@"), clickhouse_password_file=str(secret))
    s.insert("t", "JSONEachRow", ROWS, "tok-1")
    assert count(s) == 100
    s.close()


def test_user_and_password_settings_override_the_url(secured: HttpEndpoint) -> None:
    s = sink(secured.url.replace("http://", "http://bob:wrong@"), clickhouse_user="alice",
             clickhouse_password="s3cret")
    s.insert("t", "JSONEachRow", ROWS, "tok-2")
    assert count(s) == 100


def test_rejected_credentials_are_retryable_and_reported_clearly(secured: HttpEndpoint) -> None:
    from buffer.checks import startup_checks

    s = sink(secured.url.replace("http://", "http://alice:nope@"))
    with pytest.raises(Exception) as info:
        s.insert("t", "JSONEachRow", ROWS, "tok-3")
    failure = classify(info.value)
    assert failure.code == 516 and failure.retryable, "the rows are fine: keep them and retry"
    (finding,) = startup_checks(s, "app", ("t",), "alice")
    assert finding.level == "error" and "rejected the credentials of user 'alice'" in finding.message


@pytest.fixture
def tls_endpoint(tmp_path: Path) -> Iterator[tuple[HttpEndpoint, Path]]:
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    key, csr, crt, ext = tmp_path / "s.key", tmp_path / "s.csr", tmp_path / "s.crt", tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
        "-subj", "/CN=test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    endpoint = HttpEndpoint(tmp_path / "chdb", tls=(crt, key))
    prepare(endpoint.url, ca=str(ca_crt))
    yield endpoint, ca_crt
    endpoint.stop()


def test_tls_with_a_ca_file(tls_endpoint: tuple[HttpEndpoint, Path]) -> None:
    endpoint, ca = tls_endpoint
    s = sink(endpoint.url, clickhouse_ca_file=str(ca))
    s.insert("t", "JSONEachRow", ROWS, "tok-tls")
    assert count(s) == 100
    unverified = sink(endpoint.url)
    with pytest.raises(Exception) as info:
        unverified.insert("t", "JSONEachRow", ROWS, "tok-tls-2")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


@pytest.mark.parametrize("method", ["lz4", "zstd", "gzip", "none"])
def test_compressed_insert_bodies(tmp_path: Path, method: str) -> None:
    endpoint = HttpEndpoint(tmp_path / "chdb")
    try:
        prepare(endpoint.url)
        s = sink(endpoint.url, clickhouse_compression=method)
        s.insert("t", "JSONEachRow", ROWS, f"tok-{method}")
        assert count(s) == 100
        assert endpoint.stats()["encodings"].get(method if method != "none" else "identity", 0) >= 1
    finally:
        endpoint.stop()


def test_several_endpoints_fail_over_and_come_back(http_endpoint: HttpEndpoint) -> None:
    prepare(http_endpoint.url)
    from buffer.config import clickhouse_target

    t = clickhouse_target(http_endpoint.url)
    p1, p2 = FaultProxy(t.host, t.port).start(), FaultProxy(t.host, t.port).start()
    try:
        s = sink(f"{p1.url},{p2.url}")
        before = count(s)
        s.insert("t", "JSONEachRow", ROWS, "fo-1")
        assert p1.counters.connections >= 1 and p2.counters.connections == 0, "sticks to the first that works"
        p1.set("refuse")
        with pytest.raises(Exception) as info:
            s.insert("t", "JSONEachRow", ROWS, "fo-2")  # the attempt that finds p1 down
        assert classify(info.value).retryable
        s.insert("t", "JSONEachRow", ROWS, "fo-2")  # the flusher's retry: same token, other replica
        assert p2.counters.connections >= 1
        p1.set("pass")
        p2.set("refuse")
        with pytest.raises(OperationalError):
            s.insert("t", "JSONEachRow", ROWS, "fo-3")
        s.insert("t", "JSONEachRow", ROWS, "fo-3")
        assert count(s) - before == 300, "each batch landed once, wherever it landed"
        s.close()
    finally:
        p1.stop()
        p2.stop()
