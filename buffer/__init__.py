"""ingest-buffer: a sidecar that buffers rows sent over gRPC and writes them to ClickHouse in batches."""

__version__ = "0.1.0"
