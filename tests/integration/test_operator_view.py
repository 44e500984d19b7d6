"""The chart's Grafana dashboard and alert rules, read against what a running buffer exports: every
expression parses as PromQL (a parser library), and every metric it names is in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import promql_parser
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import ClickHouse
from tests.deploy.chart import CHART, render, values_file


def expressions() -> dict[str, str]:
    """Every PromQL expression the chart ships, by where it is (Grafana's variables given values)."""
    out: dict[str, str] = {}
    for obj in render(values_file(CHART / "ci" / "operator-values.yaml")):
        if obj["kind"] == "PrometheusRule":
            for rule in obj["spec"]["groups"][0]["rules"]:
                out[f"alert {rule['alert']}"] = rule["expr"]
        elif obj["kind"] == "ConfigMap" and "ingest-buffer.json" in obj.get("data", {}):
            for panel in json.loads(obj["data"]["ingest-buffer.json"])["panels"]:
                for target in panel["targets"]:
                    out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"].replace(
                        "$__rate_interval", "5m")
    return out


def metric_names(node: Any) -> Iterator[str]:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        return
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector", "vs"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from metric_names(child)
    for child in getattr(node, "args", None) or ():
        yield from metric_names(child)


def test_the_chart_ships_both_and_every_expression_parses() -> None:
    found = expressions()
    assert sum(k.startswith("alert") for k in found) >= 5 and sum(k.startswith("panel") for k in found) >= 10
    for where, expr in found.items():
        promql_parser.parse(expr)  # raises on anything Prometheus would not take
        assert set(metric_names(promql_parser.parse(expr))), f"{where} names no metric: {expr}"


async def test_every_metric_the_dashboard_and_alerts_use_is_exported_by_a_running_buffer(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    if not clickhouse.url.startswith("chdb://"):
        pytest.skip("the metrics are the buffer's, whatever its ClickHouse: one run is enough")
    clickhouse.create("t")
    clickhouse.create("gone")
    buf = await start_buffer(wal_dir=str(tmp_path / "wal"), flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    # Rows that land, a row ClickHouse refuses (an insert error, a dead letter), a refused request,
    # and a table dropped under its rows (held): every labelled family then has a series.
    await stub.Write(pb.WriteRequest(table="t", format=pb.FORMAT_JSON_EACH_ROW, rows=b'{"id":1,"s":"a"}\n'
                                                                                   b'{"id":"x","s":"b"}\n'))
    with contextlib.suppress(Exception):
        await stub.Write(pb.WriteRequest(table="missing", format=pb.FORMAT_CSV, rows=b"1\n"))
    await stub.Write(pb.WriteRequest(table="gone", format=pb.FORMAT_CSV, rows=b"1,a\n"))
    clickhouse.command(f"DROP TABLE {clickhouse.database}.gone")
    barrier = asyncio.ensure_future(buf.flush())

    def scrape() -> str:
        with urllib.request.urlopen(f"{buf.http}/metrics", timeout=5) as r:
            return str(r.read().decode())

    try:
        for _ in range(100):
            text = await asyncio.to_thread(scrape)
            if "ingest_buffer_table_held{" in text and "ingest_buffer_dead_lettered_rows_total{" in text:
                break
            await asyncio.sleep(0.1)
    finally:
        barrier.cancel()
    exported = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}
    missing = {where: sorted(set(metric_names(promql_parser.parse(expr))) - exported)
               for where, expr in expressions().items()}
    assert not {w: m for w, m in missing.items() if m}, "expressions name metrics the buffer does not export"
