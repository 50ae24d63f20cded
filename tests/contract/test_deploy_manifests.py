"""deploy/*.yaml: each document loads into the kubernetes client's typed model with no field lost, and the
pieces agree with each other and with the launcher (ports, labels, names, flags, drain budget)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from spindle_router.launcher import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODEL_TYPES = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}
_api = ApiClient()


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _typed(doc: dict[str, Any]) -> Any:
    return _api.deserialize(json.dumps(doc), MODEL_TYPES[(doc["apiVersion"], doc["kind"])], "application/json")


@pytest.fixture(scope="module")
def objects() -> dict[str, Any]:
    out = {}
    for doc in _docs():
        assert (doc["apiVersion"], doc["kind"]) in MODEL_TYPES, f"unexpected kind {doc['kind']}"
        assert doc["kind"] not in out, f"two {doc['kind']} documents"
        out[doc["kind"]] = _typed(doc)
    assert set(out) == {kind for _, kind in MODEL_TYPES}
    return out


@pytest.mark.parametrize("doc", _docs(), ids=lambda d: d["kind"])
def test_every_field_is_known_to_the_typed_model(doc):
    # The client drops keys it does not know: a typo (readinesProbe) would vanish. Round-trip and compare.
    assert _api.sanitize_for_serialization(_typed(doc)) == doc


def test_config_map_keys_are_launcher_flags(objects):
    flags = {a.dest.upper() for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    unknown = set(objects["ConfigMap"].data) - flags
    assert not unknown, f"ConfigMap keys that spindle-launcher does not read: {unknown}"


def test_deployment_probes_ports_resources_and_drain(objects):
    cm, dep = objects["ConfigMap"], objects["Deployment"]
    pod = dep.spec.template.spec
    (container,) = pod.containers
    (port,) = container.ports
    assert port.container_port == int(cm.data["PORT"]) and port.name == "http"
    for probe in (container.readiness_probe, container.liveness_probe, container.startup_probe):
        assert probe.http_get.path == "/health" and probe.http_get.port in ("http", port.container_port)
    assert container.env_from[0].config_map_ref.name == cm.metadata.name
    assert container.resources.limits["nvidia.com/gpu"] == container.resources.requests["nvidia.com/gpu"]
    assert int(container.resources.limits["nvidia.com/gpu"]) >= int(cm.data.get("NUM_SHARD", "1"))
    pre_stop_s = int(container.lifecycle.pre_stop._exec.command[-1])
    drain_s = float(cm.data["GRACEFUL_TERMINATION_TIMEOUT"])
    assert pod.termination_grace_period_seconds >= pre_stop_s + drain_s + 15, "no room to drain"
    assert dep.spec.selector.match_labels.items() <= dep.spec.template.metadata.labels.items()
    assert dep.spec.template.metadata.annotations["prometheus.io/path"] == "/metrics"
    api_key = next(e for e in container.env if e.name == "API_KEY")
    assert api_key.value_from.secret_key_ref.optional is True  # the secret is not required to start


def test_service_selects_the_pods_and_targets_the_http_port(objects):
    svc, dep = objects["Service"], objects["Deployment"]
    assert svc.spec.selector.items() <= dep.spec.template.metadata.labels.items()
    names = {p.name for p in dep.spec.template.spec.containers[0].ports}
    assert all(p.target_port in names for p in svc.spec.ports)


def test_hpa_scales_the_deployment_on_queue_size(objects):
    hpa, dep = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    assert (hpa.spec.scale_target_ref.kind, hpa.spec.scale_target_ref.name) == ("Deployment", dep.metadata.name)
    (metric,) = hpa.spec.metrics
    assert metric.type == "Pods" and metric.pods.metric.name == "tgi_queue_size"
    assert metric.pods.target.type == "AverageValue"
    assert 1 <= hpa.spec.min_replicas <= hpa.spec.max_replicas
