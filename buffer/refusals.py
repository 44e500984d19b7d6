"""Why the buffer refuses a write: domain errors, raised where the decision is made.

Validation (``framing``), the table catalog and the ring raise these; the gRPC service maps each
class to a status code in one table (``service.STATUS``). Every message says what happened and what
the client does about it; ``reason`` is the short label of the ``rejected_requests`` metric.
"""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class InvalidRequest(Refusal):
    """The request is malformed: retrying it unchanged can never succeed."""


class UnknownTable(Refusal):
    """The table (or its database) does not exist, or is not on the allowlist."""


class Unsupported(Refusal):
    """This build or configuration cannot give what the request asks (an ack level)."""


class BufferFull(Refusal):
    """No room for the request; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(f"{message}; retry after {retry_after:g}s", "buffer_full")
        self.retry_after = retry_after


class BufferClosed(Refusal):
    """The buffer no longer accepts rows (draining)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "draining")


class NeedsLog(Refusal):
    """The request asks for what only the write-ahead log gives (ACK_LEVEL_DURABLE)."""


class LogUnavailable(Refusal):
    """The write-ahead log cannot be written (a full or failing disk)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "log_unavailable")


class CommitFailed(Refusal):
    """Rows were accepted but did not all reach ClickHouse (COMMITTED acks)."""
