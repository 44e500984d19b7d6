from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORMAT_UNSPECIFIED: _ClassVar[Format]
    FORMAT_JSON_EACH_ROW: _ClassVar[Format]
    FORMAT_JSON_COMPACT_EACH_ROW: _ClassVar[Format]
    FORMAT_CSV: _ClassVar[Format]
    FORMAT_TSV: _ClassVar[Format]
    FORMAT_ROW_BINARY: _ClassVar[Format]
    FORMAT_NATIVE: _ClassVar[Format]

class AckLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_LEVEL_UNSPECIFIED: _ClassVar[AckLevel]
    ACK_LEVEL_BUFFERED: _ClassVar[AckLevel]
    ACK_LEVEL_DURABLE: _ClassVar[AckLevel]
    ACK_LEVEL_COMMITTED: _ClassVar[AckLevel]
FORMAT_UNSPECIFIED: Format
FORMAT_JSON_EACH_ROW: Format
FORMAT_JSON_COMPACT_EACH_ROW: Format
FORMAT_CSV: Format
FORMAT_TSV: Format
FORMAT_ROW_BINARY: Format
FORMAT_NATIVE: Format
ACK_LEVEL_UNSPECIFIED: AckLevel
ACK_LEVEL_BUFFERED: AckLevel
ACK_LEVEL_DURABLE: AckLevel
ACK_LEVEL_COMMITTED: AckLevel

class WriteRequest(_message.Message):
    __slots__ = ("table", "format", "rows", "row_count", "ack_level", "producer", "sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    format: Format
    rows: bytes
    row_count: int
    ack_level: AckLevel
    producer: str
    sequence: int
    def __init__(self, table: _Optional[str] = ..., format: _Optional[_Union[Format, str]] = ..., rows: _Optional[bytes] = ..., row_count: _Optional[int] = ..., ack_level: _Optional[_Union[AckLevel, str]] = ..., producer: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("rows", "bytes", "ack_level", "duplicate")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    rows: int
    bytes: int
    ack_level: AckLevel
    duplicate: bool
    def __init__(self, rows: _Optional[int] = ..., bytes: _Optional[int] = ..., ack_level: _Optional[_Union[AckLevel, str]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class WriteStreamRequest(_message.Message):
    __slots__ = ("table", "format", "rows", "row_count", "ack_level")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    table: str
    format: Format
    rows: bytes
    row_count: int
    ack_level: AckLevel
    def __init__(self, table: _Optional[str] = ..., format: _Optional[_Union[Format, str]] = ..., rows: _Optional[bytes] = ..., row_count: _Optional[int] = ..., ack_level: _Optional[_Union[AckLevel, str]] = ...) -> None: ...

class WriteStreamResponse(_message.Message):
    __slots__ = ("messages", "rows", "bytes", "ack_level")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    messages: int
    rows: int
    bytes: int
    ack_level: AckLevel
    def __init__(self, messages: _Optional[int] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., ack_level: _Optional[_Union[AckLevel, str]] = ...) -> None: ...

class WriteBatchesRequest(_message.Message):
    __slots__ = ("table", "format", "rows", "row_count", "ack_level", "producer", "sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACK_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    format: Format
    rows: bytes
    row_count: int
    ack_level: AckLevel
    producer: str
    sequence: int
    def __init__(self, table: _Optional[str] = ..., format: _Optional[_Union[Format, str]] = ..., rows: _Optional[bytes] = ..., row_count: _Optional[int] = ..., ack_level: _Optional[_Union[AckLevel, str]] = ..., producer: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class WriteBatchesResponse(_message.Message):
    __slots__ = ("sequence", "ok", "code", "message", "retry_after_ms")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    ok: WriteResponse
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, sequence: _Optional[int] = ..., ok: _Optional[_Union[WriteResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("rows_committed", "rows_failed")
    ROWS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    rows_committed: int
    rows_failed: int
    def __init__(self, rows_committed: _Optional[int] = ..., rows_failed: _Optional[int] = ...) -> None: ...
