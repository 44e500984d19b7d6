"""Two sidecar processes flushing to one ClickHouse endpoint at the same time."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import HttpEndpoint
from tests.lifecycle.conftest import Serve
from tests.lifecycle.test_shutdown import Load


@pytest.fixture
def shared_clickhouse(tmp_path: Path) -> Iterator[HttpEndpoint]:
    endpoint = HttpEndpoint(tmp_path / "shared-chdb")
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    client.command("CREATE DATABASE app")
    client.command("CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                   "SETTINGS non_replicated_deduplication_window = 10000")
    client.close()
    yield endpoint
    endpoint.stop()


def test_two_sidecars_same_endpoint_no_loss_no_duplicates_no_crosstalk(
        serve: Callable[..., Serve], shared_clickhouse: HttpEndpoint) -> None:
    import clickhouse_connect

    a = serve("--clickhouse-url", shared_clickhouse.url + "/app", "--flush-interval", "100ms", "--linger", "0s",
              "--flush-max-rows", "500")
    b = serve("--clickhouse-url", shared_clickhouse.url + "/app", "--flush-interval", "100ms", "--linger", "0s",
              "--flush-max-rows", "500")
    a.wait_ready()
    b.wait_ready()
    # Both loads count ids from 0, so the two processes send identical rows: both copies must land.
    # Each sidecar's tokens are its own, so one never deduplicates the other's batch (cross-talk).
    with Load(a.target, "events", writers=2, rows_per_write=10, max_seconds=20) as la, \
            Load(b.target, "events", writers=2, rows_per_write=10, max_seconds=20) as lb:
        time.sleep(2.0)
    a.signal(signal.SIGTERM)
    b.signal(signal.SIGTERM)
    assert a.wait(30) == 0, a.log()
    assert b.wait(30) == 0, b.log()
    client = clickhouse_connect.get_client(host="127.0.0.1", port=shared_clickhouse.port)
    total = int(client.command("SELECT count() FROM app.events"))
    per_id = dict(client.query("SELECT id, count() FROM app.events GROUP BY id").result_rows)
    client.close()
    expected: dict[int, int] = {}
    for i in la.acked:
        expected[i] = expected.get(i, 0) + 1
    for i in lb.acked:
        expected[i] = expected.get(i, 0) + 1
    missing = {i for i, n in expected.items() if per_id.get(i, 0) < n}
    extra = {i for i, n in per_id.items() if n > expected.get(i, 0)}
    assert not missing, f"{len(missing)} acknowledged rows are missing"
    assert not extra, f"{len(extra)} ids landed more often than they were acknowledged"
    tokens = [r.get("token", "") for s in (a, b) for r in s.log_records() if r.get("msg", "").startswith("flushed")]
    instances = {t.split("-")[0] for t in tokens}
    assert len(instances) == 2, "each process stamps its batches with its own instance id"
    print(json.dumps({"sent_a": len(la.acked), "sent_b": len(lb.acked), "landed": total, "duplicated": len(extra)}))
