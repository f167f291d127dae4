"""The Helm chart, rendered by Helm itself (Helm v4's Go SDK via PyPI's helm-python-sdk).

For the chart defaults and every example values file: `helm lint --strict` is clean, the
render succeeds, each manifest validates against the Kubernetes OpenAPI schemas (PyPI's
kubernetes-validate, strict: unknown fields fail), and the objects have the properties a GPU
deployment of FASTKV needs. CRDs (ServiceMonitor, ScaledObject) have no bundled schema; their
key fields are checked explicitly instead. The FastKV environment is checked by the plugin's
own config loader, so a misspelt VLLM_FASTKV_* variable or value fails here, not in a pod.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy import DEPLOY
from vllm_fastkv.config import ENV_PREFIX, FastKVConfig

CHART = DEPLOY / "helm" / "vllm-fastkv"
EXAMPLES = sorted((DEPLOY / "helm" / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "fastkv", "llm"
# Oldest and newest Kubernetes that kubernetes-validate carries schemas for.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
CHART_TO_CONFIG = {  # values.yaml fastkv keys -> FastKVConfig fields
    "enabled": "enabled", "tspLayer": "tsp_layer", "tspRate": "tsp_rate",
    "retainRate": "retain_rate", "window": "window", "poolKernel": "pool_kernel",
    "pooling": "pooling", "mode": "mode", "maxCapacityPrompt": "max_capacity_prompt",
    "tspLen": "tsp_len", "tspBufferTokens": "tsp_buffer_tokens", "kvBits": "kv_bits",
    "kvGroupSize": "kv_group_size", "kvResidual": "kv_residual", "evictedBits": "evicted_bits",
    "selection": "selection",
}
#: Knobs whose empty value means "derived from the model" (the plugin's None).
UNSET_MEANS_AUTO = ("tspLayer", "tspBufferTokens")


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, list[dict]]:
    """Rendered objects by kind (NOTES.txt checked to render, then left out)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    notes = out.pop(f"{chart.name}/templates/NOTES.txt")
    assert "FASTKV" in notes
    by_kind: dict[str, list[dict]] = {}
    for text in out.values():
        for obj in yaml.safe_load_all(text):
            if obj:
                by_kind.setdefault(obj["kind"], []).append(obj)
    return by_kind


def load_values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def _is_set(value: Any) -> bool:
    return value is not None and value != ""


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


CASES = [None, *EXAMPLES]
CASE_IDS = ["defaults", *(p.stem for p in EXAMPLES)]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[dict, dict]:
    """(values as Helm merges them with the chart's defaults, rendered objects by kind)."""
    values = load_values(request.param)
    return chart.merge_values(values), render(chart, values)


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"minimal", "production", "keda", "constant-mode"}


@pytest.mark.parametrize("values_file", CASES, ids=CASE_IDS)
def test_helm_lint_strict_is_clean(values_file: Path | None):
    report = helm.lint(CHART, load_values(values_file), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not report["errors"] and not problems, report


def test_manifests_match_kubernetes_schemas(case):
    _, objects = case
    for kind, items in objects.items():
        for obj in items:
            if kind in CRD_KINDS:
                continue  # no schema bundled; see test_custom_resources
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = f"{kind}/{obj['metadata']['name']} (k8s {version})"
                    path = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{where} {path}: {exc.message}")


def test_schema_validation_catches_a_planted_defect(chart: helm.Chart):
    """Guards the test above against a validator that silently accepts anything."""
    (deployment,) = render(chart, {})["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_deployment_runs_fastkv_on_gpus(case):
    merged, objects = case
    (deployment,) = objects["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    tag = merged["image"]["tag"] or "0.1.0"
    assert container["image"] == f"{merged['image']['repository']}:{tag}"
    # No `command`: the image's entrypoint adds --attention-backend FASTKV (test_docker.py).
    assert "command" not in container
    env = container_env(container)
    assert env["MODEL"]["value"] == merged["model"]["name"]
    args = container["args"]
    served = merged["model"]["servedModelName"] or merged["model"]["name"]
    assert args[args.index("--served-model-name") + 1] == served
    if _is_set(merged["model"]["maxModelLen"]):
        assert args[args.index("--max-model-len") + 1] == str(merged["model"]["maxModelLen"])
    gpus = merged["gpu"]["count"]
    if gpus > 1:
        assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
    else:
        assert "--tensor-parallel-size" not in args
    extra = merged["model"]["extraArgs"]
    assert args[len(args) - len(extra):] == extra

    gpu = merged["gpu"]["resourceName"]
    assert container["resources"]["limits"][gpu] == str(gpus)
    assert container["resources"]["requests"][gpu] == str(gpus)
    for section in ("requests", "limits"):
        for key, quantity in merged["resources"].get(section, {}).items():
            assert str(container["resources"][section][key]) == str(quantity)

    for field in ("nodeSelector", "tolerations", "affinity"):
        assert pod.get(field, type(merged[field])()) == merged[field]


def test_fastkv_env_is_what_the_plugin_accepts(case):
    merged, objects = case
    (container,) = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    fastkv_env = {
        name: e["value"] for name, e in container_env(container).items()
        if name.startswith(ENV_PREFIX)
    }
    expected = {
        CHART_TO_CONFIG[key]: value for key, value in merged["fastkv"].items() if _is_set(value)
    }
    # The plugin's own loader parses the variables; it raises on any unknown name or bad value.
    assert FastKVConfig.from_sources(None, environ=fastkv_env) == FastKVConfig(**expected)
    # Every knob is set explicitly, except unset automatic ones (tsp_layer: the model's
    # middle layer; tsp_buffer_tokens: max_model_len).
    knobs = {ENV_PREFIX + field.upper() for field in FastKVConfig.model_fields}
    for key in UNSET_MEANS_AUTO:
        if not _is_set(merged["fastkv"][key]):
            knobs.remove(ENV_PREFIX + CHART_TO_CONFIG[key].upper())
    assert set(fastkv_env) == knobs


def test_chart_defaults_are_the_papers(chart: helm.Chart):
    defaults = chart.values["fastkv"]
    assert set(defaults) == set(CHART_TO_CONFIG)
    assert set(CHART_TO_CONFIG.values()) == set(FastKVConfig.model_fields)
    assert defaults["tspLayer"] == ""  # auto: the middle layer
    assert defaults == {
        "enabled": True, "tspLayer": "", "tspRate": 0.2, "retainRate": 0.1, "window": 8,
        "poolKernel": 7, "pooling": "avg", "mode": "proportional", "maxCapacityPrompt": 512,
        "tspLen": 2048, "tspBufferTokens": "", "kvBits": 16, "kvGroupSize": 32,
        "kvResidual": 128, "evictedBits": 0, "selection": "scored",
    }
    config = FastKVConfig()
    for key, field in CHART_TO_CONFIG.items():
        value = getattr(config, field)
        assert ("" if key in UNSET_MEANS_AUTO and value is None else value) == defaults[key], key


def test_probes_hit_health_on_the_server_port(case):
    merged, objects = case
    (container,) = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == merged["server"]["port"]
    assert container_env(container)["PORT"]["value"] == str(merged["server"]["port"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    # Room for a model download + load before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_volumes_shm_and_model_cache(case):
    merged, objects = case
    pod = objects["Deployment"][0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"] == {
        "medium": "Memory", "sizeLimit": merged["shm"]["sizeLimit"],
    }
    assert mounts["dshm"] == "/dev/shm"

    cache = merged["modelCache"]
    if not cache["enabled"]:
        assert "model-cache" not in volumes and "HF_HOME" not in container_env(container)
        return
    assert mounts["model-cache"] == cache["mountPath"]
    assert container_env(container)["HF_HOME"]["value"] == cache["mountPath"]
    volume = volumes["model-cache"]
    claims = {c["metadata"]["name"] for c in objects.get("PersistentVolumeClaim", [])}
    if cache["type"] == "pvc":
        claim = volume["persistentVolumeClaim"]["claimName"]
        if cache["pvc"]["existingClaim"]:
            assert claim == cache["pvc"]["existingClaim"] and not claims
        else:
            assert claims == {claim}
    elif cache["type"] == "hostPath":
        assert volume["hostPath"] == cache["hostPath"] and not claims
    else:
        assert "emptyDir" in volume and not claims


def test_pod_runs_non_root_as_the_image_user(case, image_uid: int):
    _, objects = case
    pod = objects["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]["securityContext"]
    assert not container.get("privileged", False)
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_hf_token_is_referenced_never_inlined(case):
    merged, objects = case
    (container,) = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"]
    assert "Secret" not in objects  # the chart never creates (so never holds) a token
    token = container_env(container).get("HF_TOKEN")
    secret = merged["hfToken"]["existingSecret"]
    if not secret:
        assert token is None
        return
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": merged["hfToken"]["key"]}},
    }


def test_service_reaches_the_pods(case):
    merged, objects = case
    (service,) = objects["Service"]
    (deployment,) = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == merged["service"]["port"]


def test_autoscaling_owns_replicas(case):
    merged, objects = case
    (deployment,) = objects["Deployment"]
    hpa, keda = merged["autoscaling"]["hpa"], merged["autoscaling"]["keda"]
    assert ("HorizontalPodAutoscaler" in objects) == hpa["enabled"]
    assert ("ScaledObject" in objects) == keda["enabled"]
    if not (hpa["enabled"] or keda["enabled"]):
        assert deployment["spec"]["replicas"] == merged["replicaCount"]
        return
    assert "replicas" not in deployment["spec"]  # helm upgrades must not reset the scale
    if hpa["enabled"]:
        (obj,) = objects["HorizontalPodAutoscaler"]
        assert obj["apiVersion"] == "autoscaling/v2"
        assert obj["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"],
        }
        assert (obj["spec"]["minReplicas"], obj["spec"]["maxReplicas"]) == (
            hpa["minReplicas"], hpa["maxReplicas"])
        (metric,) = obj["spec"]["metrics"]
        source = metric[metric["type"].lower()]
        assert source["metric"]["name"] == hpa["metric"]["name"]
        assert source["target"] == {
            "type": "AverageValue", "averageValue": hpa["metric"]["averageValue"],
        }


def test_custom_resources(case):
    """ServiceMonitor and ScaledObject: no schema is bundled, so their key fields are checked."""
    merged, objects = case
    (deployment,) = objects["Deployment"]
    (service,) = objects["Service"]
    assert ("ServiceMonitor" in objects) == merged["serviceMonitor"]["enabled"]
    for monitor in objects.get("ServiceMonitor", []):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert merged["serviceMonitor"]["labels"].items() <= monitor["metadata"]["labels"].items()
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert endpoint["interval"] == merged["serviceMonitor"]["interval"]
    for scaled in objects.get("ScaledObject", []):
        keda = merged["autoscaling"]["keda"]
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert spec["minReplicaCount"] == keda["minReplicaCount"]
        assert spec["maxReplicaCount"] == keda["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"] == keda["prometheus"]["serverAddress"]
        assert trigger["metadata"]["threshold"] == str(keda["prometheus"]["threshold"])
        query = keda["prometheus"]["query"] or (
            f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",'
            f'service="{service["metadata"]["name"]}"}})'
        )
        assert trigger["metadata"]["query"] == query


def test_tsp_layer_zero_is_kept(chart: helm.Chart):
    """0 is a valid layer although Go templates treat it as false."""
    objects = render(chart, {"fastkv": {"tspLayer": 0}})
    env = container_env(objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0])
    assert env["VLLM_FASTKV_TSP_LAYER"]["value"] == "0"


def test_every_optional_object_validates(chart: helm.Chart):
    """All gated objects on at once (HPA on an External metric), plus a chart-made PVC."""
    selector = {"matchLabels": {"model": "x"}}
    external = {"type": "External", "name": "vllm_queue", "selector": selector}
    values = {
        "autoscaling": {"hpa": {"enabled": True, "metric": external}},
        "serviceMonitor": {"enabled": True},
        "hfToken": {"existingSecret": "hf"},
        "model": {"extraArgs": ["--enforce-eager"]},
    }
    objects = render(chart, values)
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
            "ServiceMonitor"} <= set(objects)
    for kind, items in objects.items():
        if kind not in CRD_KINDS:
            for obj in items:
                kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    (metric,) = objects["HorizontalPodAutoscaler"][0]["spec"]["metrics"]
    assert metric["external"]["metric"]["selector"] == selector


# The chart's schema mirrors FastKVConfig's bounds, so `helm install` refuses what the plugin
# would refuse at start-up (after the image pull and scheduling on a GPU node).
@pytest.mark.parametrize(
    ("key", "value"),
    [("tspRate", 0), ("tspRate", 1.5), ("retainRate", 0), ("retainRate", 2), ("window", 0),
     ("poolKernel", 4), ("pooling", "median"), ("mode", "fixed"), ("tspLayer", -1),
     ("maxCapacityPrompt", 0), ("tspLen", 0), ("enabled", "maybe")],
)
def test_schema_rejects_what_the_plugin_rejects(chart: helm.Chart, key: str, value: Any):
    with pytest.raises(Exception, match="Invalid FastKV setting"):
        FastKVConfig.validated({CHART_TO_CONFIG[key]: value})
    with pytest.raises(helm.HelmValuesError, match=f"fastkv/{key}"):
        chart.render({"fastkv": {key: value}}, name=RELEASE)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fastkv": {"tsp_rate": 0.3}}, "tsp_rate"),
        ({"gpu": {"count": 0}}, "gpu/count"),
        ({"modelCache": {"type": "nfs"}}, "modelCache/type"),
        ({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}, "exclusive"),
        ({"autoscaling": {"hpa": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
         "minReplicas"),
    ],
    ids=["misspelt-knob", "no-gpu", "unknown-cache-type", "hpa-and-keda", "min-above-max"],
)
def test_bad_values_fail_the_render(chart: helm.Chart, values: dict, message: str):
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values, name=RELEASE)
