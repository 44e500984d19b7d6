"""tests/clickhouse_http.py speaks enough of ClickHouse's HTTP interface for clickhouse-connect.

The other HTTP-path tests rely on it, so it is proven here with clickhouse-connect's own sync and
async clients, and with raw requests for what the clients do not show (statement in the body,
errors and summary headers).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import clickhouse_connect
import pytest

from tests.conftest import HttpEndpoint


@pytest.fixture
def db(http_endpoint: HttpEndpoint) -> Iterator[str]:
    name = f"http_{uuid.uuid4().hex[:8]}"
    client = clickhouse_connect.get_client(host="127.0.0.1", port=http_endpoint.port)
    client.command(f"CREATE DATABASE {name}")
    client.command(f"CREATE TABLE {name}.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                   "SETTINGS non_replicated_deduplication_window = 100")
    yield name
    client.command(f"DROP DATABASE {name}")
    client.close()


def post(endpoint: HttpEndpoint, query: str | None, body: bytes) -> tuple[int, dict[str, str], bytes]:
    url = endpoint.url + "/" + (f"?query={urllib.request.quote(query)}" if query else "")
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_sync_client_queries_inserts_and_binds_parameters(http_endpoint: HttpEndpoint, db: str) -> None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=http_endpoint.port, database=db)
    assert client.server_version.count(".") >= 2
    client.insert("t", [[1, "a"], [2, "b"]], column_names=["id", "s"])  # Native, via the body
    summary = client.raw_insert("t", None, b'{"id":3,"s":"c"}\n', fmt="JSONEachRow")
    assert summary.written_rows == 1, "the summary header reaches the client"
    rows = client.query("SELECT id, s FROM t WHERE id >= {low:UInt64} ORDER BY id", parameters={"low": 2})
    assert rows.result_rows == [(2, "b"), (3, "c")]
    client.close()


def test_settings_in_the_url_apply_deduplication(http_endpoint: HttpEndpoint, db: str) -> None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=http_endpoint.port, database=db)
    for _ in range(2):
        client.raw_insert("t", None, b'{"id":9,"s":"x"}\n', fmt="JSONEachRow",
                          settings={"insert_deduplication_token": "same"})
    assert client.command("SELECT count() FROM t") == 1
    client.close()


async def test_async_client(http_endpoint: HttpEndpoint, db: str) -> None:
    client = await clickhouse_connect.get_async_client(host="127.0.0.1", port=http_endpoint.port, database=db)
    await client.raw_insert("t", None, b'{"id":5,"s":"async"}\n{"id":6,"s":"async"}\n', fmt="JSONEachRow")
    result = await client.query("SELECT count() FROM t WHERE s = 'async'")
    assert result.result_rows == [(2,)]
    await client.close()


def test_statement_at_the_head_of_the_body(http_endpoint: HttpEndpoint, db: str) -> None:
    status, headers, _ = post(http_endpoint, None, f"INSERT INTO {db}.t FORMAT JSONEachRow\n".encode()
                              + b'{"id":7,"s":"body"}\n')
    assert status == 200 and json.loads(headers["X-ClickHouse-Summary"])["written_rows"] == "1"
    status, _, out = post(http_endpoint, None, f"SELECT s FROM {db}.t WHERE id = 7".encode())
    assert (status, out) == (200, b"body\n")


def test_errors_look_like_clickhouse_errors(http_endpoint: HttpEndpoint, db: str) -> None:
    status, headers, body = post(http_endpoint, f"INSERT INTO {db}.t FORMAT JSONEachRow", b'{"id":"x"}\n')
    assert status >= 400
    code = int(headers["X-ClickHouse-Exception-Code"])
    assert body.startswith(f"Code: {code}. DB::Exception:".encode())
    status, headers, _ = post(http_endpoint, f"INSERT INTO {db}.missing FORMAT JSONEachRow", b'{"id":1}\n')
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")


def test_injected_faults_fail_inserts_before_or_after_commit(http_endpoint: HttpEndpoint, db: str) -> None:
    post(http_endpoint, None, b"")  # a ping-like request keeps the connection logic honest
    urllib.request.urlopen(urllib.request.Request(http_endpoint.url + "/__faults?code=252&count=1", method="POST"))
    status, headers, _ = post(http_endpoint, f"INSERT INTO {db}.t FORMAT JSONEachRow", b'{"id":11,"s":"f"}\n')
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "252")
    urllib.request.urlopen(urllib.request.Request(http_endpoint.url + "/__faults?code=209&count=1&after=1",
                                                  method="POST"))
    status, _, _ = post(http_endpoint, f"INSERT INTO {db}.t FORMAT JSONEachRow", b'{"id":12,"s":"f"}\n')
    assert status == 500
    _, _, out = post(http_endpoint, None, f"SELECT groupArray(id) FROM {db}.t WHERE s = 'f'".encode())
    assert out == b"[12]\n", "before: nothing committed; after: committed, then the error"
