"""ClickHouse's HTTP interface on the buffer, driven by clients no one here wrote: clickhouse-connect
and curl, against the real buffer on a real port and the real ClickHouse engine (embedded, and a
ClickHouse HTTP endpoint that read queries are forwarded to)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import os
import struct
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import zstandard
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.conftest import ClickHouse, HttpEndpoint, Running


def listener(buf: Running) -> tuple[str, int]:
    assert buf.app.clickhouse_http is not None
    host, port = buf.app.clickhouse_http.bound.rsplit(":", 1)
    return host, int(port)


async def start(start_buffer: Callable[..., Any], **settings: Any) -> Running:
    return await start_buffer(clickhouse_http_listen="127.0.0.1:0", **settings)


def post(buf: Running, body: bytes, query: str = "", headers: dict[str, str] | None = None,
         **params: str) -> tuple[int, dict[str, str], bytes]:
    host, port = listener(buf)
    if query:
        params["query"] = query
    url = f"http://{host}:{port}/?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def client(buf: Running, clickhouse: ClickHouse) -> Any:
    host, port = listener(buf)
    return clickhouse_connect.get_client(host=host, port=port, database=clickhouse.database)


async def test_clickhouse_connect_connects_and_its_raw_inserts_land_exactly_once(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("events")
    buf = await start(start_buffer)

    def use() -> Any:
        c = client(buf, clickhouse)
        c.raw_insert("events", None, b'{"id":1,"s":"a"}\n{"id":2,"s":"b"}\n', fmt="JSONEachRow")
        c.raw_insert("events", ["id", "s"], b"3,c\n4,d\n", fmt="CSV")
        c.raw_insert(f"{clickhouse.database}.events", None, b"5\te\n", fmt="TabSeparated")
        return c

    c = await asyncio.to_thread(use)
    await buf.flush()
    rows = await asyncio.to_thread(lambda: c.query("SELECT id, s FROM events ORDER BY id").result_rows)
    assert rows == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]  # read back through the buffer
    assert clickhouse.count("events") == 5


async def test_clickhouse_connect_insert_of_python_rows_lands_exactly_once(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("typed", "id UInt64, s String, tags Array(LowCardinality(String)), m Map(String, UInt32), "
                               "n Nullable(Float64), ts DateTime64(3), d Decimal(12, 2) DEFAULT 0")
    buf = await start(start_buffer)
    when = datetime.datetime(2026, 12, 1, 12, 0, 0, 123000)
    rows = [[i, f"row {i}", [f"t{i % 3}", "x"], {"k": i}, None if i % 2 else i / 2, when] for i in range(3000)]

    def use() -> Any:
        c = client(buf, clickhouse)  # compresses inserts with lz4, sends Native, several blocks
        c.insert("typed", rows, column_names=["id", "s", "tags", "m", "n", "ts"])
        c.insert("typed", [[3000, "last", [], {}, 1.5, when]], column_names=["id", "s", "tags", "m", "n", "ts"])
        return c

    await asyncio.to_thread(use)
    await buf.flush()
    got = clickhouse.client.query(f"SELECT count(), uniqExact(id), sum(length(tags)), countIf(isNull(n)), "
                                  f"max(ts), sum(m['k']) FROM {clickhouse.database}.typed").result_rows[0]
    assert got == (3001, 3001, 6000, 1500, when, sum(range(3000)))


async def test_row_binary_is_counted_by_the_catalogs_column_types_and_lands(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("rb", "id UInt64, s String, n Nullable(UInt8), tags Array(String), d UInt32 MATERIALIZED 5")

    def row(i: int) -> bytes:  # RowBinary, by hand: UInt64, String, Nullable(UInt8), Array(String)
        s = b"row %d" % i
        return (struct.pack("<Q", i) + bytes([len(s)]) + s + (b"\x01" if i % 2 else b"\x00\x07")
                + b"\x02" + b"\x01a" + b"\x02bc")

    buf = await start(start_buffer)
    c = await asyncio.to_thread(client, buf, clickhouse)
    await asyncio.to_thread(c.raw_insert, "rb", None, b"".join(row(i) for i in range(500)), fmt="RowBinary")
    await asyncio.to_thread(c.raw_insert, "rb", ["id", "s", "n", "tags"], row(500), fmt="RowBinary")
    status, _, text = await asyncio.to_thread(post, buf, b"".join(row(i) for i in range(3))[:-1],
                                              "INSERT INTO rb FORMAT RowBinary")
    assert status == 400 and b"cut short" in text  # the last row is a byte short: refused whole
    await buf.flush()
    got = clickhouse.client.query(f"SELECT count(), countIf(isNull(n)), sum(length(tags)), min(d) "
                                  f"FROM {clickhouse.database}.rb").result_rows[0]
    assert got == (501, 250, 1002, 5)


async def test_a_column_list_inserts_those_columns_and_the_table_fills_the_rest(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("wide", "id UInt64, s String, n UInt32 DEFAULT 7")
    buf = await start(start_buffer)
    status, _, _ = await asyncio.to_thread(post, buf, b'{"id":1}\n', "INSERT INTO wide (id) FORMAT JSONEachRow")
    assert status == 200
    status, _, _ = await asyncio.to_thread(post, buf, b'{"id":2,"s":"x","n":1}\n',
                                           "INSERT INTO wide FORMAT JSONEachRow")
    assert status == 200
    await buf.flush()
    assert clickhouse.client.query(f"SELECT id, s, n FROM {clickhouse.database}.wide ORDER BY id").result_rows == [
        (1, "", 7), (2, "x", 1)]


async def test_settings_that_change_parsing_go_with_their_rows(clickhouse: ClickHouse,
                                                               start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    # Skipping an unknown field is a parsing setting: without it the same row is refused by ClickHouse.
    status, _, body = await asyncio.to_thread(
        post, buf, b'{"id":1,"s":"a","extra":5}\n', "INSERT INTO t FORMAT JSONEachRow",
        input_format_skip_unknown_fields="1")
    assert status == 200, body
    status, _, _ = await asyncio.to_thread(
        post, buf, b'INSERT INTO t SETTINGS input_format_skip_unknown_fields = 1 FORMAT JSONEachRow\n'
                   b'{"id":2,"s":"b","other":1}\n')
    assert status == 200
    await buf.flush()
    assert clickhouse.count("t") == 2


async def test_curl_with_gzip_and_zstd_bodies_and_the_query_in_the_body(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Path) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    host, port = listener(buf)
    plain = tmp_path / "rows.csv"
    plain.write_bytes(b"".join(b"%d,row %d\n" % (i, i) for i in range(1000)))
    (tmp_path / "rows.gz").write_bytes(gzip.compress(b"".join(b"%d,row %d\n" % (i, i) for i in range(1000, 2000))))
    (tmp_path / "rows.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b"INSERT INTO t FORMAT CSV\n" + b"".join(b"%d,row %d\n" % (i, i) for i in range(2000, 3000))))
    url = f"http://{host}:{port}/"
    q = urllib.parse.quote("INSERT INTO t FORMAT CSV")

    def curl(*args: str) -> str:
        out = subprocess.run(["curl", "-sS", "-w", " %{http_code}", *args], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout

    results = await asyncio.to_thread(lambda: [
        curl("--data-binary", f"@{plain}", f"{url}?query={q}"),
        curl("--data-binary", f"@{tmp_path / 'rows.gz'}", "-H", "Content-Encoding: gzip", f"{url}?query={q}"),
        curl("--data-binary", f"@{tmp_path / 'rows.zst'}", "-H", "Content-Encoding: zstd", url),
        curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{plain}", f"{url}?query={q}"),
    ])
    assert [r.rsplit(" ", 1)[1] for r in results] == ["200"] * 4, results
    await buf.flush()
    # The chunked upload repeated the first file: ClickHouse counts it twice, the buffer took it twice.
    assert clickhouse.count("t") == 4000


@pytest.mark.parametrize(("query", "body", "code", "status", "words"), [
    ("INSERT INTO nope FORMAT JSONEachRow", b'{"id":1}\n', 60, 404, "nope"),
    ("INSERT INTO t FORMAT JSONEachRow", b'{"id":1,"s":"a"}\n{"id":2', 27, 400, "line 2"),
    ("INSERT INTO t VALUES", b"(1, 'a')", 48, 501, "FORMAT JSONEachRow"),
    ("INSERT INTO t SELECT 1, 'a'", b"", 48, 501, "INSERT … SELECT"),
    ("INSERT INTO t FORMAT Parquet", b"PAR1", 48, 501, "Parquet"),
    ("INSERT INTO t (id, missing) FORMAT CSV", b"1,2\n", 16, 400, "missing"),
    ("INSERT INTO other.t FORMAT CSV", b"1,a\n", 81, 404, "other"),
    ("INSERT INTO t FORMAT", b"", 62, 400, "format's name"),
    ("DROP TABLE t", b"", 48, 501, "DROP"),
    # A name is a name, quoted again when sent: no statement can be made of it (t is still there below).
    ("INSERT INTO `t; DROP TABLE t` FORMAT CSV", b"1,a\n", 27, 400, "table"),
    ("INSERT INTO t (`id) FORMAT CSV; DROP TABLE t --`) FORMAT CSV", b"1,a\n", 16, 400, "DROP TABLE"),
])
async def test_bad_input_gets_clickhouses_status_code_and_a_message_that_says_what_to_do(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], query: str, body: bytes, code: int, status: int,
        words: str) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    got, headers, text = await asyncio.to_thread(post, buf, body, query)
    message = text.decode()
    assert (got, headers.get("X-ClickHouse-Exception-Code")) == (status, str(code)), message
    assert message.startswith(f"Code: {code}. DB::Exception: ") and words in message
    # Nothing else was lost: a good insert beside it lands.
    ok, _, _ = await asyncio.to_thread(post, buf, b'{"id":9,"s":"ok"}\n', "INSERT INTO t FORMAT JSONEachRow")
    assert ok == 200
    await buf.flush()
    assert clickhouse.count("t") == 1


async def test_clickhouse_connect_raises_its_usual_exception_with_the_buffers_message(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer, buffer_max_bytes="4KiB", max_request_bytes="4KiB", flush_max_bytes="4KiB",
                      flush_interval="1h", when_full="reject")
    c = await asyncio.to_thread(client, buf, clickhouse)
    with pytest.raises(DatabaseError, match="missing_table"):
        await asyncio.to_thread(c.raw_insert, "missing_table", None, b'{"id":1}\n', fmt="JSONEachRow")
    with pytest.raises(DatabaseError, match="line 2 of the JSONEachRow payload is not one JSON object"):
        await asyncio.to_thread(c.raw_insert, "t", None, b'{"id":1}\n[1, 2]\n', fmt="JSONEachRow")
    big = b'{"id":1,"s":"%s"}\n' % (b"x" * 3000)
    await asyncio.to_thread(c.raw_insert, "t", None, big, fmt="JSONEachRow")
    with pytest.raises(DatabaseError, match=r"code: 745.*buffer full: 3016/4096 bytes"):
        await asyncio.to_thread(c.raw_insert, "t", None, big, fmt="JSONEachRow")


async def test_a_full_buffer_answers_503_with_retry_after(clickhouse: ClickHouse,
                                                          start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer, buffer_max_bytes="4KiB", max_request_bytes="4KiB", flush_max_bytes="4KiB",
                      flush_interval="1h", when_full="reject")
    row = b'{"id":1,"s":"%s"}\n' % (b"x" * 3000)
    first, _, _ = await asyncio.to_thread(post, buf, row, "INSERT INTO t FORMAT JSONEachRow")
    second, headers, text = await asyncio.to_thread(post, buf, row, "INSERT INTO t FORMAT JSONEachRow")
    assert first == 200
    assert second == 503 and int(headers["Retry-After"]) >= 1, text
    assert b"Code: 745." in text and b"full" in text


async def test_wait_for_async_insert_answers_once_the_rows_are_in_clickhouse(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer, flush_interval="200ms")
    status, headers, _ = await asyncio.to_thread(post, buf, b"1,a\n2,b\n", "INSERT INTO t FORMAT CSV",
                                                 wait_for_async_insert="1")
    assert status == 200 and headers["X-Ingest-Buffer-Ack"] == "committed"
    assert clickhouse.count("t") == 2  # no flush asked for: the 200 came after ClickHouse took them


async def test_a_retry_with_the_same_deduplication_token_adds_nothing(clickhouse: ClickHouse,
                                                                      start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    answers = [await asyncio.to_thread(post, buf, b"1,a\n2,b\n", "INSERT INTO t FORMAT CSV",
                                       insert_deduplication_token="batch-7") for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1].get("X-Ingest-Buffer-Duplicate") for a in answers] == [None, "1", "1"]
    await buf.flush()
    assert clickhouse.count("t") == 2


async def test_inserts_are_refused_with_503_once_the_buffer_drains(clickhouse: ClickHouse,
                                                                   start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    buf.app.lifecycle.shutdown()
    await buf.app.lifecycle.refusing.wait()
    status, headers, text = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV")
    assert status == 503 and "Retry-After" in headers, text


async def test_metrics_count_requests_and_rows_by_the_way_they_came(clickhouse: ClickHouse,
                                                                   start_buffer: Callable[..., Any]) -> None:
    from buffer.api import ingest_pb2 as pb
    from buffer.api import ingest_pb2_grpc as pb_grpc

    clickhouse.create("t")
    buf = await start(start_buffer)
    assert (await asyncio.to_thread(post, buf, b"1,a\n2,b\n", "INSERT INTO t FORMAT CSV"))[0] == 200
    assert (await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO nope FORMAT CSV"))[0] == 404
    await pb_grpc.IngestServiceStub(buf.channel).Write(pb.WriteRequest(table="t", format=pb.FORMAT_CSV,
                                                                       rows=b"3,c\n4,d\n5,e\n"))
    def metrics() -> str:
        with urllib.request.urlopen(f"{buf.http}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(metrics)
    want = {'outcome="ok",protocol="clickhouse_http"': 1, 'outcome="refused",protocol="clickhouse_http"': 1,
            'outcome="ok",protocol="grpc"': 1, 'outcome="refused",protocol="grpc"': 0}
    for labels, n in want.items():
        assert f"ingest_buffer_protocol_requests_total{{{labels}}} {n:.1f}" in text, labels
    assert 'ingest_buffer_protocol_rows_total{protocol="clickhouse_http"} 2.0' in text
    assert 'ingest_buffer_protocol_rows_total{protocol="grpc"} 3.0' in text


async def test_with_a_users_file_only_its_users_may_insert_or_read(clickhouse: ClickHouse, tmp_path: Path,
                                                                  start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    users = tmp_path / "users"
    users.write_text("# who may write through the buffer\napp:s3cret\n"
                     f"ops:sha256:{hashlib.sha256(b'hunter2').hexdigest()}\n")
    buf = await start(start_buffer, clickhouse_http_auth="users-file", clickhouse_http_users_file=str(users))
    host, port = listener(buf)
    nobody = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV")
    wrong = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV", user="app", password="nope")
    assert [(a[0], a[1].get("X-ClickHouse-Exception-Code")) for a in (nobody, wrong)] == [(403, "516")] * 2
    assert b"default:" in nobody[2] and b"app:" in wrong[2]
    keyed = await asyncio.to_thread(post, buf, b"2,b\n", "INSERT INTO t FORMAT CSV",
                                    headers={"X-ClickHouse-User": "ops", "X-ClickHouse-Key": "hunter2"})
    assert keyed[0] == 200

    def as_app() -> Any:  # Basic auth, as clickhouse-connect sends it
        c = clickhouse_connect.get_client(host=host, port=port, username="app", password="s3cret",
                                          database=clickhouse.database)
        c.raw_insert("t", None, b"3,c\n", fmt="CSV")
        return c

    await asyncio.to_thread(as_app)
    await buf.flush()
    assert clickhouse.count("t") == 2


async def test_with_clickhouse_auth_the_clients_own_login_is_checked_and_outlives_an_outage(
        clickhouse: ClickHouse, tmp_path: Path, start_buffer: Callable[..., Any]) -> None:
    if clickhouse.url.startswith("chdb://"):
        pytest.skip("this test brings a ClickHouse with users of its own; the embedded engine has none")
    endpoint = HttpEndpoint(tmp_path / "ch", user="app:s3cret")
    try:
        url = endpoint.url.replace("http://", "http://app:s3cret@")
        await asyncio.to_thread(post_to, url, b"CREATE DATABASE d")
        await asyncio.to_thread(post_to, url, b"CREATE TABLE d.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
        buf = await start(start_buffer, clickhouse_url=url, database="d", clickhouse_http_auth="clickhouse")
        good = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV", user="app", password="s3cret")
        bad = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV", user="app", password="x")
        assert (good[0], bad[0], bad[1].get("X-ClickHouse-Exception-Code")) == (200, 403, "516")
        assert b"ClickHouse refused" in bad[2]
        endpoint.stop()  # ClickHouse goes away: the login it took still counts, an unknown one cannot be checked
        again = await asyncio.to_thread(post, buf, b"2,b\n", "INSERT INTO t FORMAT CSV", user="app", password="s3cret")
        other = await asyncio.to_thread(post, buf, b"2,b\n", "INSERT INTO t FORMAT CSV", user="bob", password="b")
        assert again[0] == 200
        assert other[0] == 503 and "Retry-After" in other[1]
    finally:
        endpoint.stop()


def post_to(url: str, sql: bytes) -> None:
    parts = urllib.parse.urlsplit(url)
    req = urllib.request.Request(f"{parts.scheme}://{parts.hostname}:{parts.port}/", data=sql, method="POST",
                                 headers={"X-ClickHouse-User": parts.username or "", "X-ClickHouse-Key":
                                          parts.password or ""})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


WORDS = ["INSERT", "INTO", "insert into", "t", "`t`", '"t"', "nope", "FORMAT", "format", "CSV", "JSONEachRow", "Native",
         "RowBinary", "Values", "VALUES", "SELECT", "1", "(", ")", ",", "id", "s", "SETTINGS", "=", "'x'", "--", "/*",
         "*/", "#", ";", "TABLE", "FUNCTION", ".", "db", "\n", "WITH", "DESCRIBE", "SHOW", "`", "'", '"', "\\"]


async def test_fuzzed_statements_headers_and_bodies_get_an_answer_never_a_500(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    clickhouse.create("t")
    buf = await start(start_buffer)
    seen: dict[int, int] = {}
    statements = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
                           st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join))

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(query=statements, in_body=st.booleans(), body=st.binary(max_size=200),
           encoding=st.sampled_from(["", "gzip", "zstd", "lz4", "br", "deflate", "identity", "bogus", "gzip, br"]),
           params=st.dictionaries(st.sampled_from(["input_format_skip_unknown_fields", "query_id", "database",
                                                   "wait_for_async_insert", "insert_deduplication_token", "x y",
                                                   "date_time_input_format", "param_a", "default_format"]),
                                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=20), max_size=3))
    def one(query: str, in_body: bool, body: bytes, encoding: str, params: dict[str, str]) -> None:
        headers = {"Content-Encoding": encoding} if encoding else {}
        sent = query.encode() + b"\n" + body if in_body else body
        status, answer, text = post(buf, sent, "" if in_body else query, headers=headers, **params)
        seen[status] = seen.get(status, 0) + 1
        if answer.get("X-Ingest-Buffer-Forwarded"):
            return  # a read query ClickHouse answered: its status is ClickHouse's
        assert status in (200, 400, 403, 404, 413, 501, 503), (status, text[:300])
        if status != 200:
            assert text.startswith(b"Code: "), text[:300]

    await asyncio.to_thread(one)
    ping = await asyncio.to_thread(post, buf, b"", "SELECT 1")
    assert ping[0] == 200 and ping[2] == b"1\n"  # still serving
    assert len(seen) >= 3, seen  # the inputs reached several answers, not one refusal over and over


async def test_aiochclient_inserts_json_rows_and_files_and_reads_back(clickhouse: ClickHouse,
                                                                     start_buffer: Callable[..., Any]) -> None:
    from aiochclient import ChClient, ChClientError
    from aiohttp import ClientSession

    clickhouse.create("t")
    buf = await start(start_buffer)
    host, port = listener(buf)
    async with ClientSession() as session:
        ch = ChClient(session, url=f"http://{host}:{port}/", database=clickhouse.database)
        assert await ch.is_alive()
        await ch.execute("INSERT INTO t FORMAT JSONEachRow", *[{"id": i, "s": f"row {i}"} for i in range(50)])
        await ch.insert_file("INSERT INTO t FORMAT CSV", b"".join(b"%d,csv\n" % i for i in range(50, 80)))
        with pytest.raises(ChClientError, match="INSERT … VALUES is not buffered"):
            await ch.execute("INSERT INTO t VALUES", (99, "values"))
        await buf.flush()
        assert await ch.fetchval("SELECT count() FROM t") == 80
    assert clickhouse.count("t") == 80


async def test_inserts_with_different_query_ids_share_one_insert(clickhouse: ClickHouse,
                                                                 start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer, flush_interval="1h")
    for i in range(20):
        status, headers, _ = await asyncio.to_thread(post, buf, b"%d,x\n" % i, "INSERT INTO t FORMAT CSV",
                                                     query_id=f"q-{i}")
        assert status == 200 and headers["X-ClickHouse-Query-Id"] == f"q-{i}"
    await buf.flush()
    parts = clickhouse.client.query(f"SELECT count() FROM system.parts WHERE database = '{clickhouse.database}' "
                                    "AND table = 't' AND active").result_rows[0][0]
    assert (clickhouse.count("t"), parts) == (20, 1)  # twenty requests, one insert


async def test_with_reads_off_clients_still_connect_and_insert_and_other_reads_are_refused(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    if clickhouse.url.startswith("chdb://"):
        pytest.skip("the embedded engine answers read queries in the buffer's own process, forwarding or not")
    clickhouse.create("t")
    buf = await start(start_buffer, clickhouse_http_reads="off")

    def use() -> tuple[Any, str]:
        c = client(buf, clickhouse)  # its connection probes (version, timezone, settings, SELECT 1) are answered
        c.raw_insert("t", None, b"1,a\n", fmt="CSV")
        with pytest.raises(DatabaseError) as caught:
            c.query("SELECT count() FROM t")
        return c, str(caught.value)

    c, refused = await asyncio.to_thread(use)
    assert "--clickhouse-http-reads off" in refused
    assert c.server_version == clickhouse.client.server_version  # ClickHouse's own, asked with the buffer's login
    await buf.flush()
    assert clickhouse.count("t") == 1


async def test_what_joined_batches_would_get_wrong_is_refused_at_the_door(clickhouse: ClickHouse,
                                                                         start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start(start_buffer)
    skip = await asyncio.to_thread(post, buf, b"h\n1,a\n", "INSERT INTO t FORMAT CSV",
                                   input_format_csv_skip_first_lines="1")
    unknown = await asyncio.to_thread(post, buf, b"1,a\n", "INSERT INTO t FORMAT CSV", input_format_no_such_thing="1")
    header = await asyncio.to_thread(post, buf, b"s,id\na,1\n", "INSERT INTO t (s, id) FORMAT CSV")
    assert [(a[0], a[1].get("X-ClickHouse-Exception-Code")) for a in (skip, unknown, header)] == [
        (400, "36"), (400, "115"), (400, "27")]
    assert b"joined" in skip[2] and b"input_format_no_such_thing" in unknown[2] and b"header" in header[2]


async def test_a_read_on_the_embedded_engine_cannot_write_or_reach_files(clickhouse: ClickHouse, tmp_path: Path,
                                                                        start_buffer: Callable[..., Any]) -> None:
    if not clickhouse.url.startswith("chdb://"):
        pytest.skip("reads are forwarded to ClickHouse here: its own grants decide")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read\n")
    buf = await start(start_buffer)
    outfile = tmp_path / "out.txt"
    for query in (f"SELECT 'x' INTO OUTFILE '{outfile}'", f"SELECT * FROM file('{secret}', 'LineAsString')",
                  f"SELECT 1; INSERT INTO FUNCTION file('{outfile}', 'LineAsString') SELECT 'x'"):
        status, headers, text = await asyncio.to_thread(post, buf, query.encode())
        assert (status, headers.get("X-ClickHouse-Exception-Code")) == (403, "164"), text
        assert b"do not read" not in text
    assert not outfile.exists()
