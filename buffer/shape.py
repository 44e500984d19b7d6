"""The second half of a batch key: how ClickHouse is to read the rows.

A key is ``(table, shape)``. Rows from the gRPC API have the format's name as their shape
(``"CSV"``). Rows that came with a column list, or with settings that change how ClickHouse parses
them (ClickHouse's HTTP interface), have a shape of their own: a JSON array ``[format, [columns],
[[setting, value], …]]``. Rows with different column lists or settings therefore never share an
insert, and the write-ahead log keeps the shape with the rows, so a replay inserts them the same way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import orjson


class Shape(NamedTuple):
    format: str
    columns: tuple[str, ...] = ()  # () means the table's columns, in order
    settings: tuple[tuple[str, str], ...] = ()


def shape(fmt: str, columns: tuple[str, ...] = (), settings: tuple[tuple[str, str], ...] = ()) -> str:
    """The key's shape: the format's name alone when there is nothing else to say."""
    if not columns and not settings:
        return fmt
    return orjson.dumps([fmt, list(columns), [list(s) for s in sorted(settings)]]).decode()


@functools.lru_cache(maxsize=4096)
def parse(value: str) -> Shape:
    if not value.startswith("["):
        return Shape(value)
    fmt, columns, settings = orjson.loads(value)
    return Shape(fmt, tuple(columns), tuple((str(k), str(v)) for k, v in settings))


def format_of(value: str) -> str:
    """The ClickHouse format a shape reads its rows in."""
    return value if not value.startswith("[") else parse(value).format
