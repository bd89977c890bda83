"""The chart's RBAC and admission policy, held against a real kube-apiserver.

The chart's CRDs, ServiceAccounts, roles and ValidatingAdmissionPolicy are installed as the
lab installs them (rendered by the pinned helm); an agent and a gateway each get a token
of their ServiceAccount bound to a Pod on their node, as a kubelet's projected token is.
With those tokens: `kubectl auth can-i --list` shows exactly the grants the chart means,
per namespace; the agent cannot read Secrets or write EgressPolicies, and may change only
its own Node's meshgress.io annotations; the gateway cannot patch Nodes and writes
EgressPolicies only through their status; and each of two gateways, with its own token,
writes only the slot Leases it holds, under its own pod name, taking one over only when
it is free or expired.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from meshgress.datastore import Forbidden, Kind, LeaseHeld
from meshgress.datastore.kube import KubeDatastore
from meshgress.lab import netns as lab_netns
from meshgress.lab.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
    binary_path,
    cleanup_state_dir,
)
from meshgress.lab.kube import (
    AGENT,
    GATEWAY,
    SYSTEM_NAMESPACE,
    chart_crds,
    component_pod_name,
    compute_component_pod,
    compute_kubeconfig,
    render_chart_rbac,
)
from tests.privileged.conftest import delete_netns, list_netns, require_root, run
from tests.run_owned import OWNER, is_crashed_runs, owned

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

NETNS_PREFIX = "mgt-rbac-"
STATE_ROOT = Path("/tmp/mgt-rbac")
SERVICE_RANGE = "10.96.0.0/16"
_T = TypeVar("_T")

SELF_REVIEWS = {
    ("selfsubjectreviews.authentication.k8s.io", "create"),
    ("selfsubjectaccessreviews.authorization.k8s.io", "create"),
    ("selfsubjectrulesreviews.authorization.k8s.io", "create"),
}
"""What every authenticated user may do (system:basic-user)."""


def grants(resource: str, *verbs: str) -> set[tuple[str, str]]:
    return {(resource, verb) for verb in verbs}


AGENT_CLUSTER_WIDE = SELF_REVIEWS | grants("nodes", "list", "watch", "patch") \
    | grants("pods", "get", "list", "watch") | grants("namespaces", "list", "watch") \
    | grants("egressgateways.meshgress.io", "list", "watch") \
    | grants("egresspolicies.meshgress.io", "list", "watch")
AGENT_EXPECTED = {
    "default": AGENT_CLUSTER_WIDE,
    SYSTEM_NAMESPACE: AGENT_CLUSTER_WIDE
    | grants("leases.coordination.k8s.io", "list", "watch"),
    "payments": AGENT_CLUSTER_WIDE,
}
GATEWAY_CLUSTER_WIDE = SELF_REVIEWS | grants("nodes", "list", "watch") \
    | grants("pods", "list", "watch") | grants("namespaces", "list", "watch") \
    | grants("egressgateways.meshgress.io", "list", "watch") \
    | grants("egresspolicies.meshgress.io", "list", "watch") \
    | grants("egressgateways.meshgress.io/status", "patch") \
    | grants("egresspolicies.meshgress.io/status", "patch")
GATEWAY_EXPECTED = {
    "default": GATEWAY_CLUSTER_WIDE | grants("events.events.k8s.io", "create", "get", "patch"),
    SYSTEM_NAMESPACE: GATEWAY_CLUSTER_WIDE | grants(
        "leases.coordination.k8s.io", "get", "list", "watch", "create", "update", "patch"),
    "payments": GATEWAY_CLUSTER_WIDE,
}

GATEWAY_1 = component_pod_name(GATEWAY, "gw-1")
GATEWAY_2 = component_pod_name(GATEWAY, "gw-2")
"""The gateways' lease identities: their pod names, as the chart passes --identity."""

_ROW = re.compile(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


class Cluster:
    """A control plane with the chart installed, and a kubectl per identity."""

    def __init__(self, plane: ControlPlane, config_dir: Path, tokens: dict[str, str]) -> None:
        self.plane = plane
        self.config_dir = config_dir
        self.tokens = tokens

    def as_component(self, identity: str, work: Callable[[KubeDatastore], _T]) -> _T:
        """`work` on the kube datastore backend with the component's token: the calls
        the agent or gateway itself makes."""
        def run() -> _T:
            store = KubeDatastore(self.plane.token_client(self.tokens[identity]),
                                  retry_budget=2.0)
            try:
                return work(store)
            finally:
                store.close()

        return self.plane.call(run)

    def kubectl_as(self, identity: str, *args: str, input_text: str | None = None,
                   check: bool = False) -> tuple[int, str]:
        kubeconfig = self.config_dir / f"{identity}.kubeconfig"
        argv = ["nsenter", f"--net={lab_netns.netns_path(self.plane.config.netns or '')}",
                "--", str(binary_path("kubectl")), f"--kubeconfig={kubeconfig}", *args]
        proc = lab_netns.run(argv, input_text=input_text, check=check)
        return proc.returncode, proc.stdout + proc.stderr

    def can_i_list(self, identity: str, namespace: str) -> tuple[set[tuple[str, str]],
                                                                set[str]]:
        """(resource, verb) pairs, and the verbs granted on non-resource URLs."""
        code, out = self.kubectl_as(identity, "auth", "can-i", "--list", "-n", namespace)
        assert code == 0, out
        resources, url_verbs = set(), set()
        for line in out.splitlines()[1:]:
            if line.startswith(" "):
                url_verbs.update(line.split("[")[-1].rstrip(" ]").split())
                continue
            match = _ROW.match(line)
            assert match, f"unexpected line in `kubectl auth can-i --list`: {line!r}"
            resource, _urls, names, verbs = match.groups()
            assert names == "", f"{resource}: a grant limited to names {names}"
            resources |= grants(resource, *verbs.split())
        return resources, url_verbs


@contextlib.contextmanager
def _netns() -> Iterator[str]:
    name = f"{owned(NETNS_PREFIX)}{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        lab_netns.stop_pids(lab_netns.netns_pids(name))
        delete_netns(name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_root()
    for leftover in sorted(STATE_ROOT.glob("*")):
        if is_crashed_runs(f"{leftover.name}-", ""):
            cleanup_state_dir(leftover)
    for name in list_netns(NETNS_PREFIX):
        if is_crashed_runs(name, NETNS_PREFIX):
            lab_netns.stop_pids(lab_netns.netns_pids(name))
            delete_netns(name)
    with _netns() as namespace:
        plane = ControlPlane(ControlPlaneConfig(
            state_dir=STATE_ROOT / str(OWNER), netns=namespace,
            service_cluster_ip_range=SERVICE_RANGE))
        try:
            plane.start()
            yield _install(plane, tmp_path_factory.mktemp("rbac-identities"))
        finally:
            plane.stop(keep_logs_in=tmp_path_factory.mktemp("rbac-controlplane-logs"))
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()


def _install(plane: ControlPlane, config_dir: Path) -> Cluster:
    def apply(objects: list[dict]) -> None:
        plane.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(objects))

    apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
           for name in (SYSTEM_NAMESPACE, "payments")])
    crds = chart_crds()
    apply(crds)
    plane.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                  *(f"crd/{crd['metadata']['name']}" for crd in crds))
    apply(render_chart_rbac())
    # Created, not applied: no last-applied annotation, so a Node's annotations are only
    # what the agent wrote.
    plane.kubectl("create", "-f", "-", input_text=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}}
        for name in ("node-1", "node-2", "gw-1", "gw-2")]))
    tokens = {}
    for identity, component, node in (("agent", AGENT, "node-1"),
                                      ("gateway", GATEWAY, "gw-1"),
                                      ("gateway-2", GATEWAY, "gw-2")):
        pod = compute_component_pod(component, node, ipaddress.IPv4Address("192.0.2.11"))
        pod.pop("status")
        apply([pod])
        token = plane.pod_bound_token(SYSTEM_NAMESPACE, pod["metadata"]["name"])
        tokens[identity] = token
        config = compute_kubeconfig(plane.server_url, plane.pki.ca_crt.read_bytes(),
                                    identity, token)
        (config_dir / f"{identity}.kubeconfig").write_text(yaml.safe_dump(config))
    apply([{"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": "payments"},
            "spec": {"gateway": "egress", "namespaceSelector": {}}}])
    return Cluster(plane, config_dir, tokens)


@pytest.mark.parametrize("identity", ["agent", "gateway"])
@pytest.mark.parametrize("namespace", ["default", SYSTEM_NAMESPACE, "payments"])
def test_can_i_list_is_exactly_the_charts_grants(cluster: Cluster, identity: str,
                                                 namespace: str) -> None:
    expected = {"agent": AGENT_EXPECTED, "gateway": GATEWAY_EXPECTED}[identity]
    resources, url_verbs = cluster.can_i_list(identity, namespace)
    assert resources == expected[namespace], (
        f"more than meant: {sorted(resources - expected[namespace])}; "
        f"missing: {sorted(expected[namespace] - resources)}")
    assert url_verbs == {"get"}, "non-resource URLs: only the discovery reads of every user"


def test_the_agent_cannot_read_secrets_or_write_policies(cluster: Cluster) -> None:
    for args in (("get", "secrets", "-n", SYSTEM_NAMESPACE),
                 ("get", "secrets", "-A"),
                 ("create", "secret", "generic", "stolen", "-n", SYSTEM_NAMESPACE)):
        code, out = cluster.kubectl_as("agent", *args)
        assert forbidden(code, out), (args, out)
    code, out = cluster.kubectl_as("agent", "patch", "egresspolicy", "payments", "--type=merge",
                                   "-p", '{"spec":{"priority":1}}')
    assert forbidden(code, out), out
    code, out = cluster.kubectl_as("agent", "create", "-f", "-", input_text=json.dumps({
        "apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
        "metadata": {"name": "sneaky"}, "spec": {"gateway": "x", "namespaceSelector": {}}}))
    assert forbidden(code, out), out
    # What it does need still works.
    code, out = cluster.kubectl_as("agent", "get", "pods", "-A",
                                   "--field-selector=spec.nodeName=node-1", "-o", "name")
    assert code == 0 and "meshgress-agent-node-1" in out, out


def test_the_gateway_cannot_patch_nodes_and_writes_policies_only_through_status(
        cluster: Cluster) -> None:
    code, out = cluster.kubectl_as("gateway", "annotate", "node", "gw-1", "meshgress.io/x=y")
    assert forbidden(code, out), out
    code, out = cluster.kubectl_as("gateway", "get", "secrets", "-n", SYSTEM_NAMESPACE)
    assert forbidden(code, out), out
    code, out = cluster.kubectl_as("gateway", "patch", "egresspolicy", "payments",
                                   "--type=merge", "-p", '{"spec":{"priority":1}}')
    assert forbidden(code, out), out
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": f"slot-{secrets.token_hex(2)}", "namespace": SYSTEM_NAMESPACE},
             "spec": {"holderIdentity": GATEWAY_1, "leaseDurationSeconds": 2}}
    code, out = cluster.kubectl_as("gateway", "create", "-f", "-", input_text=json.dumps(lease))
    assert code == 0, out
    lease["metadata"]["namespace"] = "default"
    code, out = cluster.kubectl_as("gateway", "create", "-f", "-", input_text=json.dumps(lease))
    assert forbidden(code, out), out


def forbidden(code: int, out: str) -> bool:
    """kubectl's answer to a 403: refused by RBAC or by the admission policy."""
    return code != 0 and "forbidden" in out.lower()


def test_the_agent_changes_only_its_own_nodes_meshgress_annotations(cluster: Cluster) -> None:
    """Through the agent's own datastore calls (a JSON merge patch, no read first)."""
    def annotate(node: str, annotations: dict) -> str | None:
        try:
            cluster.as_component("agent", lambda store: store.patch_annotations(
                Kind.NODE, node, annotations))
        except Forbidden as exc:
            return str(exc)
        return None

    # The policy is enforced once the API server has loaded it: probe until it refuses.
    deadline = time.monotonic() + 30
    while (refused := annotate("node-2", {"meshgress.io/wireguard-endpoint": "192.0.2.9:1"})
           ) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert refused is not None, "the agent changed another node's annotations"
    assert "may change only its own Node (its token is bound to node node-1, not node-2)" \
        in refused
    assert annotate("node-1", {"meshgress.io/wireguard-public-key": "abc=",
                               "meshgress.io/wireguard-endpoint": "192.0.2.11:51820"}) is None
    assert annotate("node-1", {"meshgress.io/wireguard-public-key": None}) is None
    for change in ({"other.example/key": "v"},
                   {"meshgress.io/ok": "1", "other.example/key": "v"}):
        refused = annotate("node-1", change)
        assert refused and "only meshgress.io/ annotations" in refused, (change, refused)
    for patch in ('{"metadata":{"labels":{"stolen":"yes"}}}', '{"spec":{"unschedulable":true}}'):
        code, out = cluster.kubectl_as("agent", "patch", "node", "node-1", "--type=merge",
                                       "-p", patch)
        assert forbidden(code, out), out
    node = json.loads(cluster.plane.kubectl("get", "node", "node-1", "-o", "json").stdout)
    assert node["metadata"]["annotations"] == {
        "meshgress.io/wireguard-endpoint": "192.0.2.11:51820"}
    assert node["metadata"]["labels"] == {"kubernetes.io/hostname": "node-1"}
    assert not node["spec"].get("unschedulable")


def test_the_gateways_own_calls_hold_leases_and_write_status(cluster: Cluster) -> None:
    """What a gateway does on each pass, through the kube backend with its token."""
    slot = f"slot-{secrets.token_hex(2)}"

    def work(store: KubeDatastore) -> None:
        for kind in (Kind.NODE, Kind.POD, Kind.NAMESPACE, Kind.EGRESS_GATEWAY,
                     Kind.EGRESS_POLICY, Kind.LEASE):
            store.list(kind)
        lease = store.acquire_lease(slot, GATEWAY_1, 2.0)
        assert lease.holder == GATEWAY_1
        store.acquire_lease(slot, GATEWAY_1, 2.0)  # renew
        store.patch_annotations(Kind.LEASE, slot, {"meshgress.io/holder-endpoint": "x"},
                                namespace=SYSTEM_NAMESPACE)
        store.release_lease(slot, GATEWAY_1)
        store.patch_status(Kind.EGRESS_POLICY, "payments", {"selectedPods": 3})

    cluster.as_component("gateway", work)
    with pytest.raises(Forbidden):
        cluster.as_component("gateway", lambda store: store.patch_annotations(
            Kind.NODE, "gw-1", {"meshgress.io/x": "y"}))
    with pytest.raises(Forbidden):
        cluster.as_component("agent", lambda store: store.patch_status(
            Kind.EGRESS_POLICY, "payments", {"selectedPods": 7}))
    with pytest.raises(Forbidden):
        cluster.as_component("agent", lambda store: store.acquire_lease(slot, "node-1", 2.0))


# --- gateways hold only their own leases (validatingadmissionpolicy-gateway-leases.yaml) ---


def _micro_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease(cluster: Cluster, name: str) -> dict:
    return json.loads(cluster.plane.kubectl("get", "lease", name, "-n", SYSTEM_NAMESPACE,
                                            "-o", "json").stdout)


def _patch_lease(cluster: Cluster, identity: str, name: str, patch: dict) -> tuple[int, str]:
    return cluster.kubectl_as(identity, "patch", "lease", name, "-n", SYSTEM_NAMESPACE,
                              "--type=merge", "-p", json.dumps(patch))


def _acquire(cluster: Cluster, identity: str, name: str, holder: str, seconds: float) -> None:
    cluster.as_component(identity, lambda store: store.acquire_lease(name, holder, seconds))


def _wait_for_the_lease_policy(cluster: Cluster) -> None:
    """Admission policies take effect once the API server has loaded them: probe with a
    write the policy refuses (a lease naming another holder) until it is refused."""
    deadline = time.monotonic() + 30
    while True:
        probe = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": f"probe-{secrets.token_hex(3)}",
                              "namespace": SYSTEM_NAMESPACE},
                 "spec": {"holderIdentity": GATEWAY_2}}
        code, out = cluster.kubectl_as("gateway", "create", "-f", "-",
                                       input_text=json.dumps(probe))
        if forbidden(code, out):
            return
        assert code == 0, out
        cluster.plane.kubectl("delete", "lease", probe["metadata"]["name"], "-n",
                              SYSTEM_NAMESPACE)
        assert time.monotonic() < deadline, "the lease policy was never enforced"
        time.sleep(0.5)


def test_a_gateway_cannot_write_a_lease_another_gateway_holds(cluster: Cluster) -> None:
    _wait_for_the_lease_policy(cluster)
    slot = f"slot-{secrets.token_hex(2)}"
    _acquire(cluster, "gateway-2", slot, GATEWAY_2, 300.0)
    held = _lease(cluster, slot)

    now = _micro_time(time.time())
    refusals = {
        "take it over before it expires": {"spec": {
            "holderIdentity": GATEWAY_1, "acquireTime": now, "renewTime": now}},
        "rewrite the holder's key": {"metadata": {"annotations": {
            "meshgress.io/wireguard-public-key": "forged="}}},
        "release it": {"spec": {"holderIdentity": None}},
        "renew it for the holder": {"spec": {"renewTime": now}},
    }
    for what, patch in refusals.items():
        code, out = _patch_lease(cluster, "gateway", slot, patch)
        assert forbidden(code, out), (what, out)
        assert f"lease {slot} is held by {GATEWAY_2} and has not expired" in out \
            or "may name only itself" in out, (what, out)
    lease = _lease(cluster, slot)
    assert lease["spec"] == held["spec"]
    assert lease["metadata"].get("annotations") == held["metadata"].get("annotations")
    # The holder itself still renews and publishes.
    _acquire(cluster, "gateway-2", slot, GATEWAY_2, 300.0)
    code, out = _patch_lease(cluster, "gateway-2", slot, {"metadata": {"annotations": {
        "meshgress.io/wireguard-public-key": "own="}}})
    assert code == 0, out


def test_a_gateway_names_only_itself(cluster: Cluster) -> None:
    _wait_for_the_lease_policy(cluster)
    for holder in (GATEWAY_2, "gw-1/7", "node-1"):
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": f"slot-{secrets.token_hex(2)}",
                              "namespace": SYSTEM_NAMESPACE},
                 "spec": {"holderIdentity": holder, "leaseDurationSeconds": 5}}
        code, out = cluster.kubectl_as("gateway", "create", "-f", "-",
                                       input_text=json.dumps(lease))
        assert forbidden(code, out), (holder, out)
        assert f"may name only itself ({GATEWAY_1}) as a lease holder, not {holder}" in out
    with pytest.raises(Forbidden):
        _acquire(cluster, "gateway", f"slot-{secrets.token_hex(2)}", "gw-1/7", 5.0)


def test_a_free_or_expired_lease_is_taken_with_the_takers_own_identity(
        cluster: Cluster) -> None:
    _wait_for_the_lease_policy(cluster)
    expired, released = f"slot-{secrets.token_hex(2)}", f"slot-{secrets.token_hex(2)}"
    _acquire(cluster, "gateway-2", expired, GATEWAY_2, 1.0)
    _acquire(cluster, "gateway-2", released, GATEWAY_2, 300.0)
    cluster.as_component("gateway-2", lambda store: store.release_lease(released, GATEWAY_2))
    assert "holderIdentity" not in _lease(cluster, released)["spec"]

    # A released lease: anybody may take it, under its own name only.
    code, out = _patch_lease(cluster, "gateway", released, {"spec": {
        "holderIdentity": GATEWAY_2}})
    assert forbidden(code, out), out
    _acquire(cluster, "gateway", released, GATEWAY_1, 5.0)
    assert _lease(cluster, released)["spec"]["holderIdentity"] == GATEWAY_1

    # An expired one, by the gateways' own rule (renewTime + duration has passed).
    deadline = time.monotonic() + 10
    while True:
        try:
            taken = cluster.as_component("gateway", lambda store: store.acquire_lease(
                expired, GATEWAY_1, 5.0))
            break
        except LeaseHeld:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert taken.holder == GATEWAY_1 and taken.transitions == 1
    # Now it is gateway 1's: gateway 2 may no longer touch it.
    code, out = _patch_lease(cluster, "gateway-2", expired, {"metadata": {"annotations": {
        "meshgress.io/wireguard-public-key": "late="}}})
    assert forbidden(code, out), out
