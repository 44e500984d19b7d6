"""OpenTelemetry metrics and traces.

Metrics are read from the counters the buffer keeps anyway (observable instruments), so the hot
path pays nothing for them; only per-batch figures (flush duration, batch size) are recorded as
they happen. The buffer's state lives on the event loop, and an exporter may collect from its own
thread (OTLP does), so the readings are taken on the loop — before each ``/metrics`` answer and
once a second by the ``metrics-snapshot`` routine — and the instruments' callbacks only hand out
the latest snapshot. Prometheus text is served on ``/metrics``; OTLP export starts when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) variables are set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

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
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)]
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
        self._readings: dict[str, Reading] = {}
        # name → observations; replaced whole (one reference assignment) by snapshot(), on the loop.
        self._snapshot: dict[str, list[Observation]] = {}
        seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
        self.flush_duration = self.meter.create_histogram(
            "ingest_buffer_flush_duration", unit="s", description="time to insert one batch, retries included",
            explicit_bucket_boundaries_advisory=seconds)
        self.batch_rows = self.meter.create_histogram(
            "ingest_buffer_batch_rows", unit="{row}", description="rows per inserted batch",
            explicit_bucket_boundaries_advisory=[1, 10, 100, 1_000, 10_000, 100_000, 1_000_000])
        self.batch_bytes = self.meter.create_histogram(
            "ingest_buffer_batch_size", unit="By", description="bytes per inserted batch",
            explicit_bucket_boundaries_advisory=[1024 * 4**i for i in range(10)])
        self.wal_fsync_duration = self.meter.create_histogram(
            "ingest_buffer_wal_fsync_duration", unit="s", description="time of one fdatasync of the write-ahead log",
            explicit_bucket_boundaries_advisory=[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1])
        self.wal_group_size = self.meter.create_histogram(
            "ingest_buffer_wal_group_size", unit="{record}", description="requests written by one group commit",
            explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 64, 256, 1024, 4096])
        self.drain_duration = self.meter.create_histogram(
            "ingest_buffer_drain_duration", unit="s", description="from the first drain signal to an empty buffer",
            explicit_bucket_boundaries_advisory=[0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300])

    def observe(self, name: str, description: str, reading: Reading, *, unit: str = "1",
                kind: str = "counter") -> None:
        """Registers an instrument whose value is read from the buffer's own counters (see snapshot)."""
        self._readings[name] = reading

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return self._snapshot.get(name, [])

        create: Any = (self.meter.create_observable_counter if kind == "counter"
                       else self.meter.create_observable_gauge)
        create(name, callbacks=[callback], unit=unit, description=description)

    def snapshot(self) -> None:
        """Reads every registered value. Call it on the event loop, which owns what it reads."""
        self._snapshot = {name: [Observation(value, attrs) for value, attrs in reading()]
                          for name, reading in self._readings.items()}

    def prometheus_text(self) -> bytes:
        """The metrics as Prometheus text, read fresh (call on the event loop)."""
        self.snapshot()
        data: bytes = generate_latest(self.registry)
        return data

    def shutdown(self) -> None:
        for provider in (self.meter_provider, self.tracer_provider):
            try:
                provider.shutdown(timeout_millis=3000) if provider is self.meter_provider else provider.shutdown()
            except Exception:  # exporters failing at exit must not change the exit code
                log.debug("telemetry shutdown failed", exc_info=True)
