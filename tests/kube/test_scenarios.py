"""Pod lifecycles from the chart's rendered specs, played by tests/kube/harness.py, under load.

Every scenario checks that every acknowledged row is in ClickHouse exactly once, and prints one
JSON line of figures (pytest -s shows them): rows sent, landed, refused, lost, drain seconds.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buffer.ledger import EXIT_KEPT_IN_LOG
from tests.conftest import HttpEndpoint
from tests.deploy.chart import CHART, find, render, values_file
from tests.kube.harness import Container, Pod, Service
from tests.lifecycle.conftest import ROOT

SECRETS = {"clickhouse-credentials": {"password": "unused-by-the-test-endpoint"},
           "clickhouse-ca": {"ca.crt": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"},
           "ingest-buffer-http-users": {"users": "app:s3cret\n"}}


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpEndpoint]:
    endpoint = HttpEndpoint(tmp_path_factory.mktemp("kube-chdb"))
    endpoint.query("CREATE DATABASE app")
    endpoint.query("CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                    "SETTINGS non_replicated_deduplication_window = 100000")
    endpoint.query("CREATE TABLE app.slow (id UInt64, s String, pause UInt8 MATERIALIZED sleepEachRow(0.01)) "
                    "ENGINE = MergeTree ORDER BY id")
    yield endpoint
    endpoint.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: Unix socket paths must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="kube-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.kill()


def pod_spec(values_name: str, suffix: str = "") -> dict[str, Any]:
    objects = render(values_file(CHART / "ci" / values_name))
    # Secrets the chart itself renders are what the kubelet would mount.
    for obj in objects:
        if obj["kind"] == "Secret":
            SECRETS[obj["metadata"]["name"]] = dict(obj.get("stringData", {}))
    spec: dict[str, Any] = find(objects, "Deployment", suffix)["spec"]["template"]["spec"]
    return spec


def app_player(workdir: Path, name: str, *, after_sigterm: float, table: str = "events", prefix: int = 1,
               pause: float = 0.002) -> Any:
    """Plays the chart's example application container with tests/kube/app.py."""
    def argv(env: dict[str, str]) -> list[str]:
        import sys

        return [sys.executable, "-m", "tests.kube.app", "--target", env["INGEST_BUFFER_GRPC_LISTEN"],
                "--table", table, "--acked", str(workdir / f"{name}.acked"), "--refused",
                str(workdir / f"{name}.refused"), "--after-sigterm", str(after_sigterm), "--prefix", str(prefix),
                "--pause", str(pause)]
    return argv


def acked_ids(*files: Path) -> list[int]:
    ids: list[int] = []
    for f in files:
        if f.exists():
            for line in f.read_text().split():
                first = int(line)
                ids.extend(range(first, first + 10))
    return ids


def check_exactly_once(endpoint: HttpEndpoint, acked: list[int], table: str = "events") -> dict[str, int]:
    counts = {int(i): int(n) for i, n in endpoint.query(f"SELECT id, count() FROM app.{table} GROUP BY id")}
    missing = [i for i in acked if counts.get(i, 0) == 0]
    duplicated = [i for i, n in counts.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged rows are missing"
    assert not duplicated, f"{len(duplicated)} rows landed more than once"
    return {"landed": sum(counts.values()), "lost": len(missing), "duplicated": len(duplicated)}


def truncate(endpoint: HttpEndpoint, table: str = "events") -> None:
    endpoint.query(f"TRUNCATE TABLE app.{table}")


def buffer_log(pod: Pod) -> list[dict[str, Any]]:
    c = next(c for c in pod.containers if c.name == "ingest-buffer")
    out = []
    for line in c.log().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def drain_seconds(pod: Pod) -> float | None:
    exits = [r for r in buffer_log(pod) if r.get("msg", "").startswith("exiting")]
    return exits[-1].get("drain_seconds") if exits else None


def run_example_pod(values_name: str, name: str, after_sigterm: float, clickhouse: HttpEndpoint, workdir: Path,
                    pods: list[Pod]) -> tuple[Pod, Container, Container, float]:
    """The chart's example pod with a writing application, terminated after 2 s of load."""
    truncate(clickhouse)
    pod = Pod(name, pod_spec(values_name, "-example"), workdir,
              env_overrides={"INGEST_BUFFER_CLICKHOUSE_URL": clickhouse.url}, secrets=SECRETS,
              players={"app": app_player(workdir, "app", after_sigterm=after_sigterm)})
    pods.append(pod)
    pod.start()
    pod.wait_ready()
    time.sleep(2.0)
    took = pod.terminate()
    app, buffer = (next(c for c in pod.containers if c.name == n) for n in ("app", "ingest-buffer"))
    assert app.exit_code == 0 and buffer.exit_code == 0, pod.describe() + "\n" + buffer.log()[-2000:]
    assert not app.killed and not buffer.killed
    return pod, app, buffer, took


def test_native_sidecar_termination_refuses_nothing_loses_nothing(
        clickhouse: HttpEndpoint, workdir: Path, pods: list[Pod]) -> None:
    pod, app, buffer, took = run_example_pod("sidecar-values.yaml", "native", 1.5, clickhouse, workdir, pods)
    assert "ingest-buffer" in [c["name"] for c in pod.spec["initContainers"]]
    assert app.exited_at is not None and buffer.exited_at is not None and buffer.exited_at > app.exited_at, \
        "the native sidecar outlived its application"
    refused = json.loads((workdir / "app.refused").read_text())
    assert refused == {}, f"the application's writes were refused: {refused}"
    acked = acked_ids(workdir / "app.acked")
    figures = check_exactly_once(clickhouse, acked)
    print(json.dumps({"scenario": "native sidecar", "sent": len(acked), **figures, "refused": 0,
                      "pod_termination_s": round(took, 2), "drain_s": drain_seconds(pod)}))


def test_old_style_sidecar_linger_keeps_the_last_writes(
        clickhouse: HttpEndpoint, workdir: Path, pods: list[Pod]) -> None:
    pod, _, _, took = run_example_pod("sidecar-legacy-values.yaml", "legacy", 1.0, clickhouse, workdir, pods)
    assert "initContainers" not in pod.spec
    refused = json.loads((workdir / "app.refused").read_text())
    timeline = [(r.get("ts"), r.get("msg")) for r in buffer_log(pod) if "flushed" not in r.get("msg", "")]
    assert refused == {}, f"the application's last writes were refused: {refused}; buffer: {timeline}"
    acked = acked_ids(workdir / "app.acked")
    figures = check_exactly_once(clickhouse, acked)
    print(json.dumps({"scenario": "old-style sidecar", "sent": len(acked), **figures, "refused": 0,
                      "pod_termination_s": round(took, 2), "drain_s": drain_seconds(pod)}))


def test_gateway_rollout_restart_ten_times(clickhouse: HttpEndpoint, workdir: Path, pods: list[Pod]) -> None:
    import subprocess
    import sys

    truncate(clickhouse)
    spec = pod_spec("gateway-values.yaml")
    replicas = 2
    # Endpoints lag behind for longer than the propagation delay (1 s): some writes reach a replica
    # that already refuses, get UNAVAILABLE, and the clients retry them on another.
    service = Service(lag=1.5)
    service_file = workdir / "endpoints"
    generation = 0

    def new_pod() -> Pod:
        nonlocal generation
        generation += 1
        pod = Pod(f"gw-{generation}", spec, workdir, env_overrides={"INGEST_BUFFER_CLICKHOUSE_URL": clickhouse.url},
                  secrets=SECRETS)
        pods.append(pod)
        pod.start()
        return pod

    def publish() -> None:
        while not stop.is_set():
            targets = [f"{p.ip}:50051" for p in service.endpoints()]
            tmp = service_file.with_suffix(".tmp")
            tmp.write_text("\n".join(targets))
            tmp.replace(service_file)
            time.sleep(0.05)

    current = [new_pod() for _ in range(replicas)]
    for p in current:
        p.wait_ready()
        service.add(p)
    stop = threading.Event()
    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    time.sleep(0.2)
    clients = [subprocess.Popen([sys.executable, "-m", "tests.kube.app", "--service", str(service_file),
                                 "--acked", str(workdir / f"client{i}.acked"), "--refused",
                                 str(workdir / f"client{i}.refused"), "--prefix", str(i + 1), "--after-sigterm", "0",
                                 "--pause", "0.005"], cwd=ROOT) for i in range(2)]
    terminations: list[threading.Thread] = []
    took: list[float] = []
    try:
        for _restart in range(10):
            for i, old in enumerate(list(current)):
                fresh = new_pod()  # maxSurge 1: the new replica first...
                fresh.wait_ready()
                service.add(fresh)
                current[i] = fresh
                t = threading.Thread(target=lambda pod=old: took.append(pod.terminate()))  # ...then the old one goes
                t.start()
                terminations.append(t)
        for t in terminations:
            t.join(60)
    finally:
        for c in clients:
            c.send_signal(15)
        for c in clients:
            c.wait(60)
        stop.set()
        publisher.join(5)
    old_pods = [p for p in pods if p not in current]
    assert len(old_pods) == 20
    for pod in old_pods:
        (buffer,) = pod.containers
        assert buffer.exit_code == 0 and not buffer.killed, (
            f"{pod.name}: exit {buffer.exit_code}\n{buffer.log()[-2000:]}")
    refused: dict[str, int] = {}
    for i in range(2):
        for code, n in json.loads((workdir / f"client{i}.refused").read_text()).items():
            refused[code] = refused.get(code, 0) + n
    assert set(refused) <= {"UNAVAILABLE", "CANCELLED"}, refused
    acked = acked_ids(*(workdir / f"client{i}.acked" for i in range(2)))
    for p in current:
        p.terminate()
    figures = check_exactly_once(clickhouse, acked)
    drains = [d for d in (drain_seconds(p) for p in old_pods) if d is not None]
    print(json.dumps({"scenario": "gateway rollout restart x10", "sent": len(acked), **figures,
                      "refused_then_retried": sum(refused.values()),
                      "pod_termination_s_max": round(max(took), 2),
                      "drain_s_max": max(drains) if drains else None}))


@pytest.mark.parametrize("wal", [False, True], ids=["log-off", "log-on"])
def test_grace_period_too_short_for_the_backlog_reports_the_shortfall(
        clickhouse: HttpEndpoint, workdir: Path, pods: list[Pod], wal: bool) -> None:
    truncate(clickhouse, "slow")
    values = values_file(CHART / "ci" / "sidecar-values.yaml")
    values["wal"] = {"enabled": wal}
    values["shutdown"] = {"drainTimeoutSeconds": 2, "lingerSeconds": 0}
    values["tables"] = ["slow"]
    values["flush"] = {"maxRows": 100, "intervalSeconds": 30}
    objects = render(values)
    spec: dict[str, Any] = find(objects, "Deployment", "-example")["spec"]["template"]["spec"]
    pod = Pod("short", spec, workdir, env_overrides={"INGEST_BUFFER_CLICKHOUSE_URL": clickhouse.url},
              secrets=SECRETS, players={"app": app_player(workdir, "app", after_sigterm=0, table="slow", pause=0)})
    pods.append(pod)
    pod.start()
    pod.wait_ready()
    time.sleep(1.5)  # each row takes 10 ms to insert into `slow`: a backlog the 2 s deadline cannot clear
    took = pod.terminate()
    buffer = next(c for c in pod.containers if c.name == "ingest-buffer")
    summary = next(r for r in reversed(buffer_log(pod)) if r.get("msg", "").startswith("exiting"))
    acked = acked_ids(workdir / "app.acked")
    landed = int(clickhouse.query("SELECT count() FROM app.slow")[0][0])
    if wal:
        # The log holds what the deadline left: nothing lost, a restart in this pod would send it.
        assert buffer.exit_code == EXIT_KEPT_IN_LOG and not buffer.killed, buffer.log()[-2000:]
        assert summary["rows_lost"] == 0 and summary["rows_kept_in_log"] > 0
        assert summary["rows_accepted"] - summary["rows_committed"] == summary["rows_kept_in_log"]
        # An insert still running at the deadline may finish in ClickHouse after the buffer stopped
        # waiting: its rows are kept in the log all the same, and their resend under the same token
        # is dropped by ClickHouse.
        assert summary["rows_committed"] <= landed <= summary["rows_committed"] + summary["rows_kept_in_log"]
        assert "/volumes/ingest-buffer-wal" in summary["msg"], "the last line says where the rows are"
        print(json.dumps({"scenario": "grace too short, log on", "sent": len(acked), "landed": landed,
                          "kept_in_log": summary["rows_kept_in_log"], "pod_termination_s": round(took, 2)}))
        return
    assert buffer.exit_code == 3 and not buffer.killed, "it reported before the kubelet's SIGKILL"
    assert summary["rows_lost"] > 0
    assert summary["rows_accepted"] - summary["rows_committed"] == summary["rows_lost"]
    # Exact: what it says it committed is what ClickHouse has, and the rest is the reported loss
    # (rows still being inserted at the deadline are named apart, as in doubt).
    doubt = summary["rows_in_doubt"]
    assert summary["rows_committed"] <= landed <= summary["rows_committed"] + doubt
    assert len(acked) <= summary["rows_accepted"]
    print(json.dumps({"scenario": "grace too short", "sent": len(acked), "landed": landed, "refused": 0,
                      "lost_reported": summary["rows_lost"], "in_doubt_reported": doubt,
                      "pod_termination_s": round(took, 2), "grace_s": pod.grace}))
