"""Telemetry leaves the process over OTLP when the standard variables say where."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.lifecycle.conftest import Serve


class Collector(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC receiver that remembers metric names and span names."""

    def __init__(self) -> None:
        self.metrics: set[str] = set()
        self.spans: list[tuple[str, dict[str, object]]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self.lock:
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        self.metrics.update(m.name for m in sm.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                        self.spans.append((span.name, attrs))
            return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    c = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(c, server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield c, port
    server.stop(0)


def test_metrics_and_flush_spans_are_exported_over_otlp(serve: Callable[..., Serve], chdb_dir: Path,
                                                        collector: tuple[Collector, int]) -> None:
    c, port = collector
    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--linger", "0s",
              env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                   "OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    s.wait_ready()
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        stub.Write(pb.WriteRequest(table="events", format=pb.FORMAT_JSON_EACH_ROW, rows=b'{"id":1,"s":"a"}\n'))
        stub.Flush(pb.FlushRequest())
    end = time.monotonic() + 20
    while time.monotonic() < end:
        with c.lock:
            if "ingest_buffer_accepted_rows" in c.metrics and c.spans:
                break
        time.sleep(0.1)
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0, s.log()
    assert {"ingest_buffer_accepted_rows", "ingest_buffer_flushed_rows", "ingest_buffer_buffer_rows"} <= c.metrics
    name, attrs = c.spans[0]
    assert name == "ingest_buffer.flush"
    assert attrs["db.collection.name"] == "events" and attrs["ingest_buffer.rows"] == 1
