"""compute_mesh, plan_routes and the status report: table-driven, no root."""

import base64
import ipaddress

import pytest

from meshgress.cluster import ENDPOINT_ANNOTATION, PUBLIC_KEY_ANNOTATION, parse_node
from meshgress.cluster import node_annotations as compute_node_annotations
from meshgress.config import ClusterConfig
from meshgress.datastore import Kind, RejectedObject
from nodeagent.mesh import (
    HANDSHAKE_GRACE,
    HANDSHAKE_JITTER,
    MeshInputs,
    MeshState,
    RouteSpec,
    compute_mesh,
    compute_routes_while_pending,
    handshake_grace,
    is_initiator,
)
from nodeagent.routes import plan_routes
from nodeagent.status import compute_status_report, format_status
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Device, Peer, PeerStats
from wireguard.model import tunnel_mtu as compute_mtu

CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("198.19.0.0/16"),))
KEYS = {name: generate_private_key() for name in ("node1", "node2", "node3", "node4")}
PUB = {name: public_key(k) for name, k in KEYS.items()}


def node(name, cidrs=None, key="default", endpoint="default", ip=None):
    index = int(name[-1])
    annotations = {}
    if key is not None:
        annotations[PUBLIC_KEY_ANNOTATION] = PUB[name] if key == "default" else key
    if endpoint is not None:
        annotations[ENDPOINT_ANNOTATION] = (f"192.0.2.{10 + index}:51820"
                                            if endpoint == "default" else endpoint)
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDRs": cidrs if cidrs is not None else [f"198.18.{index}.0/24"]},
            "status": {"addresses": [{"type": "InternalIP",
                                      "address": ip or f"192.0.2.{10 + index}"}]}}


def net(text):
    return ipaddress.IPv4Network(text)


def route(cidr):
    return RouteSpec(net(cidr), oif="meshgress0")


def mesh(*objs, me="node1"):
    return compute_mesh(MeshInputs(self_name=me, nodes=tuple(parse_node(o) for o in objs),
                                   private_key=KEYS[me], mtu=1440, cluster=CLUSTER))


FALLBACK = RouteSpec(dst=ipaddress.ip_network("198.18.0.0/16"), type="unreachable")


def test_one_peer_per_other_node_with_its_pod_cidrs_and_routes():
    state = mesh(node("node1"), node("node2"), node("node3"))
    assert [(p.public_key, p.endpoint, [str(n) for n in p.allowed_ips])
            for p in state.device.peers] == sorted([
                (PUB["node2"], "192.0.2.12:51820", ["198.18.2.0/24"]),
                (PUB["node3"], "192.0.2.13:51820", ["198.18.3.0/24"])])
    assert state.device.mtu == 1440 and state.device.listen_port == 51820
    assert state.routes == (
        FALLBACK,
        RouteSpec(dst=ipaddress.ip_network("198.18.2.0/24"), oif="meshgress0"),
        RouteSpec(dst=ipaddress.ip_network("198.18.3.0/24"), oif="meshgress0"),
    )
    assert state.skipped == {}


@pytest.mark.parametrize(("other", "reason"), [
    (node("node2", key=None), "no public key published yet"),
    (node("node2", key="not-a-key"),
     "meshgress.io/wireguard-public-key: not a WireGuard public key"),
    (node("node2", endpoint=None), "no endpoint published yet"),
    (node("node2", cidrs=[]), "no IPv4 pod CIDR"),
    (node("node2", key=PUB["node1"]), "publishes this device's own public key"),
    (node("node2", cidrs=["198.18.1.0/24"]),
     "pod CIDR 198.18.1.0/24 overlaps node1's 198.18.1.0/24"),
], ids=["no-key", "bad-key", "no-endpoint", "no-pod-cidr", "own-key", "overlapping-cidr"])
def test_unusable_nodes_are_left_out_with_a_reason_and_fall_to_the_fallback(other, reason):
    state = mesh(node("node1"), other)
    assert state.device.peers == ()
    assert state.skipped == {"node2": reason}
    assert state.routes == (FALLBACK,)


def test_a_key_published_twice_keeps_only_the_first_node():
    state = mesh(node("node1"), node("node2"), node("node3", key=PUB["node2"]))
    assert [p.public_key for p in state.device.peers] == [PUB["node2"]]
    assert state.skipped == {"node3": "publishes the same public key as node2"}


def test_output_does_not_depend_on_input_order():
    objs = [node("node1"), node("node2"), node("node3"), node("node4")]
    assert mesh(*objs) == mesh(*reversed(objs))


def test_mtu_and_annotations():
    assert compute_mtu(1500, underlay_is_ipv6=False) == 1440
    assert compute_mtu(1500, underlay_is_ipv6=True) == 1420
    assert compute_node_annotations(PUB["node1"], "192.0.2.11", 51820) == {
        PUBLIC_KEY_ANNOTATION: PUB["node1"], ENDPOINT_ANNOTATION: "192.0.2.11:51820"}
    assert compute_node_annotations(PUB["node1"], "2001:db8::1", 51820)[
        ENDPOINT_ANNOTATION] == "[2001:db8::1]:51820"


def r(dst, oif="meshgress0"):
    net = ipaddress.ip_network(dst)
    return RouteSpec(dst=net, oif=oif) if oif else RouteSpec(dst=net, type="unreachable")


@pytest.mark.parametrize(("desired", "observed", "add", "remove"), [
    ((r("198.18.2.0/24"),), set(), (r("198.18.2.0/24"),), ()),
    ((r("198.18.2.0/24"),), {r("198.18.2.0/24")}, (), ()),
    ((), {r("198.18.2.0/24")}, (), (r("198.18.2.0/24"),)),
    ((r("198.18.2.0/24", oif=None),), {r("198.18.2.0/24")}, (r("198.18.2.0/24", oif=None),), ()),
    ((r("198.18.3.0/24"),), {r("198.18.2.0/24")}, (r("198.18.3.0/24"),), (r("198.18.2.0/24"),)),
], ids=["missing-added", "present-untouched", "unwanted-removed", "changed-replaced-in-place",
        "moved"])
def test_plan_routes(desired, observed, add, remove):
    plan = plan_routes(desired, frozenset(observed))
    assert (plan.add, plan.remove) == (add, remove)


def test_status_cross_checks_both_ends():
    nodes = [parse_node(o) for o in (node("node1"), node("node2"), node("node3"))]
    stale_key = public_key(generate_private_key())
    device = Device("meshgress0", private_key=KEYS["node1"], listen_port=51820, mtu=1440, peers=[
        Peer(PUB["node2"], endpoint="192.0.2.12:51820", allowed_ips=["198.18.2.0/24"]),
        Peer(stale_key, endpoint="192.0.2.13:51820", allowed_ips=["198.18.3.0/24"]),
    ])
    stats = (PeerStats(PUB["node2"], rx_bytes=10, tx_bytes=20, last_handshake_sec=990,
                       last_handshake_nsec=0),)
    report = compute_status_report("node1", nodes, device, stats=stats, underlay_mtu=1500,
                                   now=1000.0)
    rows = {row.node: row for row in report.peers}
    assert rows["node2"].problems == () and rows["node2"].handshake_age == 10
    assert rows["node3"].problems == ("configured key differs from the published key",)
    assert not report.healthy
    assert report.expected_mtu == 1440 and report.problems == ()


def test_status_reports_a_missing_interface_and_wrong_own_key():
    nodes = [parse_node(node("node1", key=PUB["node2"]))]
    report = compute_status_report("node1", nodes, None, stats=(), underlay_mtu=1500, now=0.0)
    assert report.problems == ("interface meshgress0 does not exist",)
    device = Device("meshgress0", private_key=KEYS["node1"], mtu=1500)
    report = compute_status_report("node1", nodes, device, stats=(), underlay_mtu=1500, now=0.0)
    assert report.problems == (
        "this node publishes a different public key than its interface has",
        "MTU 1500 is above underlay MTU 1500 minus the WireGuard overhead (1440)")


# --- handshakes started from one side of each pair -------------------------------------


def test_exactly_one_side_of_every_pair_initiates():
    keys = [public_key(generate_private_key()) for _ in range(12)]
    for a in keys:
        for b in keys:
            if a != b:
                assert is_initiator(a, b) != is_initiator(b, a)


def test_the_grace_is_short_and_differs_between_pairs():
    # Fixed keys: the jitter has 65,536 steps, so 19 random pairs share one about one
    # run in 400 (harmless for the product: it spreads kicks, it never promised them apart).
    keys = [public_key(base64.b64encode(bytes([i + 1]) * 32).decode()) for i in range(20)]
    graces = {handshake_grace(keys[0], k) for k in keys[1:]}
    assert all(HANDSHAKE_GRACE <= g <= HANDSHAKE_GRACE + HANDSHAKE_JITTER for g in graces)
    assert len(graces) == len(keys) - 1
    assert handshake_grace(keys[0], keys[1]) == handshake_grace(keys[0], keys[1])


def test_pending_peers_routes_are_held_back_as_blackholes():
    a, b = (public_key(generate_private_key()) for _ in range(2))
    mesh = MeshState(
        device=Device("meshgress0"),
        routes=(route("198.18.1.0/24"), route("198.18.2.0/24"),
                RouteSpec(net("198.18.0.0/16"), type="unreachable")),
        peer_routes={a: (route("198.18.1.0/24"),), b: (route("198.18.2.0/24"),)})
    assert compute_routes_while_pending(mesh, frozenset()) == mesh.routes
    held = compute_routes_while_pending(mesh, frozenset({a}))
    assert RouteSpec(net("198.18.1.0/24"), type="blackhole") in held
    assert route("198.18.2.0/24") in held and route("198.18.1.0/24") not in held
    assert RouteSpec(net("198.18.0.0/16"), type="unreachable") in held


def test_status_names_objects_the_datastore_cannot_read_and_fails_for_them():
    nodes = [parse_node(o) for o in (node("node1"), node("node2"))]
    device = Device("meshgress0", private_key=KEYS["node1"], listen_port=51820, mtu=1440,
                    peers=[Peer(PUB["node2"], endpoint="192.0.2.12:51820",
                                allowed_ips=["198.18.2.0/24"])])
    unreadable = RejectedObject(Kind.EGRESS_POLICY, "", "typo", "/store/typo.yaml",
                                "not valid YAML: did not find expected ',' or ']'")
    report = compute_status_report("node1", nodes, device, stats=(), underlay_mtu=1500,
                                   now=0.0, rejected=(unreadable,))
    assert report.mesh_healthy and not report.healthy
    assert report.as_dict()["rejectedObjects"] == [
        {"kind": "EgressPolicy", "namespace": "", "name": "typo", "source": "/store/typo.yaml",
         "reason": "not valid YAML: did not find expected ',' or ']'"}]
    text = format_status(report)
    assert text.startswith("node node1: mesh healthy")
    assert ("  datastore: 1 object(s) cannot be read; every process skips them:\n"
            "    ! EgressPolicy typo (/store/typo.yaml): not valid YAML: did not find "
            "expected ',' or ']'") in text
