"""OpenTelemetry metrics and traces.

Metrics are read from the counters the buffer keeps anyway (observable instruments), so the hot
path pays nothing for them; only per-batch figures (flush duration, batch size) are recorded as
they happen. Prometheus text is served on ``/metrics``; OTLP export starts when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) variables are set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Reading = Callable[[], Iterable[tuple[float, dict[str, str]]]]


def _otlp_wanted(signal: str) -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


class Telemetry:
    def __init__(self, service_name: str = "ingest-buffer") -> None:
        self.registry = CollectorRegistry()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        if _otlp_wanted("METRICS"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            log.info("exporting metrics over OTLP")
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.meter = self.meter_provider.get_meter("ingest_buffer")
        self.tracer_provider = TracerProvider(resource=resource)
        if _otlp_wanted("TRACES"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            log.info("exporting traces over OTLP")
        self.tracer = self.tracer_provider.get_tracer("ingest_buffer")
        self.flush_duration = self.meter.create_histogram(
            "ingest_buffer_flush_duration", unit="s", description="time to insert one batch, retries included")
        self.batch_rows = self.meter.create_histogram(
            "ingest_buffer_batch_rows", unit="{row}", description="rows per inserted batch")
        self.batch_bytes = self.meter.create_histogram(
            "ingest_buffer_batch_size", unit="By", description="bytes per inserted batch")
        self.drain_duration = self.meter.create_histogram(
            "ingest_buffer_drain_duration", unit="s", description="from the first drain signal to an empty buffer")

    def observe(self, name: str, description: str, reading: Reading, *, unit: str = "1",
                kind: str = "counter") -> None:
        """Registers an instrument whose value is read from the buffer's own counters on collection."""

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(value, attrs) for value, attrs in reading()]
            except RuntimeError:  # a dict changed size while another thread collected; skip once
                return []

        create: Any = (self.meter.create_observable_counter if kind == "counter"
                       else self.meter.create_observable_gauge)
        create(name, callbacks=[callback], unit=unit, description=description)

    def prometheus_text(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data

    def shutdown(self) -> None:
        for provider in (self.meter_provider, self.tracer_provider):
            try:
                provider.shutdown()
            except Exception:  # exporters failing at exit must not change the exit code
                log.debug("telemetry shutdown failed", exc_info=True)


def noop_tracer() -> trace.Tracer:
    return trace.NoOpTracer()
