"""`helm install`, `helm upgrade` and `helm uninstall` of the chart on a real kube-apiserver.

The control plane runs in a throwaway network namespace (as in test_chart_rbac.py) and the
pinned helm talks to it as the cluster's admin. No kubelet or controllers run, so no pod
starts: what is proved is that the API server accepts every object the chart renders
(schemas, the CRDs' CEL rules, admission), that an upgrade with changed values changes
exactly what it should, and that an uninstall leaves nothing of the release behind but the
CRDs. The CRDs go in first the way the README says to install and upgrade them (`kubectl
apply --server-side -f charts/meshgress/crds/`), since Helm neither upgrades nor removes
them.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgress.lab import netns as lab_netns
from meshgress.lab.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
    binary_path,
    cleanup_state_dir,
)
from tests.privileged.conftest import delete_netns, list_netns, require_root, run
from tests.run_owned import OWNER, is_crashed_runs, owned
from tests.tools.chart_golden import CHART

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

NETNS_PREFIX = "mgt-helm-"
STATE_ROOT = Path("/tmp/mgt-helm")
NAMESPACE = "meshgress-system"
RELEASE = "meshgress"
RELEASE_SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
PRODUCTION = CHART / "examples" / "production.yaml"
NO_OPERATOR = ["--set", "monitoring.prometheusRule.enabled=false"]
"""This API server has no Prometheus operator: its PrometheusRule kind does not exist."""


class Helm:
    """The pinned helm and kubectl as the cluster's admin, inside the control plane's
    namespace, with helm's own folders in a temporary one."""

    def __init__(self, plane: ControlPlane, home: Path) -> None:
        self.plane = plane
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home),
                    "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data"),
                    "KUBECONFIG": str(plane.kubeconfig)}

    def _run(self, argv: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        netns = lab_netns.netns_path(self.plane.config.netns or "")
        proc = subprocess.run(["nsenter", f"--net={netns}", "--", *argv], env=self.env,
                              capture_output=True, text=True, check=False, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv[0]} {' '.join(argv[1:3])}: {proc.stdout}{proc.stderr}")
        return proc

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(binary_path("helm")), *args], check)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(binary_path("kubectl")), *args], check)

    def get_json(self, *args: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return result

    def release_objects(self) -> list[str]:
        """Every object of every kind the API server serves, namespaced or not, that
        carries the release's label."""
        kinds = self.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
        found = self.kubectl("get", ",".join(kinds), "--all-namespaces", "-l",
                             RELEASE_SELECTOR, "-o", "name", "--ignore-not-found").stdout
        return sorted(found.split())

    def manifest(self) -> list[dict[str, Any]]:
        text = self.helm("get", "manifest", RELEASE, "-n", NAMESPACE).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    require_root()
    for leftover in sorted(STATE_ROOT.glob("*")):
        if is_crashed_runs(f"{leftover.name}-", ""):
            cleanup_state_dir(leftover)
    for name in list_netns(NETNS_PREFIX):
        if is_crashed_runs(name, NETNS_PREFIX):
            lab_netns.stop_pids(lab_netns.netns_pids(name))
            delete_netns(name)
    netns = f"{owned(NETNS_PREFIX)}{secrets.token_hex(3)}"
    run(["ip", "netns", "add", netns])
    try:
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        plane = ControlPlane(ControlPlaneConfig(state_dir=STATE_ROOT / str(OWNER), netns=netns,
                                                service_cluster_ip_range="10.96.0.0/16"))
        try:
            plane.start()
            tool = Helm(plane, tmp_path_factory.mktemp("helm-home"))
            tool.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
            tool.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd", "--all")
            yield tool
        finally:
            plane.stop(keep_logs_in=tmp_path_factory.mktemp("helm-controlplane-logs"))
    finally:
        lab_netns.stop_pids(lab_netns.netns_pids(netns))
        delete_netns(netns)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()


def _key(obj: dict[str, Any]) -> str:
    namespace = obj["metadata"].get("namespace")
    return f"{obj['kind']}/{namespace + '/' if namespace else ''}{obj['metadata']['name']}"


def test_install_upgrade_uninstall(helm: Helm) -> None:
    # The namespace as `--create-namespace` makes it; a server-side dry run needs it first.
    helm.kubectl("create", "namespace", NAMESPACE)

    # A server-side dry run: every object through the API server's validation and
    # admission, nothing stored.
    dry = helm.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(PRODUCTION),
                    *NO_OPERATOR, "--dry-run=server")
    assert "STATUS: pending-install" in dry.stdout, dry.stdout
    assert helm.release_objects() == []

    # For real.
    helm.helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(PRODUCTION),
              *NO_OPERATOR)
    manifest = helm.manifest()
    assert {o["kind"] for o in manifest} >= {
        "DaemonSet", "Deployment", "PodDisruptionBudget", "ConfigMap", "ServiceAccount",
        "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "EgressGateway",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    stored = set()
    for obj in manifest:
        args = [obj["kind"] if obj["kind"] != "EgressGateway" else "egressgateways.meshgress.io",
                obj["metadata"]["name"]]
        if obj["metadata"].get("namespace"):
            args += ["-n", obj["metadata"]["namespace"]]
        got = helm.get_json(*args)
        assert got["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        stored.add(_key(obj))
    assert len(stored) == len(manifest)
    installed = helm.release_objects()
    assert len(installed) == len(manifest), installed
    partners = helm.get_json("egressgateways.meshgress.io", "partners")
    assert partners["spec"]["egressIPs"] == ["203.0.113.10", "203.0.113.11"]

    # An upgrade with changed values: more gateways, another pod range, one EgressGateway
    # fewer and a new one, no PodDisruptionBudget.
    helm.helm("upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(PRODUCTION),
              *NO_OPERATOR, "--set", "gateway.replicas=4", "--set", "agent.logLevel=DEBUG",
              "--set", "cluster.podCIDRs[0]=10.40.0.0/14",
              "--set", "gateway.podDisruptionBudget.enabled=false",
              "--set-json", 'gateways=[{"name":"partners","egressIPs":["203.0.113.10"]},'
                            '{"name":"archive","egressIPs":["203.0.113.30"]}]')
    deployment = helm.get_json("deployment", "meshgress-gateway", "-n", NAMESPACE)
    assert deployment["spec"]["replicas"] == 4
    daemonset = helm.get_json("daemonset", "meshgress-agent", "-n", NAMESPACE)
    assert "--log-level=DEBUG" in daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    config = helm.get_json("configmap", "meshgress-config", "-n", NAMESPACE)
    assert "10.40.0.0/14" in config["data"]["cluster.yaml"]
    names = {o["metadata"]["name"] for o in helm.get_json("egressgateways.meshgress.io")["items"]}
    assert names == {"partners", "archive"}
    assert helm.get_json("egressgateways.meshgress.io", "partners")["spec"]["egressIPs"] == [
        "203.0.113.10"]
    assert helm.kubectl("get", "pdb", "-n", NAMESPACE, "-o", "name").stdout.strip() == ""
    assert helm.helm("history", RELEASE, "-n", NAMESPACE).stdout.count("deployed") == 1

    # A bad value changes nothing: the schema refuses it before anything is sent.
    refused = helm.helm("upgrade", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(PRODUCTION),
                        *NO_OPERATOR, "--set", "cluster.podCIDRs[0]=10.40.0.0/33", check=False)
    assert refused.returncode != 0 and "schema" in refused.stderr, refused.stderr
    assert helm.get_json("deployment", "meshgress-gateway", "-n", NAMESPACE)["spec"][
        "replicas"] == 4

    # Uninstall: nothing of the release is left, whatever its kind; the CRDs stay.
    helm.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait")
    assert helm.release_objects() == []
    assert helm.kubectl("get", "secrets", "-n", NAMESPACE, "-l", "owner=helm", "-o",
                        "name").stdout.strip() == ""
    crds = {o["metadata"]["name"] for o in helm.get_json("crd")["items"]}
    assert crds == {"egressgateways.meshgress.io", "egresspolicies.meshgress.io"}
