"""The Helm chart as rendered by the pinned helm: lint, golden output, the Kubernetes
schemas of the oldest and newest supported release, what the values schema rejects, and
the promises its workloads make (privileges, probes, host paths, identities).

Golden files: tests/golden/chart/, rewritten by `python -m tests.tools.chart_golden`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshgress.lab.controlplane import binary_path
from tests.tools.chart_golden import CHART, golden_path, helm_template, render, value_sets

SUPPORTED_KUBERNETES = ("1.30.0", "1.35.0")
"""The oldest (Chart.yaml kubeVersion: ValidatingAdmissionPolicy v1) and newest release the
chart supports; kubernetes-validate is pinned to a version that ships both schemas."""
CUSTOM_KINDS = {"EgressGateway", "PrometheusRule"}
"""Kinds no Kubernetes schema describes: the API server checks EgressGateways against the
CRD in tests/privileged/test_chart_install.py; PrometheusRule is the operator's."""
VALUE_SETS = value_sets()


def objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: objects(render(values)) for name, values in VALUE_SETS.items()}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_the_examples_exist() -> None:
    assert set(VALUE_SETS) == {"default", "production", "no-gateways-k3s"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(name: str) -> None:
    values = VALUE_SETS[name]
    argv = [str(binary_path("helm")), "lint", "--strict", str(CHART),
            "--namespace", "meshgress-system"]
    if values is not None:
        argv += ["--values", str(values)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_rendered_chart_is_the_golden_one(name: str) -> None:
    expected = golden_path(name).read_text()
    actual = render(VALUE_SETS[name])
    assert actual == expected, (
        f"the chart renders differently from {golden_path(name)}; if the change is meant, "
        "rewrite it with `.venv/bin/python -m tests.tools.chart_golden` and read the diff")


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_is_valid_for_the_supported_kubernetes_releases(
        rendered: dict[str, list[dict[str, Any]]], name: str, version: str) -> None:
    docs = rendered[name] + objects(render_crds())
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 15


def render_crds() -> str:
    return "\n---\n".join(path.read_text() for path in sorted((CHART / "crds").glob("*.yaml")))


def test_the_validator_refuses_what_kubernetes_would(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The check above can fail: a misplaced field and a wrong type are caught."""
    daemonset = find(rendered["default"], "DaemonSet", "meshgress-agent")
    misplaced = {**daemonset, "spec": {**daemonset["spec"], "hostNetwork": True}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misplaced, SUPPORTED_KUBERNETES[0], strict=True)
    pdb = find(rendered["default"], "PodDisruptionBudget", "meshgress-gateway")
    wrong = {**pdb, "spec": {**pdb["spec"], "maxUnavailable": [1]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, SUPPORTED_KUBERNETES[-1], strict=True)


BAD_VALUES = {
    "a pod CIDR with a /33": (["--set", "cluster.podCIDRs[0]=10.244.0.0/33"],
                              "/cluster/podCIDRs/0"),
    "a service range that is an address": (["--set", "cluster.serviceCIDRs[0]=10.96.0.1"],
                                           "/cluster/serviceCIDRs/0"),
    "no pod range at all": (["--set-json", "cluster.podCIDRs=[]"], "/cluster/podCIDRs"),
    "an unknown agent field (a typo)": (["--set", "agent.wireguardBackends=kernel"],
                                        "additional properties 'wireguardBackends'"),
    "an unknown backend": (["--set", "agent.wireguardBackend=vpn"], "/agent/wireguardBackend"),
    "a port out of range": (["--set", "agent.metricsPort=70000"], "/agent/metricsPort"),
    "a port as a word": (["--set", "gateway.metricsPort=http"], "/gateway/metricsPort"),
    "a digest that is not sha256": (["--set", "image.digest=md5:abc"], "/image/digest"),
    "a pull policy in lower case": (["--set", "image.pullPolicy=always"], "/image/pullPolicy"),
    "a relative CNI folder": (["--set", "cni.binDir=opt/cni/bin"], "/cni/binDir"),
    "a monitoring source that is not a CIDR": (
        ["--set", "agent.metricsAllowFrom[0]=monitoring"], "/agent/metricsAllowFrom/0"),
    "an MTU below IPv6's minimum": (["--set", "agent.mtu=1000"], "/agent/mtu"),
    "negative gateway replicas": (["--set", "gateway.replicas=-1"], "/gateway/replicas"),
    "a gateway without egress IPs": (
        ["--set-json", 'gateways=[{"name":"egress"}]'], "missing property 'egressIPs'"),
    "a gateway whose egress IP is a CIDR": (
        ["--set-json", 'gateways=[{"name":"egress","egressIPs":["203.0.113.0/24"]}]'],
        "/gateways/0/egressIPs/0"),
    "a gateway with an upper-case name": (
        ["--set-json", 'gateways=[{"name":"Egress","egressIPs":["203.0.113.1"]}]'],
        "/gateways/0/name"),
    "a gateway with an unknown failure policy": (
        ["--set-json",
         'gateways=[{"name":"e","egressIPs":["203.0.113.1"],"failurePolicy":"Open"}]'],
        "/gateways/0/failurePolicy"),
    "an interface name with a slash": (
        ["--set-json", 'gateways=[{"name":"e","egressIPs":["203.0.113.1"],"interface":"a/b"}]'],
        "/gateways/0/interface"),
    "a gateway node selector with matchExpressions (the CRD refuses them)": (
        ["--set-json", 'gateways=[{"name":"e","egressIPs":["203.0.113.1"],"nodeSelector":'
                       '{"matchExpressions":[{"key":"a","operator":"Exists"}]}}]'],
        "additional properties 'matchExpressions'"),
    "the API server's host without its port": (
        ["--set", "apiServer.host=192.0.2.10"], "/apiServer/port"),
    "a toleration with a bad operator": (
        ["--set-json", 'agent.tolerations=[{"operator":"Any"}]'], "/agent/tolerations/0/operator"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_the_values_schema_rejects(case: str) -> None:
    args, where = BAD_VALUES[case]
    proc = helm_template(None, *args)
    assert proc.returncode != 0, f"accepted: {args}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert where in proc.stderr, proc.stderr


def test_a_release_outside_meshgress_system_is_refused() -> None:
    proc = helm_template(None, namespace="kube-system")
    assert proc.returncode != 0
    assert "must be installed in the namespace meshgress-system" in proc.stderr, proc.stderr


# --- what the workloads promise -------------------------------------------------------------


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    return next(c for c in containers if c["name"] == name)


def _args(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for arg in container.get("args", []) + container.get("command", []):
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_agent_runs_on_every_node_with_three_capabilities_and_loopback_probes(
        rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    daemonset = find(rendered[name], "DaemonSet", "meshgress-agent")
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["terminationGracePeriodSeconds"] <= 30
    agent = _container(pod, "agent")
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"],
                                        "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]}
    assert not security.get("privileged") and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    args = _args(agent)
    port = int(args["--metrics-address"].split(",")[0].rsplit(":", 1)[1])
    assert args["--metrics-address"] == f"127.0.0.1:{port},node-ip:{port}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["host"] == "127.0.0.1", probe
        assert agent[probe]["httpGet"]["port"] == port, probe
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert args["--datastore"] == "kube" and args["--node"] == "$(NODE_NAME)"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    if name != "no-gateways-k3s":
        assert pod["tolerations"] == [{"operator": "Exists"}]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_cni_folders_are_the_nodes_own_paths(
        rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    """The launcher names its files by absolute path and the conflist names the socket:
    each folder is mounted at the node's own path."""
    pod = find(rendered[name], "DaemonSet", "meshgress-agent")["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    install, agent = _container(pod, "install-cni"), _container(pod, "agent")
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    install_args = _args(install)
    assert install["command"][:3] == ["python", "-m", "cni.install"]
    assert "--skip-if-current" in install_args
    assert install_args["--bin-dir"] == host_paths["cni-bin"] == \
        install["volumeMounts"][0]["mountPath"]
    assert install["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    args = _args(agent)
    assert args["--cni-conf-dir"] == host_paths["cni-conf"] == mounts["cni-conf"]
    assert host_paths["run"] == mounts["run"] == str(Path(args["--cni-socket"]).parent)
    assert host_paths["state"] == mounts["state"] == args["--state-dir"]
    assert set(host_paths) <= {"state", "run", "cni-bin", "cni-conf", "tun"}


def test_the_tun_device_only_where_wireguard_go_may_run(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    def tun(docs: list[dict[str, Any]], kind: str, name: str) -> bool:
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        return any(v.get("hostPath", {}).get("path") == "/dev/net/tun" for v in pod["volumes"])

    assert tun(rendered["default"], "DaemonSet", "meshgress-agent")
    assert tun(rendered["no-gateways-k3s"], "DaemonSet", "meshgress-agent")
    assert not tun(rendered["production"], "DaemonSet", "meshgress-agent")  # kernel only
    assert not tun(rendered["production"], "Deployment", "meshgress-gateway")


@pytest.mark.parametrize("name", ["default", "production"])
def test_gateways_are_one_per_gateway_node_with_their_pod_name_as_identity(
        rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    deployment = find(rendered[name], "Deployment", "meshgress-gateway")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert pod["hostNetwork"] is True
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == [{"topologyKey": "kubernetes.io/hostname",
                     "labelSelector": {"matchLabels": labels}}]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0,
                                                                "maxUnavailable": 1}
    gateway = _container(pod, "gateway")
    args = _args(gateway)
    assert args["--identity"] == "$(POD_NAME)"
    env = {e["name"]: e for e in gateway["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert gateway["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                          "add": ["NET_ADMIN", "NET_RAW"]}
    assert pod["terminationGracePeriodSeconds"] >= 30
    pdb = find(rendered[name], "PodDisruptionBudget", "meshgress-gateway")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    expected_nodes = {"default": {"meshgress.io/gateway": "true"},
                      "production": {"node-role.example.com/egress": "true"}}[name]
    assert pod["nodeSelector"] == expected_nodes


def test_without_gateways_no_gateway_workload(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {d["kind"] for d in rendered["no-gateways-k3s"]}
    assert "Deployment" not in kinds and "PodDisruptionBudget" not in kinds
    assert "EgressGateway" not in kinds


def test_egress_gateways_from_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    partners = find(rendered["production"], "EgressGateway", "partners")
    assert partners["spec"]["egressIPs"] == ["203.0.113.10", "203.0.113.11"]
    assert partners["spec"]["failurePolicy"] == "FailClosed"
    assert "name" not in partners["spec"]
    assert find(rendered["production"], "EgressGateway", "saas")["spec"]["failurePolicy"] \
        == "FailOpen"


def test_the_image_by_digest_wins_over_the_tag(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    def image(docs: list[dict[str, Any]]) -> str:
        pod = find(docs, "DaemonSet", "meshgress-agent")["spec"]["template"]["spec"]
        return str(_container(pod, "agent")["image"])

    assert image(rendered["default"]) == "localhost/meshgress:0.1.0"
    assert image(rendered["production"]).startswith(
        "registry.example.com/platform/meshgress@sha256:")


def test_the_cluster_ranges_reach_the_components(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    from meshgress.config import parse_cluster_config

    config = find(rendered["production"], "ConfigMap", "meshgress-config")
    parsed = parse_cluster_config(yaml.safe_load(config["data"]["cluster.yaml"]))
    assert [str(c) for c in parsed.pod_cidrs] == ["10.42.0.0/16"]
    assert [str(c) for c in parsed.service_cidrs] == ["10.43.0.0/16"]


def test_every_object_carries_the_release_labels(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """What `helm uninstall` and the install test find the release's objects by."""
    for name, docs in rendered.items():
        for doc in docs:
            labels = doc["metadata"].get("labels") or {}
            assert labels.get("app.kubernetes.io/instance") == "meshgress", (name, doc["kind"])
            assert labels.get("app.kubernetes.io/name") == "meshgress", (name, doc["kind"])
