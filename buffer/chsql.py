"""ClickHouse's SQL as far as its HTTP interface needs it: a tokenizer, and the head of an INSERT.

ClickHouse's HTTP interface takes the statement in the ``query`` parameter, at the head of the body,
or split between the two (the parameter, a newline, then the body). For ``INSERT … FORMAT`` the rows
follow the statement. Only the head is read here, token by token, as ClickHouse's lexer reads it:

* whitespace; ``--`` and ``#`` (followed by a space or ``!``) comments to the end of the line; ``/* */``
  comments, which nest;
* bare identifiers and keywords (keywords in any case); identifiers quoted with backticks or double
  quotes, where the quote is escaped by a backslash or doubled; string literals in single quotes;
  numbers; and punctuation.

Nothing here builds SQL. The names it returns are checked against the catalog, and quoted again as
identifiers when the batch is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Insert", "SqlError", "Token", "first_word", "one_read", "parse_insert", "tokens"]

# A statement's head is at most this long (ClickHouse's own max_query_size is 256 KiB); rows follow.
MAX_HEAD = 256 * 1024

_TOKEN = re.compile(rb"""
    (?P<space>[ \t\n\r\f\v]+)
  | (?P<comment>--[^\n]*|\#[ !][^\n]*)
  | (?P<open>/\*)
  | (?P<word>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
  | (?P<quoted>`(?:[^`\\]|\\.|``)*`|"(?:[^"\\]|\\.|"")*")
  | (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<number>[0-9][0-9A-Za-z_.]*(?:[eE][+-][0-9]+)?)
  | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)
_COMMENT_EDGE = re.compile(rb"/\*|\*/")
_HEX = re.compile(rb"[0-9A-Fa-f]{2}")
_ESCAPES = {ord("b"): "\b", ord("f"): "\f", ord("r"): "\r", ord("n"): "\n", ord("t"): "\t", ord("0"): "\0",
            ord("a"): "\a", ord("v"): "\v"}


class SqlError(Exception):
    """A statement that cannot be taken: ``code`` and ``name`` are ClickHouse's error for it."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message


def _syntax(message: str, at: int) -> SqlError:
    return SqlError(62, "SYNTAX_ERROR", f"Syntax error at position {at}: {message}")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # word, quoted, string, number, punct, end
    value: str  # a word as written, a quoted name or string unescaped, the punctuation itself
    start: int  # byte offsets in the statement
    end: int

    def keyword(self, *words: str) -> bool:
        return self.kind == "word" and self.value.upper() in words


def _unescape(raw: bytes, at: int) -> str:
    """The text inside quotes: backslash escapes as ClickHouse reads them, a doubled quote as one."""
    quote, body = raw[:1], raw[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        if b == 0x5C and i + 1 < len(body):  # backslash
            nxt = body[i + 1]
            if nxt == ord("x") and _HEX.fullmatch(body, i + 2, i + 4):
                out.append(int(body[i + 2:i + 4], 16))
                i += 4
                continue
            escaped = _ESCAPES.get(nxt)
            out += escaped.encode() if escaped is not None else bytes([nxt])
            i += 2
        elif body[i:i + 1] == quote:  # doubled (the pattern admits no single one inside)
            out += quote
            i += 2
        else:
            out.append(b)
            i += 1
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise _syntax("a quoted name or string is not valid UTF-8", at) from None


def tokens(text: bytes, start: int = 0) -> Iterator[Token]:
    """The tokens of ``text`` from ``start``, skipping whitespace and comments; an ``end`` token last."""
    pos = start
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        assert m is not None  # the pattern's last branch takes any byte
        kind = m.lastgroup
        if kind in ("space", "comment"):
            pos = m.end()
            continue
        if kind == "open":
            pos = _skip_comment(text, pos)
            continue
        raw = m.group()
        value = _unescape(raw, pos) if kind in ("quoted", "string") else raw.decode("utf-8", "replace")
        yield Token(kind or "punct", value, pos, m.end())
        pos = m.end()
    yield Token("end", "", n, n)


def _skip_comment(text: bytes, pos: int) -> int:
    depth = 0
    for m in _COMMENT_EDGE.finditer(text, pos):
        depth += 1 if m.group() == b"/*" else -1
        if depth == 0:
            return m.end()
    raise _syntax("a /* comment is not closed", pos)


def one_read(text: bytes) -> str | None:
    """Why a read query may not run on the buffer's own engine (None when it may): one statement
    only, and no INTO OUTFILE (ClickHouse's readonly=1 lets that write a file)."""
    previous: Token | None = None
    ended = False
    try:
        for token in tokens(text):
            if token.kind == "end":
                return None
            if ended:
                return "it holds more than one statement: send one at a time"
            if token.kind == "punct" and token.value == ";":
                ended = True
            elif previous is not None and previous.keyword("INTO") and token.keyword("OUTFILE"):
                return "INTO OUTFILE would write a file on the buffer's host"
            previous = token
    except SqlError as exc:
        return exc.message
    return None


def first_word(text: bytes) -> str:
    """The statement's first keyword, upper case ('' if it starts otherwise): what kind it is."""
    try:
        for token in tokens(text[:MAX_HEAD]):
            return token.value.upper() if token.kind == "word" else ""
    except SqlError:
        return ""
    return ""


@dataclass(frozen=True)
class Insert:
    """The head of an ``INSERT INTO [TABLE] [db.]table [(columns)] [SETTINGS …] FORMAT name``."""

    database: str | None
    table: str
    columns: tuple[str, ...] | None
    settings: tuple[tuple[str, str], ...]
    format: str  # as written
    data_start: int  # where the rows begin, in the statement's bytes


class _Reader:
    def __init__(self, text: bytes) -> None:
        self.it = tokens(text)
        self.token = next(self.it)

    def take(self) -> Token:
        token, self.token = self.token, next(self.it, self.token)
        return token

    def take_last(self) -> Token:
        """The current token, reading nothing after it (the rows follow: they are not SQL)."""
        return self.token

    def name(self, what: str) -> str:
        token = self.take()
        if token.kind == "word" or (token.kind == "quoted" and token.value):
            return token.value
        raise _syntax(f"expected {what}, found {_shown(token)}", token.start)

    def punct(self, char: str) -> bool:
        if self.token.kind == "punct" and self.token.value == char:
            self.take()
            return True
        return False


def _shown(token: Token) -> str:
    return "the end of the statement" if token.kind == "end" else repr(token.value[:40])


WORKING = "JSONEachRow, JSONCompactEachRow, CSV, TabSeparated (TSV), RowBinary or Native"  # what buffer.chhttp takes


def parse_insert(text: bytes) -> Insert:
    """Reads an INSERT's head; raises SqlError for anything else (VALUES and SELECT included)."""
    r = _Reader(text[:MAX_HEAD])
    for word in ("INSERT", "INTO"):
        token = r.take()
        if not token.keyword(word):
            raise _syntax(f"expected {word}, found {_shown(token)}", token.start)
    if r.token.keyword("FUNCTION"):
        raise SqlError(48, "NOT_IMPLEMENTED", "INSERT INTO FUNCTION is not buffered: insert into a table, "
                                              f"FORMAT {WORKING}")
    if r.token.keyword("TABLE"):
        r.take()
    database: str | None = None
    table = r.name("a table name")
    if r.punct("."):
        database, table = table, r.name("a table name after the database")
    columns: tuple[str, ...] | None = None
    if r.punct("("):
        names = [r.name("a column name")]
        while r.punct(","):
            names.append(r.name("a column name"))
        if not r.punct(")"):
            raise _syntax(f"expected ',' or ')' in the column list, found {_shown(r.token)}", r.token.start)
        columns = tuple(names)
    settings: list[tuple[str, str]] = []
    if r.token.keyword("SETTINGS"):
        r.take()
        while True:
            key = r.take()
            if key.kind != "word":
                raise _syntax(f"expected a setting's name, found {_shown(key)}", key.start)
            if not r.punct("="):
                raise _syntax(f"expected '=' after the setting {key.value}", r.token.start)
            negative = r.punct("-")
            value = r.take()
            if value.kind not in ("string", "number", "word"):
                raise _syntax(f"expected a value for the setting {key.value}, found {_shown(value)}", value.start)
            settings.append((key.value, ("-" if negative else "") + value.value))
            if not r.punct(","):
                break
    token = r.take()
    if token.keyword("VALUES"):
        raise SqlError(48, "NOT_IMPLEMENTED", "INSERT … VALUES is not buffered: send the rows with FORMAT "
                                              f"{WORKING}")
    if token.keyword("SELECT", "WITH") or (token.kind == "punct" and token.value == "("):
        raise SqlError(48, "NOT_IMPLEMENTED", "INSERT … SELECT is not buffered (it reads from ClickHouse): run it "
                                              f"against ClickHouse, or send the rows with FORMAT {WORKING}")
    if not token.keyword("FORMAT"):
        raise _syntax(f"expected FORMAT, found {_shown(token)}", token.start)
    fmt = r.take_last()
    if fmt.kind not in ("word", "quoted") or not fmt.value:
        raise _syntax(f"expected a format's name after FORMAT, found {_shown(fmt)}", fmt.start)
    # The rows start after the first newline, if there is one, or after the spaces (as in ClickHouse).
    data = fmt.end
    while data < len(text) and text[data] in b" \t\f":
        data += 1
    if text[data:data + 1] == b"\r":
        data += 1
    if text[data:data + 1] == b"\n":
        data += 1
    if text[data:data + 1] == b";":
        raise _syntax("a ';' after the format's name: the rows follow it directly (on the next line)", data)
    return Insert(database, table, columns, tuple(settings), fmt.value, data)
