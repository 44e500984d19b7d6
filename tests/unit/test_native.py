"""Counting the rows of a Native body (buffer.native), on bodies the real ClickHouse engine wrote.

chDB runs in a process of its own here: the test process may hold another engine path already."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from buffer.native import NativeError, count_row_binary, count_rows

COLUMNS = """number AS id, toString(number) AS s, repeat('y', number % 300) AS long_s,
 toLowCardinality(toString(number % 7)) AS lc, if(number % 3 = 0, NULL, number) AS nul, [number, number + 1] AS arr,
 map(toString(number % 4), number) AS m,
 CAST(map(toLowCardinality(toString(number % 4)), number) AS Map(LowCardinality(String), UInt64)) AS mlc,
 [toLowCardinality(toString(number))] AS alc, (number, toString(number)) AS tup,
 CAST(tuple(number, 'x') AS Tuple(a UInt64, b String)) AS ntup, CAST('a' AS Enum8('a' = 1, 'b' = 2)) AS e,
 toDecimal64(number, 3) AS d, CAST(number AS Decimal(40, 2)) AS dbig, toDateTime64(number, 3, 'UTC') AS dt64,
 toDateTime(number, 'Europe/Berlin') AS dt, toFixedString('abc', 3) AS fs,
 toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0') AS u,
 toIPv6('::1') AS ip6, (1.5, 2.5)::Point AS p, toLowCardinality(if(number % 2 = 0, NULL, toString(number))) AS lcn,
 [[1, 2], [3]] AS aa, toDate(number) AS dd, true AS b, toInt128(number) AS i128,
 [NULL, number]::Array(Nullable(UInt64)) AS an"""


def native(sql: str, fmt: str = "Native") -> bytes:
    code = ("import sys\nfrom chdb import session\n"
            f"sys.stdout.buffer.write(session.Session().query({sql!r}, {fmt!r}).bytes())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module")
def bodies() -> dict[int, bytes]:
    return {n: native(f"SELECT {COLUMNS} FROM numbers({n}) SETTINGS max_block_size = 1000") for n in (1, 2500)}


def test_every_block_of_every_layout_is_counted(bodies: dict[int, bytes]) -> None:
    assert count_rows(bodies[1]) == 1
    assert count_rows(bodies[2500]) == 2500  # three blocks: 1000, 1000, 500
    assert count_rows(bodies[1] + bodies[2500]) == 2501


def test_a_body_cut_anywhere_inside_a_block_is_refused(bodies: dict[int, bytes]) -> None:
    body = bodies[1]
    for cut in range(1, len(body)):
        with pytest.raises(NativeError):
            count_rows(body[:cut])


def test_a_type_whose_layout_is_not_known_is_refused_by_name() -> None:
    with pytest.raises(NativeError) as caught:
        count_rows(native("SELECT CAST('{\"a\": 1}' AS JSON) AS j"))
    assert caught.value.unsupported and "JSON" in caught.value.message


def test_row_binary_is_counted_by_the_columns_types() -> None:
    body = native(f"SELECT {COLUMNS} FROM numbers(700)", "RowBinary")
    described = native(f"DESCRIBE TABLE (SELECT {COLUMNS} FROM numbers(1))", "JSONEachRow").decode().splitlines()
    types = [json.loads(line)["type"] for line in described]  # a named Tuple's spans lines: the tokenizer reads it
    assert len(types) == 26
    assert count_row_binary(body, types) == 700
    with pytest.raises(NativeError):
        count_row_binary(body[:-1], types)  # the last row cut short
    with pytest.raises(NativeError):
        count_row_binary(body, types[:-1])  # not the columns the body holds: it cannot end at a row's end


def test_layouts_a_table_may_have_beyond_the_common_ones() -> None:
    # A block of no rows carries no LowCardinality state: ClickHouse takes a header-only block first.
    empty = bytes([1, 0, 1]) + b"a" + bytes([22]) + b"LowCardinality(String)"
    lc = native("SELECT toLowCardinality(toString(number)) AS a FROM numbers(3)")
    assert count_rows(empty + lc) == 3
    agg = native("SELECT CAST(number AS SimpleAggregateFunction(sum, UInt64)) AS s FROM numbers(4)")
    assert count_rows(agg) == 4
    nested = native("SELECT CAST([(1, 2), (3, 4)] AS Nested(a UInt8, b UInt8)) AS n FROM numbers(2) "
                    "SETTINGS flatten_nested = 0", "RowBinary")
    assert count_row_binary(nested, ["Nested(a UInt8, b UInt8)"]) == 2
    with pytest.raises(NativeError, match="nests deeper"):
        count_row_binary(b"\x00", ["Array(" * 1000 + "UInt8" + ")" * 1000])
