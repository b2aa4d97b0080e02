"""deploy/k8s: core resources validated offline against the Kubernetes JSON schemas (strict:
unknown fields are errors), custom resources and the wiring between objects checked
structurally, settings parsed by the server's own settings code."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO, exported_series, load_yaml
from kubernetes_validate.utils import ValidationError, latest_version, validate

from denoised.server.settings import settings_from_env

K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests promise to work on, and the newest the schemas know.
VERSIONS = ("1.29.0", latest_version())
CUSTOM_KINDS = {"ServiceMonitor"}
NOT_RESOURCES = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


def resources() -> dict[str, dict]:
    """kind -> object, for every object the kustomization lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    out = {}
    for name in kustomization["resources"]:
        with open(K8S / name, encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc
    return out


def container(objs: dict) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    kinds = set(resources())
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_core_resources_match_the_kubernetes_schema(version):
    for kind, obj in resources().items():
        if kind not in CUSTOM_KINDS:
            validate(obj, version, strict=True)


def test_schema_check_catches_mistakes():
    """The validator used above rejects a misspelt field and a wrong type."""
    deployment = resources()["Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for broken in (misspelt, wrong_type):
        with pytest.raises(ValidationError):
            validate(broken, VERSIONS[0], strict=True)


def test_deployment_probes_gpu_and_security():
    objs = resources()
    deployment = objs["Deployment"]
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    c = container(objs)
    port_names = {p["name"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert c[probe]["httpGet"]["path"] == path
        assert c[probe]["httpGet"]["port"] in port_names
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The image's user (Dockerfile ARG UID) is the one the pod runs as.
    uid = re.search(r"^ARG UID=(\d+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_deployment_settings_parse_and_grace_covers_the_drain():
    c = container(resources())
    env = {e["name"]: e["value"] for e in c["env"]}
    settings = settings_from_env(env)  # raises on an unknown value; names checked below
    known = {"DENOISED_" + name.upper() for name in type(settings).__dataclass_fields__}
    assert set(env) <= known, f"unknown settings: {set(env) - known}"
    assert settings.port == c["ports"][0]["containerPort"]
    assert settings.host == "0.0.0.0"

    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = resources()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGTERM comes after preStop; the drain then has drain_seconds; a small margin to exit.
    margin = grace - pre_stop - settings.drain_seconds
    assert 0 < margin <= 30, f"grace {grace} vs preStop {pre_stop} + drain {settings.drain_seconds}"


def test_service_and_disruption_budget_select_the_pods():
    objs = resources()
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(objs)["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    # The budget can be met while the autoscaler is at its floor.
    assert pdb["minAvailable"] < objs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


def test_autoscaler_reads_queue_depth_through_the_adapter():
    objs = resources()
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        objs["Deployment"]["metadata"]["name"],
    )
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "denoised_queue_depth" and name in exported_series()
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300

    rules = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    exposed = {}
    for rule in rules:
        series = re.match(r"([a-z_:]+)\{", rule["seriesQuery"]).group(1)
        assert series in exported_series()
        assert re.fullmatch(rule["name"]["matches"], series)
        exposed[rule["name"]["as"]] = rule
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert name in exposed


def test_servicemonitor_scrapes_the_service():
    objs = resources()
    monitor = objs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    service = objs["Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def test_settings_named_in_deployment_files_exist():
    """Every DENOISED_* variable the image, compose, manifests, alerts, dashboard and docs
    name is a setting."""
    known = {"DENOISED_" + name.upper() for name in settings_from_env({}).__dataclass_fields__}
    files = [REPO / "Dockerfile", REPO / "docs/deployment.md", DEPLOY / "compose.yaml"]
    files += [DEPLOY / "prometheus/alerts.yml", DEPLOY / "grafana/dashboards/denoised.json"]
    files += sorted(K8S.glob("*.yaml"))
    for path in files:
        named = set(re.findall(r"\bDENOISED_[A-Z_]+[A-Z]\b", path.read_text()))
        assert named <= known, f"{path.name}: {named - known}"
