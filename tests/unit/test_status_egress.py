"""`meshgress status`, egress part: every slot as this node reaches it — its holder, this
node's tunnel to it against the key the holder publishes, and a probe sent now (pure rows,
then the collection from a datastore and a fake WireGuard backend, with the prober
injected)."""

import ipaddress
import time
from datetime import UTC, datetime

from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    SlotHolder,
)
from meshgress.datastore import LEASE_NAMESPACE
from meshgress.datastore.file import FileDatastore
from meshgress.egress import compute_egress
from meshgress.lab.topology import lab_cluster_config
from meshgress.slots import SlotId
from nodeagent.status import collect_status, compute_slot_rows, format_status
from wireguard.fake import FakeBackend
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Device, Peer, PeerStats

CLUSTER = lab_cluster_config()
NOW = 1_800_000_000.0
S0, S1, S2 = SlotId("egress", 0), SlotId("egress", 1), SlotId("egress", 2)
KEY = {n: public_key(generate_private_key()) for n in ("gw1", "gw2", "stale")}
GATEWAY = {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
           "metadata": {"name": "egress"},
           "spec": {"egressIPs": ["192.0.2.201", "192.0.2.202", "192.0.2.203"]}}


def holder(slot, node):
    return SlotHolder(slot, f"{node}/7", KEY[node], f"192.0.2.10{node[-1]}:5190{slot.index}",
                      f"192.0.2.20{slot.index + 1}", node, acquired=NOW - 60)


def tunnel(slot, key, handshake=NOW - 5):
    device = Device(slot.node_interface, peers=(Peer(key, allowed_ips=["0.0.0.0/0"]),))
    return device, (PeerStats(key, last_handshake_sec=int(handshake)),)


def rows(holders, tunnels, answered, node="node1"):
    model = compute_egress(gateways=[GATEWAY], policies=(), namespaces={}, pods=(),
                           node_addresses=(), cluster=CLUSTER)
    return {(r.gateway, r.index): r for r in compute_slot_rows(
        model, holders, tunnels=tunnels, answered=answered, node_name=node, now=NOW)}


def test_a_slot_that_answers_through_a_tunnel_to_its_holders_key_is_healthy():
    got = rows({S0: holder(S0, "gw1")}, {S0.node_interface: tunnel(S0, KEY["gw1"])}, {S0})
    row = got[("egress", 0)]
    assert (row.holder, row.holder_node, row.answered, row.problems) == (
        "gw1/7", "gw1", True, ())
    assert row.tunnel_key == row.published_key == KEY["gw1"] and row.handshake_age == 5


def test_every_way_a_slot_can_be_unreachable_from_this_node_is_named():
    got = rows({S0: holder(S0, "gw1"), S1: holder(S1, "gw2"), S2: holder(S2, "gw1")},
               {S0.node_interface: tunnel(S0, KEY["stale"]),
                S2.node_interface: tunnel(S2, KEY["gw1"])}, answered={S0})
    assert got[("egress", 0)].problems == (
        f"this node's tunnel has {KEY['stale'][:10]}…, the holder publishes "
        f"{KEY['gw1'][:10]}…",)
    assert got[("egress", 1)].problems == ("this node has no tunnel to it",
                                            "no answer to a probe through the tunnel")
    assert got[("egress", 2)].problems == ("no answer to a probe through the tunnel",)


def test_a_slot_nobody_holds_and_one_held_on_this_node():
    got = rows({S1: holder(S1, "gw1")}, {S1.node_interface: tunnel(S1, KEY["gw1"])},
               answered=set(), node="gw1")
    assert got[("egress", 0)].problems == ("no gateway holds it (its lease is free or "
                                            "expired)",)
    assert got[("egress", 0)].answered is None
    assert got[("egress", 1)].held_here
    assert got[("egress", 1)].problems == (
        "held on this node, but its slot interface or egress IP is missing",)


def lease(slot, node, *, renewed=NOW):
    stamp = datetime.fromtimestamp(renewed, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": slot.lease_name, "namespace": LEASE_NAMESPACE,
                         "annotations": {
                             PUBLIC_KEY_ANNOTATION: KEY[node],
                             ENDPOINT_ANNOTATION: f"192.0.2.10{node[-1]}:51900",
                             EGRESS_IP_ANNOTATION: f"192.0.2.20{slot.index + 1}",
                             HOLDER_NODE_ANNOTATION: node, HOLDER_ANNOTATION: f"{node}/7"}},
            "spec": {"holderIdentity": f"{node}/7", "leaseDurationSeconds": 3600,
                     "acquireTime": stamp, "renewTime": stamp}}


def test_collect_status_probes_the_held_slots_from_the_nodes_probe_address(tmp_path):
    store = FileDatastore(tmp_path / "store")
    try:
        store.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
                      "spec": {"podCIDRs": ["198.18.1.0/24"]},
                      "status": {"addresses": [{"type": "InternalIP",
                                                "address": "192.0.2.11"}]}})
        store.create(GATEWAY)
        store.create(lease(S0, "gw1", renewed=time.time()))
        backend = FakeBackend({S0.node_interface: tunnel(S0, KEY["gw1"])[0]})
        asked = []

        def prober(targets, source):
            asked.append(([(t.slot, t.interface, t.address, t.local) for t in targets], source))
            return {S0}

        report = collect_status("node1", store, backend, lambda _ip: 1500, cluster=CLUSTER,
                                prober=prober)
    finally:
        store.close()
    assert asked == [([(S0, S0.node_interface, ipaddress.IPv4Address("192.0.2.201"), None)],
                      "198.18.1.0")]
    assert [(s.index, s.answered) for s in report.slots] == [(0, True), (1, None), (2, None)]
    assert not report.egress_healthy and not report.healthy  # two slots nobody holds
    text = format_status(report)
    assert "egress: NOT HEALTHY" in text and "gw1/7 on gw1" in text
    assert report.as_dict()["egressSlots"][0]["answered"] is True
