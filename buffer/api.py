"""The client-facing API for Python applications: the generated messages and stubs.

    from buffer.api import ingest_pb2, ingest_pb2_grpc

Applications in other languages generate their own stubs from ``proto/ingestbuffer/v1/ingest.proto``.
"""

from buffer._proto.ingestbuffer.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["ingest_pb2", "ingest_pb2_grpc"]
