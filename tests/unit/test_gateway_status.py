"""EgressGateway and EgressPolicy status (`gateway.status`): exact dicts (pure code)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from gateway.status import (
    Condition,
    SlotRecord,
    compute_gateway_status,
    compute_policy_status,
    compute_status_updates,
    format_time,
    merge_conditions,
)
from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
)
from meshgress.config import ClusterConfig
from meshgress.datastore import Lease
from meshgress.egress import PodView, compute_egress
from meshgress.slots import SlotId

NOW = 1_800_000_000.0
T_NOW = "2027-01-15T08:00:00Z"
T_EARLIER = "2027-01-15T07:59:50Z"
KEY = "H" * 43 + "="
CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("10.96.0.0/12"),))


def gateway(name: str, ips: list[str], generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name, "generation": generation},
            "spec": {"egressIPs": ips, **spec}}


def policy(name: str, gw: str, team: str, priority: int = 1000) -> dict[str, Any]:
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": name, "generation": 3},
            "spec": {"gateway": gw, "priority": priority,
                     "namespaceSelector": {"matchLabels": {"team": team}}}}


PODS = [PodView("ns-a", "p1", {}, "node1", ipaddress.IPv4Address("198.18.1.10")),
        PodView("ns-a", "p2", {}, "node1", ipaddress.IPv4Address("198.18.1.11"))]


def model(gateways, policies=()):
    return compute_egress(gateways=gateways, policies=policies,
                          namespaces={"ns-a": {"team": "a"}}, pods=PODS,
                          node_addresses=[], cluster=CLUSTER)


def held(holder: str, *, ip: str, published: bool = True, renewed: float = NOW - 1,
         node: str = "gw1", port: int = 51900) -> SlotRecord:
    lease = Lease(name="x", holder=holder, duration_seconds=3.0, acquire_time=NOW - 10,
                  renew_time=renewed, transitions=1, resource_version=5)
    annotations = {PUBLIC_KEY_ANNOTATION: KEY, ENDPOINT_ANNOTATION: f"192.0.2.11:{port}",
                   EGRESS_IP_ANNOTATION: ip, HOLDER_NODE_ANNOTATION: node} if published else {}
    return SlotRecord(lease, annotations)


def test_format_time():
    assert format_time(NOW) == T_NOW
    assert format_time(NOW - 10.7) == "2027-01-15T07:59:49Z"


def test_conditions_keep_their_transition_time_while_the_status_stays():
    stored = [{"type": "Ready", "status": "True", "reason": "Old", "message": "",
               "lastTransitionTime": T_EARLIER},
              {"type": "Degraded", "status": "True", "reason": "X", "message": "",
               "lastTransitionTime": T_EARLIER}]
    merged = merge_conditions(stored, [Condition("Ready", True, "SlotsReady", "m"),
                                       Condition("Degraded", False, "SlotsReady", "")], NOW)
    assert merged == [
        {"type": "Ready", "status": "True", "reason": "SlotsReady", "message": "m",
         "lastTransitionTime": T_EARLIER},
        {"type": "Degraded", "status": "False", "reason": "SlotsReady", "message": "",
         "lastTransitionTime": T_NOW},
    ]
    assert merge_conditions("garbage", [Condition("Ready", False, "R", "")], NOW)[0][
        "lastTransitionTime"] == T_NOW


def test_a_gateway_with_every_slot_held_and_published_is_ready():
    m = model([gateway("egw", ["192.0.2.50", "192.0.2.51"], generation=4)])
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50"),
               SlotId("egw", 1): held("gw2/2", ip="192.0.2.51", node="gw2", port=51901)}
    assert compute_gateway_status(m.gateways["egw"], None, records, NOW) == {
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "SlotsReady",
             "message": "2 of 2 egress IPs are held and published",
             "lastTransitionTime": T_NOW},
            {"type": "Degraded", "status": "False", "reason": "SlotsReady", "message": "",
             "lastTransitionTime": T_NOW},
        ],
        "slots": [
            {"ip": "192.0.2.50", "index": 0, "holder": "gw1/1", "node": "gw1",
             "publicKey": KEY, "endpoint": "192.0.2.11:51900", "ready": True,
             "since": format_time(NOW - 10)},
            {"ip": "192.0.2.51", "index": 1, "holder": "gw2/2", "node": "gw2",
             "publicKey": KEY, "endpoint": "192.0.2.11:51901", "ready": True,
             "since": format_time(NOW - 10)},
        ],
        "observedGeneration": 4,
    }


def _empty(ip: str, index: int, since: str | None = None) -> dict[str, Any]:
    return {"ip": ip, "index": index, "holder": None, "node": None, "publicKey": None,
            "endpoint": None, "ready": False, "since": since}


def test_unheld_expired_and_unpublished_slots_degrade_the_gateway():
    m = model([gateway("egw", ["192.0.2.50", "192.0.2.51", "192.0.2.52", "192.0.2.53"])])
    expired = held("gw9/9", ip="192.0.2.52", renewed=NOW - 4)
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50", published=False),
               SlotId("egw", 2): expired,
               SlotId("egw", 3): SlotRecord(Lease("x", None, 3.0, NOW - 20, NOW - 5, 2, 7))}
    status = compute_gateway_status(m.gateways["egw"], None, records, NOW)
    problems = ("192.0.2.50 (slot 0): held by gw1/1, not published yet; "
                "192.0.2.51 (slot 1): no gateway has claimed it yet; "
                f"192.0.2.52 (slot 2): the lease of gw9/9 expired at {format_time(NOW - 1)}; "
                "192.0.2.53 (slot 3): released; no gateway holds it")
    assert status["conditions"] == [
        {"type": "Ready", "status": "False", "reason": "SlotsNotReady",
         "message": "0 of 4 egress IPs are ready: " + problems, "lastTransitionTime": T_NOW},
        {"type": "Degraded", "status": "True", "reason": "SlotsNotReady", "message": problems,
         "lastTransitionTime": T_NOW},
    ]
    assert status["slots"] == [
        {"ip": "192.0.2.50", "index": 0, "holder": "gw1/1", "node": None, "publicKey": None,
         "endpoint": None, "ready": False, "since": format_time(NOW - 10)},
        _empty("192.0.2.51", 1),
        _empty("192.0.2.52", 2, format_time(NOW - 1)),
        _empty("192.0.2.53", 3, format_time(NOW - 5)),
    ]


def test_a_conflicting_egress_ip_is_named_and_degrades_an_otherwise_ready_gateway():
    m = model([gateway("egw", ["192.0.2.50", "192.0.2.99"]), gateway("dup", ["192.0.2.99"])])
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50")}
    status = compute_gateway_status(m.gateways["egw"], None, records, NOW)
    why = ("egress IP 192.0.2.99 is also listed by EgressGateway dup; neither serves it")
    assert [(c["type"], c["status"], c["reason"], c["message"])
            for c in status["conditions"]] == [
        ("Ready", "True", "SlotsReady", "1 of 1 egress IPs are held and published"),
        ("Degraded", "True", "EgressIPConflict", why),
    ]
    assert status["slots"][1] == _empty("192.0.2.99", 1)
    dup = compute_gateway_status(m.gateways["dup"], None, {}, NOW)
    assert [(c["type"], c["status"], c["reason"], c["message"])
            for c in dup["conditions"]] == [
        ("Ready", "False", "NoServableEgressIPs",
         "no egress IP can be served: egress IP 192.0.2.99 is also listed by EgressGateway "
         "egw; neither serves it"),
        ("Degraded", "True", "NoServableEgressIPs",
         "egress IP 192.0.2.99 is also listed by EgressGateway egw; neither serves it"),
    ]
    assert dup["slots"] == [_empty("192.0.2.99", 0)]


def test_an_invalid_gateway_says_why():
    obj = gateway("bad", ["not-an-ip"], generation=7)
    m = model([obj])
    status = compute_gateway_status(m.gateways["bad"], obj, {}, NOW)
    message = 'spec.egressIPs[0]: "not-an-ip" is not an IP address'
    assert status == {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "Invalid", "message": message,
             "lastTransitionTime": T_NOW},
            {"type": "Degraded", "status": "True", "reason": "Invalid", "message": message,
             "lastTransitionTime": T_NOW},
        ],
        "slots": [], "observedGeneration": 7}


def test_an_ipv6_egress_ip_is_reported_as_not_served():
    m = model([gateway("egw", ["2001:db8::1"])])
    status = compute_gateway_status(m.gateways["egw"], None, {}, NOW)
    assert status["conditions"][0]["message"] == (
        "0 of 1 egress IPs are ready: 2001:db8::1 (slot 0): IPv6 egress IPs are not served yet")


CONFLICT = object()
"""Stands for the conflict message compute_egress words (it names the other policy)."""


@pytest.mark.parametrize("policies, name, expected", [
    ([policy("ok", "egw", "a")], "ok", (
        [("Accepted", "True", "Accepted", "2 pods selected"),
         ("Conflict", "False", "NoConflict", "")], 2)),
    ([policy("lost", "nope", "a")], "lost", (
        [("Accepted", "False", "GatewayNotFound", "EgressGateway nope does not exist"),
         ("Conflict", "False", "NoConflict", "")], 2)),
    ([policy("x", "egw", "a", 5), policy("y", "egw", "a", 5)], "x", (
        [("Accepted", "False", "Conflict", CONFLICT),
         ("Conflict", "True", "Conflict", CONFLICT)], 2)),
], ids=["accepted", "gateway-not-found", "conflict"])
def test_policy_status(policies, name, expected):
    m = model([gateway("egw", ["192.0.2.50"])], policies)
    view = m.policies[name]
    status = compute_policy_status(view, None, NOW)
    conditions, selected = expected
    if view.reason == "Conflict":
        assert "y" in view.message and view.conflicts_with == ("y",)
    conditions = [(t, st, r, view.message if m_ is CONFLICT else m_)
                  for t, st, r, m_ in conditions]
    assert [(c["type"], c["status"], c["reason"], c["message"])
            for c in status["conditions"]] == conditions
    assert all(c["lastTransitionTime"] == T_NOW for c in status["conditions"])
    assert status["selectedPods"] == selected
    assert status["observedGeneration"] == 3


def test_an_invalid_policy_is_not_accepted_and_keeps_its_generation():
    obj = {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
           "metadata": {"name": "bad", "generation": 9}, "spec": {"gateway": "egw"}}
    m = model([], [obj])
    status = compute_policy_status(m.policies["bad"], obj, NOW)
    assert status == {
        "conditions": [
            {"type": "Accepted", "status": "False", "reason": "Invalid",
             "message": "spec.namespaceSelector: required; use {} to select every namespace",
             "lastTransitionTime": T_NOW},
            {"type": "Conflict", "status": "False", "reason": "NoConflict", "message": "",
             "lastTransitionTime": T_NOW},
        ],
        "selectedPods": 0, "observedGeneration": 9}


def test_only_statuses_that_differ_from_the_stored_ones_are_updated():
    gw_obj = gateway("egw", ["192.0.2.50"])
    pol_obj = policy("ok", "egw", "a")
    m = model([gw_obj], [pol_obj])
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50")}
    first = compute_status_updates(m, {"egw": gw_obj}, {"ok": pol_obj}, records, NOW)
    assert set(first.gateways) == {"egw"} and set(first.policies) == {"ok"}
    stored_gw = {**gw_obj, "status": first.gateways["egw"]}
    stored_pol = {**pol_obj, "status": first.policies["ok"]}
    # Later, by another process: the lease was renewed meanwhile, nothing else changed,
    # so there is nothing to write (the stored transition times are kept).
    renewed = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50", renewed=NOW + 29)}
    again = compute_status_updates(m, {"egw": stored_gw}, {"ok": stored_pol}, renewed,
                                   NOW + 30)
    assert again.gateways == {} and again.policies == {}
    # The lease expires: only the gateway changes, with a new transition time.
    later = compute_status_updates(m, {"egw": stored_gw}, {"ok": stored_pol}, records,
                                   NOW + 30)
    assert set(later.gateways) == {"egw"} and later.policies == {}
    assert later.gateways["egw"]["conditions"][0]["lastTransitionTime"] == \
        format_time(NOW + 30)
