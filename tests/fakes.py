"""Test doubles for one module at a time: an in-memory sink and a hand-driven clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from buffer.sink import Payload, Schema


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Insert:
    table: str
    fmt: str
    payload: bytes
    token: str


@dataclass
class MemorySink:
    """Records inserts; ``failures`` is a queue of exceptions raised by the next inserts."""

    inserts: list[Insert] = field(default_factory=list)
    attempts: list[Insert] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    table_names: set[str] = field(default_factory=set)
    gate: threading.Event | None = None  # when set, inserts wait for it
    on_insert: Callable[[Insert], None] | None = None
    written: Callable[[Insert], int] | None = None  # the rows ClickHouse reports written (None: it does not say)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def insert(self, table: str, fmt: str, payload: Payload, token: str) -> int | None:
        item = Insert(table, fmt, payload if isinstance(payload, bytes) else b"".join(payload), token)
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.attempts.append(item)
            if self.failures:
                raise self.failures.pop(0)
            self.inserts.append(item)
        if self.on_insert is not None:
            self.on_insert(item)
        return None if self.written is None else self.written(item)

    def schema(self) -> Schema:
        return Schema(True, {t: () for t in self.table_names})

    def query_rows(self, sql: str, parameters: dict[str, object] | None = None) -> list[tuple[object, ...]]:
        return []

    def close(self) -> None:
        pass

    def rows(self, table: str | None = None) -> int:
        return sum(i.payload.count(b"\n") for i in self.inserts if table is None or i.table == table)


class ClickHouseError(Exception):
    """Shaped like clickhouse-connect's DatabaseError: the code is in the message."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(f"Code: {code}. DB::Exception: simulated failure. ({name})")
