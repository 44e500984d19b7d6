"""The client-facing API for Python applications: the generated messages and stubs, and the
protocol's constants (service name, trailing-metadata keys, formats).

    from buffer.api import ingest_pb2, ingest_pb2_grpc

Applications in other languages generate their own stubs from ``proto/ingestbuffer/v1/ingest.proto``.
Nothing here imports the server: a client needs only grpcio and protobuf.
"""

from buffer._proto.ingestbuffer.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["ACCEPTED_MESSAGES_KEY", "FORMATS", "FORMAT_NAMES", "RETRY_AFTER_KEY", "SERVICE_NAME", "ingest_pb2",
           "ingest_pb2_grpc"]

SERVICE_NAME: str = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
# Trailing metadata of a refusal: how long to wait before retrying (RESOURCE_EXHAUSTED), and how many
# messages of a stream the buffer accepted before the one it refused.
RETRY_AFTER_KEY = "retry-after-ms"
ACCEPTED_MESSAGES_KEY = "accepted-messages"

# Format enum value → (ClickHouse format name, is a line format: every row ends with a newline).
FORMATS: dict[int, tuple[str, bool]] = {
    ingest_pb2.FORMAT_JSON_EACH_ROW: ("JSONEachRow", True),
    ingest_pb2.FORMAT_JSON_COMPACT_EACH_ROW: ("JSONCompactEachRow", True),
    ingest_pb2.FORMAT_CSV: ("CSV", True),
    ingest_pb2.FORMAT_TSV: ("TabSeparated", True),
    ingest_pb2.FORMAT_ROW_BINARY: ("RowBinary", False),
    ingest_pb2.FORMAT_NATIVE: ("Native", False),
}
FORMAT_NAMES = {value: ingest_pb2.Format.Name(value) for value in FORMATS}
