"""What the gateway serves (`gateway.compute`) and the kernel plan (`gateway.dataplane`),
without a kernel (pure code)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.compute import (
    SlotInfo,
    compute_allowed_sources,
    compute_kept_numbers,
    compute_servable_slots,
    compute_slot_dataplane,
    compute_slot_numbers,
    compute_slot_peers,
)
from gateway.dataplane import (
    DataplanePlan,
    EgressAddress,
    ObservedDataplane,
    RouteEntry,
    RuleEntry,
    plan_dataplane,
)
from meshgress.cluster import NodeInfo
from meshgress.cluster import slot_annotations_to_clear as annotations_to_clear
from meshgress.cluster import slot_lease_annotations as compute_lease_annotations
from meshgress.config import ClusterConfig
from meshgress.egress import PodView, compute_egress
from meshgress.slots import SlotId
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Peer

net = ipaddress.IPv4Network
addr = ipaddress.IPv4Address
CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("10.96.0.0/12"),))
K1, K2, K3 = (public_key(generate_private_key()) for _ in range(3))
GW_PRIVATE = generate_private_key()


def gateway(name, ips, **spec):
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name}, "spec": {"egressIPs": ips, **spec}}


def policy(name, gw, team):
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": name},
            "spec": {"gateway": gw, "namespaceSelector": {"matchLabels": {"team": team}}}}


PODS = [PodView("ns-a", "p1", {}, "n1", addr("198.18.1.10")),
        PodView("ns-a", "p2", {}, "n1", None),
        PodView("ns-b", "p3", {}, "n2", addr("198.18.2.10")),
        PodView("ns-c", "p4", {}, "n2", addr("198.18.2.11"))]


def model(gateways, policies=()):
    return compute_egress(gateways=gateways, policies=policies,
                          namespaces={"ns-a": {"team": "a"}, "ns-b": {"team": "b"},
                                      "ns-c": {"team": "c"}},
                          pods=PODS, node_addresses=[], cluster=CLUSTER)


def node(name, cidrs=("198.18.1.0/24",), key=K1, problems=()):
    return NodeInfo(name=name, pod_cidrs=tuple(net(c) for c in cidrs),
                    internal_ip=addr("192.0.2.1"), public_key=key, endpoint=None,
                    problems=tuple(problems))


def test_servable_slots_follow_the_node_selector_and_skip_ipv6():
    m = model([gateway("egw", ["192.0.2.50", "2001:db8::1"]),
               gateway("eu", ["192.0.2.60"], nodeSelector={"matchLabels": {"zone": "eu"}},
                       interface="ens5"),
               gateway("bad", ["nope"])])
    default_node = compute_servable_slots(m, {"meshgress.io/gateway": "true"})
    assert default_node.slots == (SlotInfo(SlotId("egw", 0), addr("192.0.2.50"), None),)
    assert default_node.skipped == {SlotId("egw", 1): "egress IP 2001:db8::1 is IPv6, which "
                                                      "this gateway does not serve yet"}
    eu_node = compute_servable_slots(m, {"zone": "eu"})
    assert eu_node.slots == (SlotInfo(SlotId("eu", 0), addr("192.0.2.60"), "ens5"),)
    assert compute_servable_slots(m, {}).slots == ()


def test_numbers_cover_every_slot_of_every_valid_gateway():
    m = model([gateway("b", ["192.0.2.51"]), gateway("a", ["192.0.2.50", "192.0.2.52"])])
    assert compute_slot_numbers(m, {}) == {SlotId("a", 0): 0, SlotId("a", 1): 1,
                                           SlotId("b", 0): 2}


def test_a_new_gateway_never_renumbers_the_slots_already_numbered():
    before = compute_slot_numbers(model([gateway("b", ["192.0.2.51", "192.0.2.53"])]), {})
    assert before == {SlotId("b", 0): 0, SlotId("b", 1): 1}
    # "a" sorts first: by position it would take 0 and shift b's slots (and their ports).
    after = compute_slot_numbers(model([gateway("a", ["192.0.2.50"]),
                                        gateway("b", ["192.0.2.51", "192.0.2.53"])]), before)
    assert after == {SlotId("a", 0): 2, SlotId("b", 0): 0, SlotId("b", 1): 1}
    # b/0 goes away: its number is free again, nobody else moves.
    later = compute_slot_numbers(model([gateway("a", ["192.0.2.50"]),
                                        gateway("b", ["192.0.2.51"])]), after)
    assert later == {SlotId("a", 0): 2, SlotId("b", 0): 0}


def test_a_restarted_gateway_keeps_the_ports_it_published_on_its_own_leases():
    records = {
        SlotId("egw", 0): {"meshgress.io/holder-node": "gw1",
                           "meshgress.io/wireguard-endpoint": "192.0.2.11:51904"},
        SlotId("egw", 1): {"meshgress.io/holder-node": "gw2",  # another node's: not ours
                           "meshgress.io/wireguard-endpoint": "192.0.2.12:51901"},
        SlotId("egw", 2): {"meshgress.io/holder-node": "gw1",
                           "meshgress.io/wireguard-endpoint": "192.0.2.11:8080"},  # not ours
        SlotId("egw", 3): {"meshgress.io/holder-node": "gw1",
                           "meshgress.io/wireguard-endpoint": "garbage"},
    }
    assert compute_kept_numbers(records, "gw1") == {SlotId("egw", 0): 4}


def test_allowed_sources_are_the_selected_pods_of_accepted_policies_only():
    m = model([gateway("egw", ["192.0.2.50"]), gateway("other", ["192.0.2.51"])],
              [policy("a", "egw", "a"), policy("b", "egw", "b"), policy("c", "other", "c"),
               policy("lost", "missing", "c")])
    assert compute_allowed_sources(m, PODS) == {
        "egw": (addr("198.18.1.10"), addr("198.18.2.10")),  # p2 has no IP yet
        "other": (addr("198.18.2.11"),),
    }  # the policy naming a missing gateway is not accepted: it allows nothing


def test_one_peer_per_node_with_a_key_endpoint_learnt():
    peers = compute_slot_peers([node("n2", ("198.18.2.0/24",), K2), node("n1")],
                               public_key(GW_PRIVATE))
    assert peers.peers == (Peer(K1, allowed_ips=["198.18.1.0/24"]),
                           Peer(K2, allowed_ips=["198.18.2.0/24"]))
    assert all(p.endpoint is None for p in peers.peers)
    assert peers.names == {K1: "n1", K2: "n2"}
    assert peers.skipped == {}


@pytest.mark.parametrize("nodes, skipped", [
    ([node("n1", key=None)], {"n1": "no public key published yet"}),
    ([node("n1", key=None, problems=("bad key",))], {"n1": "bad key"}),
    ([node("n1", cidrs=())], {"n1": "no IPv4 pod CIDR"}),
    ([node("n1"), node("n2", ("198.18.1.128/25",), K2)],
     {"n1": "pod CIDR 198.18.1.0/24 overlaps n2's 198.18.1.128/25",
      "n2": "pod CIDR 198.18.1.128/25 overlaps n1's 198.18.1.0/24"}),
    ([node("n1"), node("n2", ("198.18.2.0/24",), K1)],
     {"n2": "publishes the same public key as n1"}),
    ([node("n1", key=public_key(GW_PRIVATE))], {"n1": "publishes this device's own public key"}),
], ids=["no-key", "bad-key", "no-cidr", "overlap", "same-key", "own-key"])
def test_nodes_that_cannot_be_peers_are_skipped_with_a_reason(nodes, skipped):
    peers = compute_slot_peers(nodes, public_key(GW_PRIVATE))
    assert peers.skipped == skipped
    assert {peers.names[p.public_key] for p in peers.peers} == \
        {n.name for n in nodes} - set(skipped)


def test_slot_dataplane_and_its_derived_names():
    info = SlotInfo(SlotId("egw", 1), addr("192.0.2.51"), None)
    peers = compute_slot_peers([node("n1")], public_key(GW_PRIVATE))
    s = compute_slot_dataplane(info, number=3, external_interface="eth0", external_mtu=1500,
                               allowed_sources=[addr("198.18.1.11"), addr("198.18.1.10"),
                                                addr("198.18.1.10")],
                               private_key=GW_PRIVATE, peers=peers)
    assert s.interface == SlotId("egw", 1).gateway_interface and s.interface.startswith("mgeg")
    assert s.suffix == s.interface[4:] and len(s.suffix) == 8
    assert (s.mark, s.table) == (0x830000, 51820 + 256 + 3)
    assert s.allowed_sources == (addr("198.18.1.10"), addr("198.18.1.11"))
    assert s.device.listen_port == 51903 and s.device.mtu == 1440
    assert s.device.private_key == GW_PRIVATE and s.device.peers == peers.peers


def test_lease_annotations_and_what_a_new_holder_clears():
    wanted = compute_lease_annotations(holder="gw1/7", public_key=K1,
                                       internal_ip=addr("192.0.2.11"),
                                       egress_ip=addr("192.0.2.51"), node="gw1", number=1)
    assert wanted == {"meshgress.io/wireguard-public-key": K1,
                      "meshgress.io/wireguard-endpoint": "192.0.2.11:51901",
                      "meshgress.io/egress-ip": "192.0.2.51",
                      "meshgress.io/holder-node": "gw1", "meshgress.io/holder": "gw1/7"}
    previous = {"meshgress.io/wireguard-public-key": K2,
                "meshgress.io/wireguard-endpoint": "192.0.2.12:51901",
                "meshgress.io/egress-ip": "192.0.2.51", "meshgress.io/holder-node": "gw2",
                "meshgress.io/holder": "gw2/9", "meshgress.io/lease-duration-seconds": "3.0"}
    assert annotations_to_clear(previous, wanted) == {
        "meshgress.io/wireguard-public-key": None, "meshgress.io/wireguard-endpoint": None,
        "meshgress.io/holder-node": None, "meshgress.io/holder": None}
    assert annotations_to_clear(wanted, wanted) == {}
    assert annotations_to_clear(None, wanted) == {}


# --- the kernel plan ---------------------------------------------------------------------


def slot(index, number, ip="192.0.2.50", external="eth0"):
    info = SlotInfo(SlotId("egw", index), addr(ip), None)
    return compute_slot_dataplane(info, number=number, external_interface=external,
                                  external_mtu=1500, allowed_sources=(),
                                  private_key=GW_PRIVATE,
                                  peers=compute_slot_peers([], public_key(GW_PRIVATE)))


S0, S1 = slot(0, 0), slot(1, 1, "192.0.2.51")


def served(*slots) -> ObservedDataplane:
    return ObservedDataplane(
        egress_addresses=frozenset(EgressAddress(s.external_interface, s.egress_ip)
                                   for s in slots),
        slot_interfaces=frozenset(s.interface for s in slots),
        interface_addresses=frozenset(s.interface for s in slots),
        routes=frozenset(RouteEntry(s.table, s.interface) for s in slots),
        rules=frozenset(RuleEntry(s.mark, s.table) for s in slots),
        rp_filter={s.interface: 2 for s in slots})


def test_a_fresh_slot_gets_everything_in_order():
    # The WireGuard interface exists (applied first); nothing else does yet.
    observed = ObservedDataplane(slot_interfaces=frozenset({S0.interface}),
                                 rp_filter={S0.interface: 0})
    plan = plan_dataplane([S0], observed)
    assert plan == DataplanePlan(
        add_interface_addresses=(S0.interface,), set_rp_filter=(S0.interface,),
        add_routes=(RouteEntry(52076, S0.interface),), add_rules=(RuleEntry(0x800000, 52076),),
        add_addresses=(EgressAddress("eth0", addr("192.0.2.50")),))
    assert plan.describe() == [
        f"+address 169.254.123.1/32 dev {S0.interface}", f"rp_filter 2 on {S0.interface}",
        f"+route default dev {S0.interface} table 52076",
        "+rule fwmark 0x800000/0xff0000 lookup 52076", "+address 192.0.2.50/32 dev eth0"]


def test_what_is_served_plans_nothing():
    assert plan_dataplane([S0, S1], served(S0, S1)).empty


def test_a_slot_no_longer_held_is_fenced_first_and_removed_last():
    plan = plan_dataplane([S1], served(S0, S1))
    assert plan == DataplanePlan(
        remove_addresses=(EgressAddress("eth0", addr("192.0.2.50")),),
        remove_rules=(RuleEntry(0x800000, 52076),), remove_routes=(RouteEntry(52076,
                                                                               S0.interface),),
        remove_interfaces=(S0.interface,))
    # During the adoption grace the interface stays (its rules and routes go).
    kept = plan_dataplane([S1], served(S0, S1), keep_interfaces={S0.interface})
    assert kept.remove_interfaces == () and kept.remove_addresses == plan.remove_addresses


def test_a_number_change_adds_the_new_rule_and_route_before_removing_the_old():
    moved = slot(0, 5)
    plan = plan_dataplane([moved], served(S0))
    assert plan.add_routes == (RouteEntry(52081, S0.interface),)
    assert plan.add_rules == (RuleEntry(0x850000, 52081),)
    assert plan.remove_rules == (RuleEntry(0x800000, 52076),)
    assert plan.remove_routes == (RouteEntry(52076, S0.interface),)
    assert plan.remove_interfaces == () and plan.remove_addresses == ()


def test_a_route_in_a_used_table_is_replaced_never_deleted():
    observed = served(S0)
    stale = ObservedDataplane(**{**observed.__dict__,
                                 "routes": frozenset({RouteEntry(52076, "mgegdeadbeef")})})
    plan = plan_dataplane([S0], stale)
    assert plan.add_routes == (RouteEntry(52076, S0.interface),)
    assert plan.remove_routes == ()


def test_an_egress_ip_moving_to_another_external_interface():
    moved = slot(0, 0, external="ens5")
    plan = plan_dataplane([moved], served(S0))
    assert plan.remove_addresses == (EgressAddress("eth0", addr("192.0.2.50")),)
    assert plan.add_addresses == (EgressAddress("ens5", addr("192.0.2.50")),)
