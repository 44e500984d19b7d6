"""The Helm chart, checked by the real Helm engine and Kubernetes' own schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError, HelmValuesError

from tests.deploy.chart import CHART, CI_VALUES, ROOT, find, render, values_file

KUBE_VERSIONS = ("1.29.0", "1.33.0")
# Custom resources have no schema in Kubernetes' own set; they are checked by the Helm lint only.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values_path", [*CI_VALUES, None], ids=[*(p.stem for p in CI_VALUES), "defaults"])
def test_lint_strict(values_path: Path | None, kube: str) -> None:
    values = values_file(values_path) if values_path else {}
    report = lint(str(CHART), values, strict=True, kube_version=f"v{kube}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not problems, report


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values_path", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_every_rendered_object_validates_strictly(values_path: Path, kube: str) -> None:
    objects = render(values_file(values_path))
    checked = 0
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, kube, strict=True)
        checked += 1
    assert checked >= 1


def test_at_least_one_values_file_per_mode() -> None:
    modes = {values_file(p).get("mode") for p in CI_VALUES}
    assert {"sidecar", "gateway"} <= modes


def pod_spec(objects: list[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "Deployment", suffix)["spec"]["template"]["spec"]
    return spec


def test_native_sidecar_is_an_init_container_that_restarts_always() -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "sidecar-values.yaml")), "-example")
    (buffer,) = spec["initContainers"]
    assert buffer["name"] == "ingest-buffer" and buffer["restartPolicy"] == "Always"
    assert buffer["lifecycle"]["preStop"]["exec"]["command"][:2] == ["ingest-buffer", "drain"]
    assert buffer["startupProbe"]["httpGet"]["path"] == "/readyz", "the app starts once the buffer accepts rows"
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_legacy_sidecar_is_a_plain_container_sharing_a_socket() -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "sidecar-legacy-values.yaml")), "-example")
    assert "initContainers" not in spec
    names = [c["name"] for c in spec["containers"]]
    assert names == ["app", "ingest-buffer"]
    env = {e["name"]: e.get("value") for e in spec["containers"][1]["env"]}
    assert env["INGEST_BUFFER_GRPC_LISTEN"] == "unix:/run/ingest-buffer/grpc.sock"
    assert float(env["INGEST_BUFFER_LINGER"].rstrip("s")) > 0


def test_gateway_rolls_without_losing_capacity() -> None:
    objects = render(values_file(CHART / "ci" / "gateway-values.yaml"))
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert find(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert find(objects, "Service")["spec"]["ports"][0]["targetPort"] == "grpc"
    find(objects, "ServiceMonitor")


def test_grace_period_is_derived_from_the_drain_deadline() -> None:
    spec = pod_spec(render({"mode": "gateway", "shutdown": {"drainTimeoutSeconds": 40, "propagationDelaySeconds": 5}}))
    assert spec["terminationGracePeriodSeconds"] == 45
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["INGEST_BUFFER_DRAIN_TIMEOUT"] == "40s"


def test_dead_letters_can_outlive_the_pod() -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "gateway-values.yaml")))
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["INGEST_BUFFER_DEAD_LETTER_TABLE"] == "dead_letters"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ingest-buffer-data"]["persistentVolumeClaim"]["claimName"] == "ingest-buffer-dead-letters"


def test_credentials_come_from_a_secret_file() -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "gateway-values.yaml")))
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INGEST_BUFFER_CLICKHOUSE_PASSWORD_FILE"] == "/etc/ingest-buffer/clickhouse/password"
    assert "password" not in str(env.get("INGEST_BUFFER_CLICKHOUSE_URL"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ingest-buffer-clickhouse"]["secret"]["secretName"] == "clickhouse-credentials"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(("values", "words"), [
    ({"mode": "daemon"}, "at '/mode': value must be one of 'sidecar', 'gateway'"),
    ({"buffer": {"whenFull": "sometimes"}}, "at '/buffer/whenFull'"),
    ({"flush": {"intervall": 1}}, "additional properties 'intervall' not allowed"),
    ({"clickhouse": {"url": "tcp://ch:9000"}}, "at '/clickhouse/url'"),
    ({"shutdown": {"drainTimeoutSeconds": 0}}, "at '/shutdown/drainTimeoutSeconds'"),
    ({"tables": ["ok", "no; drop"]}, "at '/tables/1'"),
])
def test_schema_refuses_bad_values_naming_the_key(values: dict[str, Any], words: str) -> None:
    with Chart.load(str(CHART)) as chart, pytest.raises(HelmValuesError) as info:
        chart.render(values=values, name="ib")
    assert words in str(info.value)


@pytest.mark.parametrize(("values", "words"), [
    ({"shutdown": {"drainTimeoutSeconds": 30, "terminationGracePeriodSeconds": 20}},
     "shorter than shutdown.drainTimeoutSeconds + 2"),
    ({"mode": "gateway", "shutdown": {"drainTimeoutSeconds": 5, "propagationDelaySeconds": 5}},
     "must be larger than shutdown.propagationDelaySeconds"),
])
def test_inconsistent_shutdown_timing_is_refused(values: dict[str, Any], words: str) -> None:
    with Chart.load(str(CHART)) as chart, pytest.raises(HelmRenderError) as info:
        chart.render(values=values, name="ib")
    assert words in str(info.value)


def test_deploy_manifests_are_the_chart_rendered() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "render.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_notes_tell_how_to_send_a_first_row() -> None:
    with Chart.load(str(CHART)) as chart:
        for mode in ("sidecar", "gateway"):
            notes = chart.render(values={"mode": mode}, name="ib")["ingest-buffer/templates/NOTES.txt"]
            assert "ingest-buffer send" in notes and "--flush" in notes


def test_the_harness_runs_what_the_image_runs() -> None:
    """tests/kube/harness.py maps the image's ENTRYPOINT to this checkout; they must agree."""
    from tests.kube.harness import ENTRYPOINTS

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ingest-buffer"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert list(ENTRYPOINTS) == ["ingest-buffer"]


def test_the_log_is_on_by_default_in_an_emptydir_with_a_size_limit() -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "sidecar-values.yaml")), "-example")
    (buffer,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in buffer["env"]}
    assert env["INGEST_BUFFER_WAL_DIR"] == "/var/lib/ingest-buffer/wal"
    assert env["INGEST_BUFFER_WAL_MAX_BYTES"] == "1GiB"
    mounts = {m["name"]: m["mountPath"] for m in buffer["volumeMounts"]}
    assert mounts["ingest-buffer-wal"] == "/var/lib/ingest-buffer/wal"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ingest-buffer-wal"]["emptyDir"] == {"sizeLimit": "2Gi"}


def test_the_log_can_be_turned_off_which_overrides_the_image_default() -> None:
    spec = pod_spec(render({"mode": "gateway", "wal": {"enabled": False}}))
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["INGEST_BUFFER_WAL_DIR"] == "", "an empty value: the image's default is replaced"
    assert "ingest-buffer-wal" not in {v["name"] for v in spec["volumes"]}


def test_a_gateway_can_keep_its_log_on_a_claim_per_replica() -> None:
    objects = render(values_file(CHART / "ci" / "gateway-persistent-values.yaml"))
    assert not [o for o in objects if o["kind"] == "Deployment"]
    sts = find(objects, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "ingest-buffer-wal"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    spec = sts["spec"]["template"]["spec"]
    assert "ingest-buffer-wal" not in {v["name"] for v in spec["volumes"]}, "the claim, not an emptyDir"
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["ingest-buffer-wal"] == "/var/lib/ingest-buffer/wal"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["INGEST_BUFFER_WAL_MAX_BYTES"] == "8GiB"


def test_the_clickhouse_http_interface_is_loopback_in_a_sidecar_and_authenticated_behind_a_gateway() -> None:
    sidecar = pod_spec(render(values_file(CHART / "ci" / "sidecar-values.yaml")), "-example")["initContainers"][0]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["INGEST_BUFFER_CLICKHOUSE_HTTP_LISTEN"] == "127.0.0.1:8123"
    assert env["INGEST_BUFFER_CLICKHOUSE_HTTP_AUTH"] == "none"
    objects = render(values_file(CHART / "ci" / "gateway-values.yaml"))
    container = pod_spec(objects)["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["INGEST_BUFFER_CLICKHOUSE_HTTP_LISTEN"] == "0.0.0.0:8123"
    assert env["INGEST_BUFFER_CLICKHOUSE_HTTP_AUTH"] == "users-file"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "ingest-buffer-http-users")
    assert env["INGEST_BUFFER_CLICKHOUSE_HTTP_USERS_FILE"] == mount["mountPath"] + "/users"
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "ingest-buffer-http-users")
    assert volume["secret"]["secretName"] == "ingest-buffer-http-users"
    ports = {p["name"]: p for p in find(objects, "Service")["spec"]["ports"]}
    assert ports["clickhouse-http"]["port"] == 8123 and ports["clickhouse-http"]["targetPort"] == "clickhouse-http"
    with pytest.raises(HelmRenderError, match=r"clickhouseHttp\.usersSecret is empty"):
        render({"mode": "gateway", "clickhouseHttp": {"enabled": True, "auth": "users-file"}})


@pytest.mark.parametrize(("values", "words"), [
    ({"buffer": {"maxBytes": "10MiB"}}, "buffer.maxRequestBytes (16MiB) is larger than buffer.maxBytes (10MiB)"),
    ({"buffer": {"maxBytes": "64MiB"}, "flush": {"maxBytes": "128MiB"}}, "flush.maxBytes (128MiB) is larger"),
    ({"buffer": {"maxBytes": "2GiB"}}, "resources.limits.memory (512Mi): the kubelet would OOM-kill"),
    ({"buffer": {"maxBytes": "1GiB"}, "resources": {"limits": {"memory": "1Gi"}}}, "at least 1152Mi"),
    ({"wal": {"maxBytes": "3GiB"}}, "wal.maxBytes (3GiB) is larger than the log's volume (wal.sizeLimit 2Gi)"),
    ({"mode": "gateway", "wal": {"maxBytes": "20GiB", "persistence": {"enabled": True, "size": "10Gi"}}},
     "(wal.persistence.size 10Gi)"),
    ({"deadLetters": {"maxBytes": "0"}}, "deadLetters.maxBytes (0) must be more than 0 bytes"),
    ({"deadLetters": {"maxBytes": "5GiB", "sizeLimit": "1Gi"}}, "larger than their volume (deadLetters.sizeLimit 1Gi)"),
    ({"resources": {"limits": {"memory": "512Mx"}}}, "512Mx is not a Kubernetes quantity"),
])
def test_values_that_would_crash_loop_or_be_killed_are_refused_naming_the_value(values: dict[str, Any],
                                                                                  words: str) -> None:
    with pytest.raises(HelmRenderError) as caught:
        render(values)
    assert words in str(caught.value)


def test_values_that_fit_render_and_the_buffer_takes_what_they_render() -> None:
    from buffer.config import load

    for values in ({}, {"buffer": {"maxBytes": "384MiB"}}, {"buffer": {"maxBytes": "1GiB"},
                                                            "resources": {"limits": {"memory": "1152Mi"}}},
                   {"buffer": {"maxBytes": "16MiB"}, "flush": {"maxBytes": "16MiB"}, "wal": {"maxBytes": "2Gi"}},
                   {"deadLetters": {"maxBytes": "1"}, "wal": {"syncIntervalSeconds": 0.001}},
                   {"resources": {"limits": {"memory": 1073741824}}}, {"resources": {"limits": {"memory": "1e9"}}}):
        container = pod_spec(render(values), "-example")["initContainers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env = {k: v for k, v in env.items() if not k.endswith(("_FILE", "_DIR", "_LISTEN"))}
        load({}, env=env)  # raises ConfigError for anything the buffer would refuse at start


@pytest.mark.parametrize(("kube", "native"), [("v1.27.0", False), ("v1.33.0", True)])
def test_the_example_is_a_native_sidecar_only_where_the_cluster_has_them(kube: str, native: bool) -> None:
    spec = pod_spec(render(values_file(CHART / "ci" / "sidecar-values.yaml"), kube_version=kube), "-example")
    names = [c["name"] for c in spec.get("initContainers", [])]
    assert ("ingest-buffer" in names) is native
    assert ("ingest-buffer" in [c["name"] for c in spec["containers"]]) is not native
