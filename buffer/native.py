"""How many rows a Native or RowBinary body holds, read without decoding the values.

ClickHouse's HTTP clients send Native (clickhouse-connect's ``insert()`` does) without saying how
many rows it holds, and the buffer counts every row it takes. A Native body is a run of blocks: ``varint
columns | varint rows``, then per column its name, its type and its values, column by column. To
reach the next block the values are skipped by their type's layout: fixed widths, strings' varint
lengths, Nullable's null map, Array's and Map's offsets, Tuple's elements, LowCardinality's
dictionary and indexes. A type whose layout is not known here (JSON, Dynamic, Variant,
AggregateFunction…) is refused with its name, as is a body that ends inside a block.

RowBinary has no blocks, only values, row after row: it is counted by skipping one value per
column, by the types of the columns the insert names (or the table's own), from the catalog.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from buffer.chsql import SqlError, tokens

_U64 = struct.Struct("<Q")
_WIDTHS = {
    "UInt8": 1, "Int8": 1, "Bool": 1, "Enum8": 1,
    "UInt16": 2, "Int16": 2, "Date": 2, "Enum16": 2, "BFloat16": 2,
    "UInt32": 4, "Int32": 4, "Float32": 4, "Date32": 4, "DateTime": 4, "IPv4": 4, "Decimal32": 4, "Time": 4,
    "UInt64": 8, "Int64": 8, "Float64": 8, "DateTime64": 8, "Decimal64": 8, "Time64": 8,
    "UInt128": 16, "Int128": 16, "UUID": 16, "IPv6": 16, "Decimal128": 16,
    "UInt256": 32, "Int256": 32, "Decimal256": 32,
}
# Geo types are names for nested layouts.
_ALIASES = {"Point": "Tuple(Float64, Float64)", "Ring": "Array(Tuple(Float64, Float64))",
            "LineString": "Array(Tuple(Float64, Float64))",
            "Polygon": "Array(Array(Tuple(Float64, Float64)))",
            "MultiLineString": "Array(Array(Tuple(Float64, Float64)))",
            "MultiPolygon": "Array(Array(Array(Tuple(Float64, Float64))))"}
_NEEDS_DICTIONARY_KEYS = 1 << 9  # LowCardinality: this block carries its own dictionary keys
MAX_DEPTH = 32  # a column type nested deeper is refused (ClickHouse's own types stay far below it)


class NativeError(Exception):
    """The body cannot be counted; ``unsupported`` when it is a type's layout that is not known here."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.unsupported = unsupported


@dataclass(frozen=True)
class Type:
    name: str
    args: tuple[Type, ...] = ()  # nested types (Nullable, Array, Tuple, Map, LowCardinality…)
    width: int = 0  # fixed-width types and FixedString(N)


def _parse_type(text: str) -> Type:
    toks = list(tokens(text.encode()))
    at = 0

    def one(depth: int = 0) -> Type:
        nonlocal at
        if depth > MAX_DEPTH:
            raise NativeError(f"the column type {text[:200]!r} nests deeper than {MAX_DEPTH} levels")
        tok = toks[at]
        if tok.kind != "word":
            raise NativeError(f"the column type {text!r} cannot be read")
        at += 1
        name = tok.value
        if name in _ALIASES:
            return _parse_type(_ALIASES[name])
        literals: list[str] = []
        nested: list[Type] = []
        if toks[at].kind == "punct" and toks[at].value == "(":
            at += 1
            while not (toks[at].kind == "punct" and toks[at].value == ")"):
                if toks[at].kind == "end":
                    raise NativeError(f"the column type {text!r} is not closed")
                if name in ("Tuple", "Nested") and toks[at].kind == "word" and toks[at + 1].kind == "word":
                    at += 1  # a named element: `name Type`
                if name == "SimpleAggregateFunction" and not nested and not literals:
                    literals.append(toks[at].value)  # the function's name, e.g. sum: not a type
                    at += 1
                elif toks[at].kind == "word" and name not in ("Enum8", "Enum16", "DateTime", "DateTime64"):
                    nested.append(one(depth + 1))
                else:
                    literals.append(toks[at].value)
                    at += 1
                if toks[at].kind == "punct" and toks[at].value == ",":
                    at += 1
            at += 1
        if name == "FixedString":
            return Type(name, width=int(literals[0]))
        if name == "Decimal":
            precision = int(literals[0])
            return Type(name, width=4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32)
        if name in _WIDTHS:
            return Type(name, width=_WIDTHS[name])
        if name == "SimpleAggregateFunction":
            return nested[-1]  # its values are its last argument's (the first names the function)
        if name in ("Nullable", "Array", "LowCardinality") and len(nested) == 1:
            return Type(name, tuple(nested))
        if name == "Map" and len(nested) == 2:
            return Type(name, tuple(nested))
        if name == "Tuple" and nested:
            return Type("Tuple", tuple(nested))
        if name == "Nested" and nested:  # a column of its own (flatten_nested=0): Array(Tuple(...))
            return Type("Array", (Type("Tuple", tuple(nested)),))
        if name == "String":
            return Type(name)
        raise NativeError(f"Native columns of type {text} cannot be counted by this buffer: send the rows as "
                          "JSONEachRow, CSV or TabSeparated", unsupported=True)

    try:
        return one()
    except SqlError as exc:
        raise NativeError(f"the column type {text!r} cannot be read: {exc.message}") from None
    except (IndexError, ValueError):
        raise NativeError(f"the column type {text!r} cannot be read") from None


type_of = functools.lru_cache(maxsize=1024)(_parse_type)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise NativeError("the body ends inside a row or block: it was cut short, or its columns are not the "
                              "ones named")

    def varint(self) -> int:
        shift = value = 0
        while True:
            self.need(1)
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise NativeError("a length in the Native body is not a valid varint")

    def u64(self) -> int:
        self.need(8)
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(value)

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def string(self) -> str:
        n = self.varint()
        self.need(n)
        text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text


def _prefix(r: _Reader, t: Type) -> None:
    """A column's state before its values: a key version for each LowCardinality in its type."""
    if t.name == "LowCardinality":
        r.u64()
    for element in t.args:
        if t.name != "LowCardinality":
            _prefix(r, element)


def _skip(r: _Reader, t: Type, n: int) -> None:
    """Skips ``n`` values of type ``t``, laid out as a Native column."""
    if n == 0:
        return
    if t.width:
        r.skip(t.width * n)
    elif t.name == "String":
        data, pos, end = r.data, r.pos, len(r.data)
        for _ in range(n):
            if pos < end and data[pos] < 0x80:  # a length under 128: one byte (the common case)
                pos += 1 + data[pos]
            else:
                r.pos = pos
                size = r.varint()
                pos = r.pos + size
        r.pos = pos
        r.need(0)
    elif t.name == "Nullable":
        r.skip(n)  # the null map
        _skip(r, t.args[0], n)
    elif t.name in ("Array", "Map"):
        r.skip(8 * (n - 1))
        total = r.u64()  # the last offset: how many elements in all
        for element in t.args:  # a Map is its keys, then its values
            _skip(r, element, total)
    elif t.name == "Tuple":
        for element in t.args:
            _skip(r, element, n)
    elif t.name == "LowCardinality":
        flags = r.u64()
        width = 1 << (flags & 0xFF)
        if width > 8:
            raise NativeError("a LowCardinality column's index width is not 1, 2, 4 or 8 bytes")
        if flags & _NEEDS_DICTIONARY_KEYS:
            inner = t.args[0]
            keys = r.u64()
            _skip(r, inner.args[0] if inner.name == "Nullable" else inner, keys)  # the keys are never Nullable
        rows = r.u64()
        r.skip(width * rows)
    else:  # pragma: no cover - _parse_type returns only the kinds above
        raise NativeError(f"Native columns of type {t.name} cannot be counted by this buffer", unsupported=True)


def count_rows(data: bytes | memoryview) -> int:
    """The rows in a Native body (every block's). Raises NativeError for a body that cannot be read."""
    r = _Reader(data)
    rows = 0
    while r.pos < len(data):
        columns = r.varint()
        n = r.varint()
        for _ in range(columns):
            r.string()  # its name
            spelled = r.string()
            t = type_of(spelled)
            if n:  # a block of no rows carries no values, and no LowCardinality state either
                _prefix(r, t)
                _skip(r, t, n)
        rows += n
    return rows


def _skip_one(r: _Reader, t: Type) -> None:
    """Skips one value of type ``t``, laid out as in RowBinary."""
    if t.width:
        r.skip(t.width)
    elif t.name == "String":
        r.skip(r.varint())
    elif t.name == "Nullable":
        r.need(1)
        null = r.data[r.pos]
        r.pos += 1
        if not null:
            _skip_one(r, t.args[0])
    elif t.name in ("Array", "Map"):
        for _ in range(r.varint()):
            for element in t.args:
                _skip_one(r, element)
    elif t.name == "Tuple":
        for element in t.args:
            _skip_one(r, element)
    elif t.name == "LowCardinality":  # RowBinary writes the values themselves
        _skip_one(r, t.args[0])
    else:  # pragma: no cover - _parse_type returns only the kinds above
        raise NativeError(f"RowBinary values of type {t.name} cannot be counted by this buffer", unsupported=True)


def count_row_binary(data: bytes | memoryview, types: list[str]) -> int:
    """The rows in a RowBinary body whose columns have these types, in order. Raises NativeError for
    a body that does not end at a row's end."""
    if not types:
        raise NativeError("a RowBinary insert needs its table's columns, which are not known")
    parsed = [type_of(t) for t in types]
    r = _Reader(data)
    rows = 0
    while r.pos < len(data):
        for t in parsed:
            _skip_one(r, t)
        rows += 1
    return rows
