"""The INSERT head reader (buffer.chsql), the key's shape (buffer.shape) in the log, and body decompression."""

from __future__ import annotations

import gzip
import zlib

import brotli
import lz4.frame
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.chhttp import Failure, decompress
from buffer.chsql import SqlError, first_word, one_read, parse_insert, tokens
from buffer.errors import quote_identifier
from buffer.shape import format_of, parse, shape
from buffer.walformat import decode_rows, rows_record


def test_the_head_is_read_as_clickhouses_lexer_reads_it() -> None:
    text = (b"/* a /* nested */ comment */ insert -- to the end of the line\n INTO # and this\n TABLE "
            b"`my``db`.\"we\\\"ird\" (`a b`, c) SETTINGS input_format_skip_unknown_fields = 1, x = 'it''s', y = -2 "
            b"FORMAT jsoneachrow   \r\n{\"a b\":1}\n")
    insert = parse_insert(text)
    assert (insert.database, insert.table, insert.columns) == ("my`db", 'we"ird', ("a b", "c"))
    assert insert.settings == (("input_format_skip_unknown_fields", "1"), ("x", "it's"), ("y", "-2"))
    assert insert.format == "jsoneachrow"
    assert text[insert.data_start:] == b'{"a b":1}\n'


@pytest.mark.parametrize(("text", "rows"), [
    (b"INSERT INTO t FORMAT CSV\n1,2\n", b"1,2\n"),  # after the first newline
    (b"INSERT INTO t FORMAT CSV 1,2\n", b"1,2\n"),  # or after the spaces
    (b"INSERT INTO t FORMAT CSV\n\n1,2\n", b"\n1,2\n"),  # only the first newline goes
    (b"INSERT INTO t FORMAT CSV", b""),
])
def test_the_rows_start_where_clickhouse_starts_them(text: bytes, rows: bytes) -> None:
    assert text[parse_insert(text).data_start:] == rows


def test_the_rows_are_never_read_as_sql() -> None:
    for rows in (b"/* never closed", b'"caf\xe9",1\n', b"'\xff\xfe", b"`"):
        text = b"INSERT INTO t FORMAT RowBinary\n" + rows
        assert text[parse_insert(text).data_start:] == rows


def test_a_read_on_the_engine_is_one_statement_and_writes_no_file() -> None:
    assert one_read(b"SELECT 1;") is None and one_read(b"SELECT ';' -- ; x") is None
    assert "more than one statement" in (one_read(b"SELECT 1; INSERT INTO FUNCTION file('x') SELECT 1") or "")
    assert "OUTFILE" in (one_read(b"SELECT 1 into /* */ OUTFILE '/tmp/x'") or "")


def test_the_word_format_inside_a_name_or_a_comment_is_not_the_clause() -> None:
    text = b"INSERT INTO `FORMAT CSV` /* FORMAT TSV */ (`FORMAT`) FORMAT JSONEachRow\n{}\n"
    insert = parse_insert(text)
    assert (insert.table, insert.columns, insert.format) == ("FORMAT CSV", ("FORMAT",), "JSONEachRow")


@pytest.mark.parametrize(("text", "code"), [
    (b"INSERT INTO t VALUES (1)", 48), (b"INSERT INTO t SELECT 1", 48), (b"INSERT INTO t (a) WITH 1 AS x SELECT x", 48),
    (b"INSERT INTO FUNCTION file('x') FORMAT CSV", 48), (b"INSERT t FORMAT CSV", 62), (b"INSERT INTO t", 62),
    (b"INSERT INTO t (a,) FORMAT CSV", 62), (b"INSERT INTO t /* open FORMAT CSV", 62),
    (b"INSERT INTO t FORMAT CSV;", 62), (b"INSERT INTO `` FORMAT CSV", 62),
])
def test_what_is_not_an_insert_of_rows_is_refused_with_clickhouses_code(text: bytes, code: int) -> None:
    with pytest.raises(SqlError) as caught:
        parse_insert(text)
    assert caught.value.code == code


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(names, st.lists(names, min_size=1, max_size=5, unique=True))
@settings(max_examples=300, deadline=None)
def test_any_name_quoted_as_the_sink_quotes_it_reads_back_unchanged(table: str, columns: list[str]) -> None:
    text = (f"INSERT INTO {quote_identifier(table)} ({', '.join(map(quote_identifier, columns))}) FORMAT CSV\n"
            "1\n").encode()
    insert = parse_insert(text)
    assert (insert.table, insert.columns) == (table, tuple(columns))
    assert text[insert.data_start:] == b"1\n"


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_any_bytes_give_an_insert_or_a_sql_error_and_nothing_else(text: bytes) -> None:
    for candidate in (text, b"INSERT INTO " + text, b"INSERT INTO t " + text):
        try:
            insert = parse_insert(candidate)
        except SqlError as exc:
            assert exc.code in (48, 62)
        else:
            assert 0 < insert.data_start <= len(candidate)
        assert isinstance(first_word(candidate), str)
        try:
            list(tokens(candidate))
        except SqlError as exc:
            assert exc.code == 62


def test_a_shape_with_columns_and_settings_survives_the_log_and_a_plain_one_stays_a_format() -> None:
    assert shape("CSV") == "CSV" and format_of("CSV") == "CSV"
    shaped = shape("JSONEachRow", ("b", "a"), (("z", "1"), ("input_format_x", "y")))
    assert parse(shaped).columns == ("b", "a") and parse(shaped).settings == (("input_format_x", "y"), ("z", "1"))
    assert format_of(shaped) == "JSONEachRow"
    for key in ("CSV", shaped):
        buffers = rows_record(7, key, "t", [(2, b'{"a":1}\n{"a":2}\n')], 0)
        body = memoryview(b"".join(buffers)[13:])  # past the frame's header (magic, length, crc, kind)
        record = decode_rows(body, 0)
        assert (record.fmt, record.table, record.first_lsn, [p[0] for p in record.parts]) == (key, "t", 7, [2])


PAYLOAD = b"".join(b"%d,row %d\n" % (i, i) for i in range(5000))


@pytest.mark.parametrize(("encoding", "packed"), [
    ("gzip", gzip.compress(PAYLOAD)), ("deflate", zlib.compress(PAYLOAD)),
    ("zstd", zstandard.ZstdCompressor().compress(PAYLOAD)), ("lz4", lz4.frame.compress(PAYLOAD)),
    ("br", brotli.compress(PAYLOAD)), ("", PAYLOAD),
])
def test_every_encoding_clickhouse_clients_send_is_read_and_bounded(encoding: str, packed: bytes) -> None:
    assert decompress(packed, encoding, len(PAYLOAD)) == PAYLOAD
    with pytest.raises(Failure) as caught:
        decompress(packed, encoding, len(PAYLOAD) - 1)  # a bomb stops at the bound, it is not inflated whole
    assert caught.value.status == 413


def test_a_body_that_is_not_what_its_encoding_says_is_a_clear_400() -> None:
    for encoding in ("gzip", "zstd", "lz4", "br"):
        with pytest.raises(Failure) as caught:
            decompress(b"plain text", encoding, 1000)
        assert (caught.value.status, caught.value.code) == (400, 271)
    with pytest.raises(Failure) as caught:
        decompress(b"x", "snappy", 1000)
    assert caught.value.code == 89


@pytest.mark.parametrize("encoding", ["gzip", "zstd", "lz4", "br"])
def test_a_compressed_body_cut_short_is_refused_not_taken_in_part(encoding: str) -> None:
    packed = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "lz4": lz4.frame.compress,
              "br": brotli.compress}[encoding](PAYLOAD)
    with pytest.raises(Failure) as caught:
        decompress(packed[:len(packed) // 2], encoding, len(PAYLOAD))
    assert (caught.value.status, caught.value.code) == (400, 271)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "zstd", "lz4"])
def test_every_member_of_a_concatenated_body_is_read_and_trailing_bytes_are_refused(encoding: str) -> None:
    pack = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstandard.ZstdCompressor().compress,
            "lz4": lz4.frame.compress}[encoding]
    assert decompress(pack(PAYLOAD) + pack(b"more\n"), encoding, 10 * len(PAYLOAD)) == PAYLOAD + b"more\n"
    with pytest.raises(Failure) as caught:
        decompress(pack(PAYLOAD) + b"not compressed", encoding, 10 * len(PAYLOAD))
    assert caught.value.code == 271
