"""The lab on a real Kubernetes control plane (`meshgress lab up --datastore kube`).

Why: the production path is Kubernetes, with each component under its own ServiceAccount
and the chart's RBAC. The lab proves that path end to end on one machine: etcd and
kube-apiserver run in the lab's own control-plane namespace (`mg-<lab>-cp`, on the
underlay at CONTROL_PLANE_ADDRESS), and this module does what the missing parts of a
cluster would do:

- what a kubelet does: register Nodes (pod CIDRs, InternalIP, labels) and report Pod
  addresses (`status.podIP`) once the CNI plugin has wired them;
- what the scheduler and controllers do: Pods bound to their node (`spec.nodeName`), the
  `default` ServiceAccount in every namespace;
- what `helm install` does: the CRDs (charts/meshgress/crds/) and the RBAC templates of
  the chart, rendered with the pinned helm;
- what the kubelet does for a pod's projected token: a TokenRequest for the component's
  ServiceAccount, bound to a Pod object standing for the process, so the token carries
  its node-name and pod-name claims. Each agent and gateway gets a kubeconfig with its own
  token in its node's state folder; none runs as admin.

Tokens are long-lived rather than refreshed: TOKEN_LIFETIME_SECONDS equals the lab PKI's
lifetime (controlplane.CERT_LIFETIME), after which the lab's certificates expire anyway; a
lab that must outlive it is brought down and up again.

The lab's own calls go to the API server from a thread inside the control-plane namespace
(`ControlPlane.call`); the host reaches it through a loopback forwarder (forward.py) and
the admin kubeconfig `host_kubeconfig` points there.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from meshgress.datastore import API_VERSIONS, LEASE_NAMESPACE, Kind, ListResult
from meshgress.lab import netns
from meshgress.lab.controlplane import (
    CERT_LIFETIME,
    ControlPlane,
    ControlPlaneConfig,
    ControlPlaneError,
    binary_path,
)
from meshgress.lab.topology import SERVICE_CIDR, UNDERLAY_CIDR, lab_prefix

_T = TypeVar("_T")

CONTROL_PLANE_ADDRESS = UNDERLAY_CIDR[2]
API_PORT = 6443
SYSTEM_NAMESPACE = LEASE_NAMESPACE
"""Where the chart installs its ServiceAccounts and where the component Pods stand."""
AGENT = "agent"
GATEWAY = "gateway"
COMPONENTS = (AGENT, GATEWAY)
SERVICE_ACCOUNTS: Mapping[str, str] = {AGENT: "meshgress-agent", GATEWAY: "meshgress-gateway"}
TOKEN_LIFETIME_SECONDS = int(CERT_LIFETIME.total_seconds())
FIELD_MANAGER = "meshgress-lab"
CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "meshgress"
RBAC_TEMPLATES = (
    "templates/serviceaccounts.yaml",
    "templates/rbac-agent.yaml",
    "templates/rbac-gateway.yaml",
    "templates/validatingadmissionpolicy-agent-node.yaml",
    "templates/validatingadmissionpolicy-gateway-leases.yaml",
)
"""The chart's templates the lab installs: identities and permissions, nothing that would
wait for a controller the lab does not run (DaemonSets, Deployments)."""
NODE_KUBECONFIG_DIR = "kube"
"""Below a node's state folder (/var/lib/meshgress inside the node): one kubeconfig per
component process."""


class LabKubeError(RuntimeError):
    """The lab's control plane cannot do what was asked; the message says why."""


# --- the shape (pure) ---------------------------------------------------------------------


def control_plane_netns(lab_name: str) -> str:
    return f"{lab_prefix(lab_name)}cp"


def component_pod_name(component: str, node: str) -> str:
    return f"meshgress-{component}-{node}"


def compute_component_pod(component: str, node: str,
                          node_address: ipaddress.IPv4Address) -> dict[str, Any]:
    """The Pod object standing for an agent or gateway process on `node`: host network,
    bound to the node, run as the component's ServiceAccount; its status is what a kubelet
    reports for a running host-network pod."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": component_pod_name(component, node),
                     "namespace": SYSTEM_NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "meshgress",
                                "app.kubernetes.io/component": component}},
        "spec": {"nodeName": node, "hostNetwork": True,
                 "serviceAccountName": SERVICE_ACCOUNTS[component],
                 "automountServiceAccountToken": False,
                 "containers": [{"name": component, "image": "meshgress:lab"}]},
        "status": {"phase": "Running", "podIP": str(node_address),
                   "podIPs": [{"ip": str(node_address)}], "hostIP": str(node_address)},
    }


def compute_kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> dict[str, Any]:
    """A kubeconfig for one identity: the cluster's CA, the server and a bearer token."""
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "meshgress-lab", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "meshgress-lab", "context": {
            "cluster": "meshgress-lab", "user": user}}],
        "current-context": "meshgress-lab",
    }


def render_chart_rbac(chart_dir: Path = CHART_DIR, namespace: str = SYSTEM_NAMESPACE
                      ) -> list[dict[str, Any]]:
    """The chart's RBAC objects, rendered by the pinned helm as `helm install` would."""
    if not (chart_dir / "Chart.yaml").exists():
        raise LabKubeError(f"the meshgress chart is not at {chart_dir}")
    argv = [str(binary_path("helm")), "template", "meshgress", str(chart_dir),
            "--namespace", namespace]
    for template in RBAC_TEMPLATES:
        argv += ["--show-only", template]
    rendered = netns.run(argv).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def chart_crds(chart_dir: Path = CHART_DIR) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions the chart ships (charts/meshgress/crds/)."""
    crds = []
    for path in sorted((chart_dir / "crds").glob("*.yaml")):
        crds += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    if not crds:
        raise LabKubeError(f"no CRDs in {chart_dir / 'crds'}")
    return crds


# --- the control plane and what the lab does on it ------------------------------------------


class LabKube:
    """One lab's control plane: started and stopped by the lab, and the lab's writes."""

    def __init__(self, lab_name: str, state_dir: Path) -> None:
        self.lab_name = lab_name
        self.state_dir = state_dir
        self.netns = control_plane_netns(lab_name)
        self.plane = ControlPlane(ControlPlaneConfig(
            state_dir=state_dir / "controlplane", netns=self.netns,
            address=str(CONTROL_PLANE_ADDRESS), secure_port=API_PORT,
            service_cluster_ip_range=str(SERVICE_CIDR)))
        self._dynamic: Any = None

    @property
    def server_url(self) -> str:
        return self.plane.server_url

    @property
    def lab_kubeconfig(self) -> Path:
        """Admin kubeconfig for use inside the lab's namespaces (server on the underlay)."""
        return self.plane.kubeconfig

    @property
    def host_kubeconfig(self) -> Path:
        """Admin kubeconfig for use from the host (server: the loopback forwarder)."""
        return self.state_dir / "admin.kubeconfig"

    @property
    def _port_file(self) -> Path:
        return self.state_dir / "controlplane-forward.port"

    # -- life cycle

    def start(self) -> None:
        """etcd and the API server in the control-plane namespace (which the caller made
        and put on the underlay), then the CRDs and the chart's RBAC, then the forwarder
        and the host's admin kubeconfig."""
        try:
            self.plane.start()
        except ControlPlaneError as exc:
            raise LabKubeError(f"the lab's control plane did not start: {exc}") from exc
        self._install()
        self._start_forwarder()

    def _install(self) -> None:
        self.apply_objects([{"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": SYSTEM_NAMESPACE, "labels": {
                                 "kubernetes.io/metadata.name": SYSTEM_NAMESPACE}}}])
        self.ensure_default_service_accounts([SYSTEM_NAMESPACE])
        crds = chart_crds()
        self.apply_objects(crds)
        self._wait_established([crd["metadata"]["name"] for crd in crds])
        self.apply_objects(render_chart_rbac())

    def _wait_established(self, names: Iterable[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            def established(name: str) -> bool:
                crd = self._resource("apiextensions.k8s.io/v1",
                                     "CustomResourceDefinition").get(name=name).to_dict()
                return any(c.get("type") == "Established" and c.get("status") == "True"
                           for c in (crd.get("status") or {}).get("conditions") or [])
            pending = {name for name in pending if not self.plane.call(
                lambda name=name: established(name))}  # type: ignore[misc]
            if pending and time.monotonic() > deadline:
                raise LabKubeError(f"CRDs {sorted(pending)} not established in {timeout}s")
            if pending:
                time.sleep(0.1)
        self._dynamic = None  # discovery must see the new kinds

    def _start_forwarder(self, timeout: float = 10) -> None:
        self._port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "meshgress.lab.forward",
                "--netns", str(netns.netns_path(self.netns)),
                "--to", f"{CONTROL_PLANE_ADDRESS}:{API_PORT}",
                "--port-file", str(self._port_file)]
        pid = netns.spawn_detached(argv, self.state_dir / "logs" / "controlplane-forward.log")
        deadline = time.monotonic() + timeout
        while not self._port_file.exists():
            if not netns.pid_alive(pid) or time.monotonic() > deadline:
                raise LabKubeError("the control plane's loopback forwarder did not start "
                                   f"(log: {self.state_dir / 'logs' / 'controlplane-forward.log'})")
            time.sleep(0.02)
        port = int(self._port_file.read_text())
        config = yaml.safe_load(self.plane.kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
        _write_private(self.host_kubeconfig, yaml.safe_dump(config, sort_keys=False))

    def running(self) -> bool:
        return set(self.plane.pids()) == {"etcd", "kube-apiserver"}

    # -- calls into the namespace

    def call(self, fn: Callable[[], _T]) -> _T:
        return self.plane.call(fn)

    def _client(self) -> Any:
        if self._dynamic is None:
            self._dynamic = self.plane.call(lambda: DynamicClient(  # type: ignore[no-untyped-call,unused-ignore]
                self.plane.api_client(),
                cache_file=str(self.state_dir / "controlplane" / "discovery.json")))
        return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        return self._client().resources.get(api_version=api_version, kind=kind)

    def apply_objects(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Server-side apply of whole objects (the lab's field manager owns them); a
        status in the object is applied to the status subresource too."""
        for obj in objects:
            self.call(lambda obj=obj: self._apply_one(obj))  # type: ignore[misc]

    def _apply_one(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource = self._resource(obj["apiVersion"], obj["kind"])
        body = {k: v for k, v in obj.items() if k != "status"}
        namespace = (obj.get("metadata") or {}).get("namespace")
        applied = self._client().server_side_apply(
            resource, body=body, name=obj["metadata"]["name"], namespace=namespace,
            field_manager=FIELD_MANAGER, force_conflicts=True).to_dict()
        if obj.get("status") and "status" in resource.subresources:
            applied = self._client().patch(
                resource.subresources["status"], body={"status": obj["status"]},
                name=obj["metadata"]["name"], namespace=namespace,
                content_type="application/merge-patch+json").to_dict()
        result: dict[str, Any] = applied
        return result

    def ensure_default_service_accounts(self, namespaces: Iterable[str]) -> None:
        """The `default` ServiceAccount of each namespace, as the ServiceAccount
        controller (not run here) would create it: the API server refuses Pods without."""
        self.apply_objects({"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": "default", "namespace": ns}}
                           for ns in namespaces)

    # -- identities

    def issue_identity(self, component: str, node: str, node_address: ipaddress.IPv4Address,
                       node_state_dir: Path) -> Path:
        """The Pod standing for `component` on `node`, a token of its ServiceAccount bound
        to that Pod, and a kubeconfig with it under the node's state folder (0600).
        Returns the kubeconfig's path as the node sees it (relative to its state folder)."""
        pod = compute_component_pod(component, node, node_address)
        self.apply_objects([pod])
        token = self.plane.pod_bound_token(SYSTEM_NAMESPACE, pod["metadata"]["name"],
                                           expiration_seconds=TOKEN_LIFETIME_SECONDS)
        user = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{SERVICE_ACCOUNTS[component]}"
        config = compute_kubeconfig(self.server_url, self.plane.pki.ca_crt.read_bytes(),
                                    user, token)
        relative = Path(NODE_KUBECONFIG_DIR) / f"{component}.kubeconfig"
        path = node_state_dir / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(path, yaml.safe_dump(config, sort_keys=False))
        return relative

    def remove_identities(self, node: str) -> None:
        for component in COMPONENTS:
            self._delete_if_present("v1", "Pod", component_pod_name(component, node),
                                    SYSTEM_NAMESPACE)

    # -- the Datastore calls the lab makes (a subset of meshgress.datastore.Datastore)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.call(lambda: self._apply_one(obj))

    def patch_status(self, kind: Kind, name: str, status: Mapping[str, Any],
                     namespace: str = "") -> dict[str, Any]:
        def patch() -> dict[str, Any]:
            resource = self._resource(API_VERSIONS[kind], str(kind))
            result: dict[str, Any] = self._client().patch(
                resource.subresources["status"], body={"status": dict(status)}, name=name,
                namespace=namespace or None,
                content_type="application/merge-patch+json").to_dict()
            return result

        return self.call(patch)

    def delete(self, kind: Kind, name: str, namespace: str = "") -> None:
        self._delete_if_present(API_VERSIONS[kind], str(kind), name, namespace)

    def _delete_if_present(self, api_version: str, kind: str, name: str,
                           namespace: str = "") -> None:
        def delete() -> None:
            # No kubelet confirms a pod's end here: delete it at once, as the kubelet's
            # final status update would.
            with contextlib.suppress(NotFoundError):
                self._client().delete(self._resource(api_version, kind), name=name,
                                      namespace=namespace or None,
                                      body={"gracePeriodSeconds": 0})

        self.call(delete)

    def list(self, kind: Kind) -> ListResult:
        def listing() -> ListResult:
            result = self._client().get(self._resource(API_VERSIONS[kind], str(kind))).to_dict()
            return ListResult(items=tuple(result.get("items") or []),
                              resource_version=int(result["metadata"]["resourceVersion"]))

        return self.call(listing)

    def close(self) -> None:
        """Nothing to release: the admin client lives as long as this object."""

    # -- kubectl

    def kubectl_argv(self, args: Sequence[str]) -> builtins.list[str]:
        """kubectl (the pinned one) as admin, run in the control-plane namespace."""
        return ["nsenter", f"--net={netns.netns_path(self.netns)}", "--",
                str(binary_path("kubectl")), f"--kubeconfig={self.lab_kubeconfig}", *args]

    def kubectl(self, *args: str, input_text: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        return netns.run(self.kubectl_argv(list(args)), input_text=input_text)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)
