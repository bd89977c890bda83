"""Egress decisions (compute_egress), node steering (compute_steering) and explain: pure."""

import ipaddress

import pytest

from meshgress.cluster import SlotHolder
from meshgress.datastore import Kind, RejectedObject
from meshgress.egress import PodView, compute_egress, ranges_to_cidrs
from meshgress.explain import explain_pod
from meshgress.kernel_ids import WIREGUARD_PORT
from meshgress.lab.topology import lab_cluster_config
from meshgress.slots import (
    DROP_MARK,
    FIXED_UDP_PORTS,
    MAX_SLOTS,
    PROBE_PORT,
    SlotId,
    assign_slot_numbers,
    gateway_port,
    node_slot_port,
    slot_mark,
)
from nodeagent.steering import (
    BUCKETS,
    LocalHolder,
    LocalPod,
    SteeringInputs,
    compute_buckets,
    compute_steering,
    policy_flows_counter,
)
from wireguard.keys import generate_private_key, public_key

CLUSTER = lab_cluster_config()
NODE_IPS = [ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.12")]
NAMESPACES = {"payments": {"team": "payments"}, "web": {"team": "web"}}


def gateway(name="egress", ips=("192.0.2.201", "192.0.2.202"), **spec):
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name}, "spec": {"egressIPs": list(ips), **spec}}


def policy(name, team="payments", gw="egress", priority=None, **spec):
    body = {"gateway": gw, "namespaceSelector": {"matchLabels": {"team": team}}, **spec}
    if priority is not None:
        body["priority"] = priority
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": name, "generation": 3}, "spec": body}


PODS = [PodView("payments", "pay", {"app": "pay"}, "node1", ipaddress.ip_address("198.18.1.1")),
        PodView("web", "web", {"app": "web"}, "node1", ipaddress.ip_address("198.18.1.2"))]


def model(gateways=None, policies=None):
    gateways = gateways if gateways is not None else (gateway(),)
    policies = policies if policies is not None else (policy("payments"),)
    return compute_egress(gateways=gateways, policies=policies, namespaces=NAMESPACES,
                          pods=PODS, node_addresses=NODE_IPS, cluster=CLUSTER)


def test_a_policy_selects_its_namespace_and_always_excludes_cluster_ranges_and_nodes():
    view = model().policies["payments"]
    assert view.accepted and view.reason == "Accepted"
    assert view.selected == (("payments", "pay"),)
    cidrs = ranges_to_cidrs(view.destinations)
    for address in ("198.18.5.5", "198.19.0.10", "192.0.2.11", "192.0.2.12"):
        assert not any(ipaddress.ip_address(address) in c for c in cidrs), address
    assert any(ipaddress.ip_address("192.0.2.254") in c for c in cidrs)


@pytest.mark.parametrize(("policies", "gateways", "expected"), [
    ((policy("p", gw="missing"),), (gateway(),),
     ("GatewayNotFound", "EgressGateway missing does not exist")),
    ((policy("p"),), (gateway(ips=("10.0.0.1/8",)),),
     ("GatewayInvalid", "EgressGateway egress is invalid: spec.egressIPs[0]: ")),
    ((policy("p", destinationCIDRs=["10.0.0.1/8"]),), (gateway(),),
     ("Invalid", "spec.destinationCIDRs[0]: ")),
], ids=["unknown-gateway", "invalid-gateway", "invalid-policy"])
def test_unusable_policies_are_not_accepted_with_a_reason(policies, gateways, expected):
    view = model(gateways=gateways, policies=policies).policies["p"]
    assert not view.accepted
    assert (view.reason, view.message[:len(expected[1])]) == expected


def test_equal_priority_overlap_is_a_conflict_naming_both_and_neither_applies():
    views = model(policies=(policy("a"), policy("b"), policy("c", team="web"))).policies
    assert (views["a"].reason, views["a"].conflicts_with) == ("Conflict", ("b",))
    assert (views["b"].reason, views["b"].conflicts_with) == ("Conflict", ("a",))
    assert "shared with b" in views["a"].message
    assert views["c"].accepted


def test_different_priorities_or_disjoint_destinations_do_not_conflict():
    views = model(policies=(policy("a", priority=10), policy("b", priority=20))).policies
    assert views["a"].accepted and views["b"].accepted
    views = model(policies=(policy("a", destinationCIDRs=["203.0.113.0/24"]),
                            policy("b", destinationCIDRs=["198.51.100.0/24"]))).policies
    assert views["a"].accepted and views["b"].accepted


T0, T1 = "2027-01-15T08:00:00Z", "2027-01-15T08:00:01Z"


def created(obj, when):
    """`obj` as the datastore returns it: with its creationTimestamp (None: without)."""
    if when is not None:
        obj["metadata"]["creationTimestamp"] = when
    return obj


def served(m, name):
    return [str(ip) for _, ip in m.gateways[name].slots]


@pytest.mark.parametrize(("egress_at", "other", "other_at", "owner"), [
    (T0, "other", T1, "egress"),  # the newcomer is created later
    (T0, "aa-newer", T1, "egress"),  # ... and its name sorts first: age still wins
    (T1, "aa-older", T0, "aa-older"),  # the older one wins whatever the names
    (T0, "other", T0, "egress"),  # equal timestamps: the name that sorts first
    (T0, "aa-same", T0, "aa-same"),
    (T0, "other", None, "egress"),  # no creationTimestamp counts as the newest
    (None, "other", T0, "other"),
    (None, "other", None, "egress"),  # neither has one: by name
], ids=["newcomer-later", "newcomer-later-name-first", "older-wins", "same-time-by-name",
        "same-time-by-name-reversed", "newcomer-without-timestamp", "holder-without-timestamp",
        "no-timestamps-by-name"])
def test_a_contested_egress_ip_stays_with_the_gateway_created_first(egress_at, other, other_at,
                                                                    owner):
    gateways = [created(gateway(), egress_at),
                created(gateway(other, ips=("192.0.2.202", "192.0.2.203")), other_at)]
    for order in (gateways, gateways[::-1]):  # every process decides the same, in any order
        m = model(gateways=order)
        loser = other if owner == "egress" else "egress"
        assert "192.0.2.202" in served(m, owner)
        assert "192.0.2.202" not in served(m, loser)
        # The loser keeps serving its other IP, and says who serves the contested one.
        assert served(m, loser) == (["192.0.2.201"] if loser == "egress" else ["192.0.2.203"])
        assert m.gateways[loser].ip_conflicts == {"192.0.2.202": owner}
        assert m.gateways[owner].ip_conflicts == {} and m.gateways[owner].disabled_ips == {}
        why = m.gateways[loser].disabled_ips["192.0.2.202"]
        assert why.startswith(f"egress IP 192.0.2.202 is served by EgressGateway {owner}, ")
        if egress_at is not None and egress_at == other_at:
            assert "created at the same time (2027-01-15T08:00:00Z) and named first" in why


def test_slots_keep_their_index_in_the_spec_when_an_ip_is_served_elsewhere():
    m = model(gateways=(created(gateway(), T0),
                        created(gateway("other", ips=("192.0.2.201", "192.0.2.203")), T1)))
    assert [(slot.index, str(ip)) for slot, ip in m.gateways["other"].slots] == \
        [(1, "192.0.2.203")]


def ips(prefix, count):
    return tuple(f"{prefix}.{i}" for i in range(1, count + 1))


@pytest.mark.parametrize(("old_name", "new_name", "old_at", "new_at"), [
    ("zz-old", "aa-new", T0, T1),  # the newcomer's name sorts first: age still wins
    ("aa-old", "zz-new", T0, T0),  # created at the same time: by name
    ("aa-old", "zz-new", T0, None),  # no creationTimestamp counts as the newest
], ids=["older-first", "same-time-by-name", "newcomer-without-timestamp"])
def test_the_cluster_has_at_most_max_slots_and_the_gateways_created_first_keep_theirs(
        old_name, new_name, old_at, new_at):
    """The API caps each gateway at 126 egress IPs, not their sum: two valid gateways of
    64 make 128, and the newer one's last two get no slot."""
    old = created(gateway(old_name, ips=ips("10.1.0", 64)), old_at)
    new = created(gateway(new_name, ips=ips("10.2.0", 64)), new_at)
    for order in ([old, new], [new, old]):  # every process decides the same, in any order
        m = model(gateways=order)
        assert served(m, old_name) == list(ips("10.1.0", 64))
        assert served(m, new_name) == list(ips("10.2.0", 62))
        assert [slot.index for slot, _ in m.gateways[new_name].slots] == list(range(62))
        assert m.gateways[old_name].over_slot_limit == ()
        assert m.gateways[new_name].over_slot_limit == ("10.2.0.63", "10.2.0.64")
        assert m.over_slot_limit() == {new_name: ("10.2.0.63", "10.2.0.64")}
        assert m.gateways[new_name].disabled_ips["10.2.0.64"] == (
            "egress IP 10.2.0.64 gets no slot: at most 126 egress IPs are served across all "
            "EgressGateways, given to the gateways created first (then by name), each in "
            "spec order, and none is left for it")
        assert m.gateways[new_name].ip_conflicts == {}
        # Every slot numbers: what failed every agent pass and every gateway claim.
        slots = [slot for view in m.gateways.values() for slot, _ in view.slots]
        assert len(slots) == MAX_SLOTS
        assert sorted(assign_slot_numbers(slots, {}).values()) == list(range(MAX_SLOTS))


def test_a_newcomer_never_takes_a_slot_and_ips_served_elsewhere_do_not_count():
    full = created(gateway("full", ips=(*ips("10.1.0", 125), "192.0.2.201")), T0)
    newer = created(gateway("newer", ips=("192.0.2.201", "192.0.2.210", "192.0.2.211")), T1)
    m = model(gateways=(full, newer))
    assert len(served(m, "full")) == MAX_SLOTS
    assert served(m, "newer") == []
    assert m.gateways["newer"].ip_conflicts == {"192.0.2.201": "full"}
    assert m.gateways["newer"].over_slot_limit == ("192.0.2.210", "192.0.2.211")
    # One slot left: the newer gateway's first IP takes it, in spec order.
    m = model(gateways=(created(gateway("full", ips=ips("10.1.0", 125)), T0), newer))
    assert served(m, "newer") == ["192.0.2.201"]
    assert m.gateways["newer"].over_slot_limit == ("192.0.2.210", "192.0.2.211")
    # An invalid gateway has no slots, and takes none.
    m = model(gateways=(created(gateway("broken", ips=("not-an-ip",)), T0),
                        created(gateway("full", ips=ips("10.1.0", 126)), T1)))
    assert len(served(m, "full")) == MAX_SLOTS and m.over_slot_limit() == {}


def test_explain_says_why_an_egress_ip_over_the_slot_limit_is_not_served():
    m = model(gateways=(created(gateway("other", ips=ips("10.1.0", 126)), T0),
                        created(gateway(), T1)))
    pod = {"metadata": {"namespace": "payments", "name": "pay", "labels": {"app": "pay"}},
           "spec": {"nodeName": "node1"}, "status": {"podIP": "198.18.1.1"}}
    lines = explain_pod(model=m, pod=pod, namespace_labels_=NAMESPACES["payments"],
                        holders={}, cluster=CLUSTER, node_addresses=set(), to=None)
    assert "  egress IP 192.0.2.201 is not served: egress IP 192.0.2.201 gets no slot: at " \
        "most 126 egress IPs are served across all EgressGateways, given to the gateways " \
        "created first (then by name), each in spec order, and none is left for it" in lines
    assert "  no slot is held: this traffic is dropped" in lines


def invalid_now(obj, generation=4, accepted=None, observed=3, **broken):
    """`obj` replaced by an invalid generation; `accepted`: the spec its status recorded
    as the last valid one (at generation `observed`)."""
    obj = {**obj, "metadata": {**obj["metadata"], "generation": generation},
           "spec": {**obj["spec"], **broken}}
    if accepted is not None:
        obj["status"] = {"observedGeneration": observed, "acceptedSpec": accepted}
    return obj


VALID = policy("payments")
TYPO = dict(destinationCIDRs=["0.0.0.0/0", "10.0.0.0/33"])
TYPO_MESSAGE = 'spec.destinationCIDRs[1]: "10.0.0.0/33" is not a CIDR'


@pytest.mark.parametrize(("obj", "applied_generation"), [
    (invalid_now(VALID, accepted=VALID["spec"], **TYPO), 3),
    (invalid_now(VALID, **TYPO), None),  # never recorded valid: nothing to fall back to
    (invalid_now(VALID, accepted={"gateway": 7}, **TYPO), None),  # recorded garbage
    (invalid_now(VALID, accepted=VALID["spec"], observed=None, **TYPO), None),
    (invalid_now(VALID, accepted=VALID["spec"], observed=True, **TYPO), None),
    (invalid_now(VALID, accepted=VALID["spec"], observed=5, **TYPO), None),  # from the future
    (invalid_now(VALID, accepted=VALID["spec"], observed=0, **TYPO), None),
], ids=["last-valid-recorded", "nothing-recorded", "recorded-spec-invalid",
        "no-observed-generation", "observed-generation-not-an-int", "observed-after-current",
        "observed-zero"])
def test_an_invalid_policy_applies_its_last_valid_generation_when_one_is_recorded(
        obj, applied_generation):
    view = model(policies=(obj,)).policies["payments"]
    assert view.rejected == TYPO_MESSAGE and view.current_generation == 4
    if applied_generation is None:
        assert (view.policy, view.accepted, view.reason) == (None, False, "Invalid")
        assert view.message == TYPO_MESSAGE and view.spec is None
        assert not view.on_last_valid_generation
        return
    assert view.accepted and view.reason == "LastValidGeneration"
    assert view.on_last_valid_generation and view.generation == applied_generation
    assert view.message == ("generation 3, the last valid one, applies (1 pods selected): "
                            f"generation 4 is invalid: {TYPO_MESSAGE}")
    assert view.selected == (("payments", "pay"),) and view.spec == VALID["spec"]
    # Exactly what the last valid generation selects and steers, not a blend.
    assert view.destinations == model().policies["payments"].destinations


def test_a_valid_current_generation_wins_over_the_recorded_one():
    narrow = {**VALID, "spec": {**VALID["spec"], "destinationCIDRs": ["203.0.113.0/24"]},
              "status": {"observedGeneration": 2, "acceptedSpec": VALID["spec"]}}
    view = model(policies=(narrow,)).policies["payments"]
    assert view.reason == "Accepted" and view.rejected is None
    assert view.spec == narrow["spec"] and view.generation == 3
    assert ranges_to_cidrs(view.destinations) == (ipaddress.ip_network("203.0.113.0/24"),)


def test_an_invalid_gateway_keeps_serving_its_last_valid_generation():
    good = gateway()
    good["metadata"]["generation"] = 2
    broken = invalid_now(good, generation=3, accepted=good["spec"], observed=2,
                         egressIPs=["192.0.2.201", "not-an-ip"])
    m = model(gateways=(broken,))
    view = m.gateways["egress"]
    assert view.on_last_valid_generation and view.gateway is not None
    assert view.gateway.generation == 2 and view.current_generation == 3
    assert view.error == 'spec.egressIPs[1]: "not-an-ip" is not an IP address'
    assert served(m, "egress") == ["192.0.2.201", "192.0.2.202"]
    assert m.policies["payments"].accepted  # policies naming it keep working
    # Without a recorded valid generation it is unusable, and so are its policies.
    m = model(gateways=(invalid_now(good, generation=3, egressIPs=["not-an-ip"]),))
    assert m.gateways["egress"].gateway is None and m.gateways["egress"].slots == ()
    assert m.policies["payments"].reason == "GatewayInvalid"


def test_a_gateway_on_its_last_valid_generation_keeps_its_ips_against_a_newcomer():
    good = created(gateway(), T0)
    broken = invalid_now(good, accepted=good["spec"], failurePolicy="Sometimes")
    m = model(gateways=(broken, created(gateway("newcomer", ips=("192.0.2.202",)), T1)))
    assert served(m, "egress") == ["192.0.2.201", "192.0.2.202"]
    assert served(m, "newcomer") == [] and m.gateways["newcomer"].ip_conflicts == {
        "192.0.2.202": "egress"}


SLOTS = [SlotId("egress", 0), SlotId("egress", 1)]
MARKS = {SLOTS[0]: slot_mark(0), SLOTS[1]: slot_mark(1)}


def test_buckets_spread_over_slots_and_a_failure_moves_only_its_own_buckets():
    both = compute_buckets(SLOTS, frozenset(SLOTS), MARKS)
    assert len(both) == BUCKETS and set(both) == {slot_mark(0), slot_mark(1)}
    one = compute_buckets(SLOTS, frozenset({SLOTS[0]}), MARKS)
    assert set(one) == {slot_mark(0)}
    moved = [b for b in range(BUCKETS) if both[b] != one[b]]
    assert all(both[b] == slot_mark(1) for b in moved)
    assert compute_buckets(SLOTS, frozenset(), MARKS) is None


def steering(healthy, failure_policy="FailClosed", kept=None, node_name="", held=SLOTS):
    key = generate_private_key()
    holders = {slot: SlotHolder(slot, f"gw{slot.index + 1}/1", public_key(generate_private_key()),
                                f"192.0.2.10{slot.index + 1}:5190{slot.index}",
                                f"192.0.2.20{slot.index + 1}", f"gw{slot.index + 1}")
               for slot in held}
    m = model(gateways=(gateway(failurePolicy=failure_policy),))
    return compute_steering(SteeringInputs(
        model=m, local_pods=(LocalPod("payments", "pay", ipaddress.ip_address("198.18.1.1")),
                             LocalPod("web", "web", ipaddress.ip_address("198.18.1.2"))),
        holders=holders, healthy=frozenset(healthy), private_key=key, mtu=1440,
        probe_source=ipaddress.ip_address("198.18.1.0"), kept_numbers=kept or {},
        node_name=node_name))


def test_a_slot_held_on_this_very_node_is_checked_locally_not_probed():
    remote = {t.slot: t.local for t in steering(SLOTS, node_name="node1").probe_targets}
    assert remote == {SLOTS[0]: None, SLOTS[1]: None}
    on_gw1 = {t.slot: t.local for t in steering(SLOTS, node_name="gw1").probe_targets}
    assert on_gw1 == {SLOTS[0]: LocalHolder(SLOTS[0].gateway_interface,
                                            ipaddress.IPv4Address("192.0.2.201")),
                      SLOTS[1]: None}


def test_steering_marks_only_selected_local_pods_with_tunnels_tables_and_rules():
    state = steering(SLOTS)
    assert [d.name for d in state.devices] == [s.node_interface for s in SLOTS]
    assert all(str(p.allowed_ips[0]) == "0.0.0.0/0" for d in state.devices for p in d.peers)
    sets = {s.name: s.elements for s in state.sets}
    assert sets["ep0_pods"] == (ipaddress.ip_address("198.18.1.1"),)
    assert set(sets["egress_healthy"]) == {slot_mark(0), slot_mark(1)}
    assert (DROP_MARK, 51820) in state.rules and (slot_mark(0), 51821) in state.rules
    assert (51821, SLOTS[0].node_interface) in state.routes and (51820, None) in state.routes
    # Behind each slot's tunnel route, a blackhole: its marks never reach the main table.
    assert {(51821, None), (51822, None)} <= set(state.routes)


def test_a_nodes_slot_tunnels_listen_on_fixed_ports_of_their_own():
    """Never port 0: a random port may be one a gateway on the same node needs next
    (PROBE_PORT or a slot's port), and a tunnel keeps its port for as long as it lives."""
    state = steering(SLOTS, kept={SLOTS[0]: 7})
    ports = {d.name: d.listen_port for d in state.devices}
    assert ports == {SLOTS[0].node_interface: node_slot_port(7),
                     SLOTS[1].node_interface: node_slot_port(0)}
    assert set(ports.values()) <= FIXED_UDP_PORTS
    gateways = {gateway_port(n) for n in range(MAX_SLOTS)}
    assert not gateways & {node_slot_port(n) for n in range(MAX_SLOTS)}
    assert PROBE_PORT not in gateways and WIREGUARD_PORT not in gateways


def test_a_slot_without_a_holder_keeps_its_tunnel_without_a_peer_or_a_route_to_it():
    """A takeover then changes a peer in place instead of starting a tunnel."""
    state = steering(healthy=(), held=SLOTS[:1])
    assert [(d.name, len(d.peers)) for d in state.devices] == [
        (SLOTS[0].node_interface, 1), (SLOTS[1].node_interface, 0)]
    assert all(mark != slot_mark(1) for mark, _ in state.rules)
    assert all(interface != SLOTS[1].node_interface for _, interface in state.routes)
    assert (51822, None) not in state.routes
    assert [t.slot for t in state.probe_targets] == [SLOTS[0]]


@pytest.mark.parametrize(("failure_policy", "mark"), [("FailClosed", DROP_MARK),
                                                      ("FailOpen", 0)])
def test_with_no_healthy_slot_fail_closed_drops_and_fail_open_leaves_unmarked(failure_policy,
                                                                               mark):
    state = steering((), failure_policy)
    assert set(state.buckets["egress"]) == {mark}


def test_slot_numbers_are_kept_so_marks_and_tables_never_move_under_flows():
    assert steering(SLOTS).numbers == {SLOTS[0]: 0, SLOTS[1]: 1}
    # Read back from the kernel: egress/1 has number 7 there. It keeps it (its mark and
    # table, and so the conntrack marks of its flows); egress/0 keeps 0.
    state = steering(SLOTS, kept={SLOTS[1]: 7, SLOTS[0]: 0})
    assert state.numbers == {SLOTS[0]: 0, SLOTS[1]: 7}
    assert (slot_mark(7), 51828) in state.rules and (51828, SLOTS[1].node_interface) \
        in state.routes
    healthy = {s.name: s.elements for s in state.sets}["egress_healthy"]
    assert set(healthy) == {slot_mark(0), slot_mark(7)}


def test_each_slot_counts_the_flows_steered_into_it_and_policies_count_local_pods():
    state = steering(SLOTS, kept={SLOTS[1]: 7, SLOTS[0]: 0})
    policy_counter = policy_flows_counter("payments")
    assert [c.name for c in state.counters] == ["egress_flows_0", "egress_flows_7",
                                                policy_counter]
    steer = {c.name: c for c in state.chains}["egress_steer"]
    assert {"counter": policy_counter} in steer.rules[-1].statements
    pick = {c.name: c for c in state.chains}["ep0_pick"]
    counted = [r.statements for r in pick.rules[1:]]
    assert counted == [[{"match": {"op": "==", "left": {"meta": {"key": "mark"}},
                                   "right": slot_mark(n)}}, {"counter": f"egress_flows_{n}"}]
                       for n in (0, 7)]
    assert state.selected_pods == {"payments": 1}


def test_node_addresses_are_one_shared_set_not_carved_out_of_every_policy():
    """5,000 nodes: the always-excluded set holds one element per node address (plus the
    cluster ranges) and a policy's own set stays 0.0.0.0/0 — never "everything except
    5,000 addresses", which would be tens of thousands of prefixes per policy."""
    nodes = [ipaddress.ip_address(0x0A000000 + 3 * i + 1) for i in range(5000)]  # 10.0.x.x
    m = compute_egress(gateways=[gateway()], policies=[policy("payments")],
                       namespaces=NAMESPACES, pods=PODS, node_addresses=nodes,
                       cluster=CLUSTER)
    view = m.policies["payments"]
    assert view.requested == ((0, 2**32 - 1),)
    assert not any(lo <= int(nodes[7]) <= hi for lo, hi in view.destinations)
    key = generate_private_key()
    state = compute_steering(SteeringInputs(
        model=m, local_pods=(LocalPod("payments", "pay", ipaddress.ip_address("198.18.1.1")),),
        holders={}, healthy=frozenset(), private_key=key, mtu=1440,
        probe_source=ipaddress.ip_address("198.18.1.0")))
    sets = {s.name: s.elements for s in state.sets}
    assert [str(n) for n in sets["ep0_dst"]] == ["0.0.0.0/0"]
    # the nodes, and the lab's pod and service ranges (adjacent: one /15)
    assert len(sets["egress_never"]) == 5000 + 1
    steer = {c.name: c for c in state.chains}["egress_steer"]
    assert {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": "@egress_never"}} in steer.rules[-1].statements


@pytest.mark.parametrize(("slots", "kept", "expected"), [
    ([], {}, {}),
    ([SlotId("b", 0), SlotId("a", 0)], {}, {SlotId("a", 0): 0, SlotId("b", 0): 1}),
    # kept numbers win; new slots take the lowest free number in sorted order
    ([SlotId("a", 0), SlotId("b", 0), SlotId("c", 0)], {SlotId("b", 0): 0},
     {SlotId("a", 0): 1, SlotId("b", 0): 0, SlotId("c", 0): 2}),
    # two slots claiming one number (stale input): the first in sorted order keeps it
    ([SlotId("a", 0), SlotId("b", 0)], {SlotId("a", 0): 3, SlotId("b", 0): 3},
     {SlotId("a", 0): 3, SlotId("b", 0): 0}),
    # out-of-range numbers are not kept; kept slots that are gone free their number
    ([SlotId("a", 0)], {SlotId("a", 0): 126, SlotId("z", 0): 0}, {SlotId("a", 0): 0}),
])
def test_assign_slot_numbers(slots, kept, expected):
    assert assign_slot_numbers(slots, kept) == expected


def test_more_slots_than_numbers_is_an_error():
    with pytest.raises(ValueError, match="at most 126"):
        assign_slot_numbers([SlotId("g", i) for i in range(127)], {})


def test_explain_names_the_applied_policy_the_loser_and_the_excluded_range():
    m = model(policies=(policy("first", priority=10, excludedCIDRs=["203.0.113.0/24"]),
                        policy("second", priority=20)))
    pod = {"metadata": {"namespace": "payments", "name": "pay", "labels": {"app": "pay"}},
           "spec": {"nodeName": "node1"}, "status": {"podIP": "198.18.1.1"}}
    holders = {SLOTS[0]: SlotHolder(SLOTS[0], "gw1/1", "k", "192.0.2.101:51900",
                                    "192.0.2.201", "gw1")}
    common = dict(model=m, pod=pod, namespace_labels_=NAMESPACES["payments"], holders=holders,
                  cluster=CLUSTER, node_addresses={"192.0.2.11"})
    text = "\n".join(explain_pod(**common, to=ipaddress.ip_address("192.0.2.254")))
    assert "first (priority 10, gateway egress): selects this pod -> APPLIES for 192.0.2.254" \
        in text
    assert "second (priority 20, gateway egress): selects this pod, but first comes first" in text
    assert "slot 0: egress IP 192.0.2.201, held by gw1/1 on gw1" in text
    assert "slot 1: egress IP 192.0.2.202, NOT HELD" in text
    text = "\n".join(explain_pod(**common, to=ipaddress.ip_address("203.0.113.9")))
    assert "first (priority 10, gateway egress): selects this pod, but not for 203.0.113.9: " \
           "excluded by its excludedCIDRs entry 203.0.113.0/24" in text
    text = "\n".join(explain_pod(**common, to=ipaddress.ip_address("198.18.2.1")))
    assert "always excluded: the cluster pod range 198.18.0.0/16" in text
    assert "is not steered" in text


def test_explain_says_when_a_policy_or_gateway_runs_on_its_last_valid_generation():
    good = gateway()
    good["metadata"]["generation"] = 2
    m = model(gateways=(invalid_now(good, generation=3, accepted=good["spec"], observed=2,
                                    egressIPs=[]),),
              policies=(invalid_now(VALID, accepted=VALID["spec"], **TYPO),))
    pod = {"metadata": {"namespace": "payments", "name": "pay", "labels": {"app": "pay"}},
           "spec": {"nodeName": "node1"}, "status": {"podIP": "198.18.1.1"}}
    unreadable = RejectedObject(Kind.EGRESS_POLICY, "", "broken", "/store/broken.yaml",
                                "not valid YAML: ...")
    text = "\n".join(explain_pod(model=m, pod=pod, namespace_labels_=NAMESPACES["payments"],
                                 holders={}, cluster=CLUSTER, node_addresses=set(),
                                 to=ipaddress.ip_address("192.0.2.254"),
                                 rejected=[unreadable]))
    assert ("payments (priority 1000, gateway egress; runs on generation 3, its last valid "
            f"one: generation 4 is invalid: {TYPO_MESSAGE}): selects this pod -> APPLIES") in text
    assert ("EgressGateway egress runs on generation 2, its last valid one: generation 3 is "
            "invalid: spec.egressIPs: must list at least one IP address") in text
    assert "left out, the datastore cannot read it: EgressPolicy broken (/store/broken.yaml): " \
           "not valid YAML: ..." in text


@pytest.mark.parametrize("gateways", [(gateway(name="other"),),
                                      (gateway(ips=("10.0.0.1/8",)),)],
                         ids=["gateway-not-found", "gateway-invalid"])
def test_a_policy_whose_gateway_is_missing_or_invalid_drops_its_pods_traffic(gateways):
    """A typo in the gateway's name must not let selected pods leave with their node's
    address: until the gateway exists (and is valid), their traffic is dropped."""
    m = model(gateways=gateways, policies=(policy("payments"),))
    assert m.policies["payments"].drops_selected
    state = compute_steering(SteeringInputs(
        model=m, local_pods=(LocalPod("payments", "pay", ipaddress.ip_address("198.18.1.1")),
                             LocalPod("web", "web", ipaddress.ip_address("198.18.1.2"))),
        holders={}, healthy=frozenset(), private_key=generate_private_key(), mtu=1440,
        probe_source=ipaddress.ip_address("198.18.1.0")))
    sets = {s.name: s.elements for s in state.sets}
    assert sets["ep0_pods"] == (ipaddress.ip_address("198.18.1.1"),)
    assert state.steered_ips == {ipaddress.ip_address("198.18.1.1")}
    pick = next(c for c in state.chains if c.name == "ep0_pick")
    assert {m for _, m in pick.rules[0].statements[0]["mangle"]["value"]["map"]["data"]["set"]} \
        == {DROP_MARK}


def test_explain_says_a_policy_with_a_missing_gateway_drops_the_pods_traffic():
    m = model(gateways=(), policies=(policy("payments", gw="egres"),))
    pod = {"metadata": {"namespace": "payments", "name": "pay", "labels": {"app": "pay"}},
           "spec": {"nodeName": "node1"}, "status": {"podIP": "198.18.1.1"}}
    text = "\n".join(explain_pod(model=m, pod=pod, namespace_labels_=NAMESPACES["payments"],
                                 holders={}, cluster=CLUSTER, node_addresses=set(), to=None))
    assert "payments (priority 1000, gateway egres): selects this pod -> DROPS its traffic: " \
           "GatewayNotFound: EgressGateway egres does not exist" in text
    assert "verdict: traffic to outside the cluster is dropped (fail closed) until " \
           "EgressGateway egres exists and is valid" in text
