"""Rendering the Helm chart with the real Helm engine, for the chart tests and the kubelet harness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from helm_python import _native
from helm_python.chart import Chart, values_from_yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ingest-buffer"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


def values_file(path: Path) -> dict[str, Any]:
    return values_from_yaml(path.read_text())


def render(values: dict[str, Any], name: str = "ib", namespace: str = "apps",
           kube_version: str | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values`` (on a cluster of ``kube_version``,
    e.g. "v1.27.0", as `helm template --kube-version` does; Helm's default otherwise)."""
    with Chart.load(str(CHART)) as chart:
        if kube_version is None:
            out = chart.render(values=values, name=name, namespace=namespace)
        else:  # the engine takes the option; helm-python's render does not pass it on
            out = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values),
                                                 json.dumps({"name": name, "namespace": namespace,
                                                             "kube_version": kube_version})))
    objects: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    names = [o["metadata"]["name"] for o in matches]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, got {names}"
    return matches[0]
