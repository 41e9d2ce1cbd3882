"""deploy/k8s: every manifest validates against the Kubernetes schemas and states the facts we rely on.

Schemas come bundled with ``kubernetes-validate`` (no download). The KEDA ScaledObject is a CRD the
package has no schema for: it is checked for structure only.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.paths import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"  # a version the package bundles; native gRPC probes are GA since 1.27
CRD_FILES = {"keda/scaledobject.yaml"}
DRAIN_SECONDS = 30.0  # services/common/settings.py default, also passed explicitly below


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def manifest_files() -> list[str]:
    return sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for f in manifest_files() for d in documents(f)}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("name", [f for f in manifest_files() if f not in CRD_FILES])
def test_manifest_validates_against_kubernetes_schemas(name: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kustomization_lists_existing_files() -> None:
    (kust,) = documents("kustomization.yaml")
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res


def test_keda_scaled_object_structure() -> None:
    (so,) = documents("keda/scaledobject.yaml")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert so["spec"]["scaleTargetRef"]["name"] == "reward"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "rlhf_reward_queue_depth" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0


@pytest.mark.parametrize(
    ("name", "image", "http", "grpc"),
    [("reward", "rlhf-feedback:cpu", 8000, 50051), ("reward-gpu", "rlhf-feedback:cuda", 8000, 50051),
     ("judge", "rlhf-feedback:cpu", 8001, 50052)],
)  # fmt: skip
def test_deployment_probes_ports_resources_and_grace(name: str, image: str, http: int, grpc: int) -> None:
    dep = all_docs()[("Deployment", name)]
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["image"] == image
    assert c["args"][:2] == ["serve", "judge" if name == "judge" else "reward"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": http, "grpc": grpc}
    env = {e["name"]: e["value"] for e in c["env"]}
    prefix = "RLHF_FEEDBACK_JUDGE_" if name == "judge" else "RLHF_FEEDBACK_REWARD_"
    assert env[prefix + "HOST"] == "0.0.0.0"
    # Native gRPC probes on the health services of DESIGN.md.
    for probe, service in [
        ("startupProbe", "readiness"),
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ]:
        assert c[probe]["grpc"] == {"port": grpc, "service": service}, probe
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # The pod outlives its drain: Kubernetes must never SIGKILL a draining replica.
    drain = float(flag(c["args"], "--drain-seconds") or DRAIN_SECONDS)
    assert pod["terminationGracePeriodSeconds"] >= drain + 10
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    if name == "reward-gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert flag(c["args"], "--device") == "cuda" and flag(c["args"], "--dtype") == "bfloat16"


@pytest.mark.parametrize(("name", "port"), [("reward", 50051), ("reward-gpu", 50051), ("judge", 50052)])
def test_grpc_service_is_headless_and_http_service_is_cluster_ip(name: str, port: int) -> None:
    docs = all_docs()
    pod_labels = docs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
    grpc_svc, http_svc = docs[("Service", f"{name}-grpc")], docs[("Service", name)]
    assert grpc_svc["spec"]["clusterIP"] == "None"  # DNS returns every pod: client-side round_robin
    assert [p["port"] for p in grpc_svc["spec"]["ports"]] == [port]
    assert http_svc["spec"].get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in http_svc["spec"]
    for svc in (grpc_svc, http_svc):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    pdb = docs[("PodDisruptionBudget", name)]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_scales_reward_on_queue_depth() -> None:
    hpa = all_docs()[("HorizontalPodAutoscaler", "reward")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "reward"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "rlhf_reward_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_queue_depth_metric_exists() -> None:
    from services.reward.metrics import RewardMetrics

    assert "rlhf_reward_queue_depth" in {m.name for m in RewardMetrics().registry.collect()}
