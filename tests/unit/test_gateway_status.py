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
    compute_status_events,
    compute_status_updates,
    format_time,
    merge_conditions,
)
from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
)
from meshgress.config import ClusterConfig
from meshgress.datastore import EventRecord, Kind, Lease, ObjectReference
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
                   EGRESS_IP_ANNOTATION: ip, HOLDER_NODE_ANNOTATION: node,
                   HOLDER_ANNOTATION: holder} if published else {}
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
            NO_IP_CONFLICT, WITHIN_SLOT_LIMIT, VALID_SPEC,
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
        "acceptedSpec": {"egressIPs": ["192.0.2.50", "192.0.2.51"]},
    }


NO_IP_CONFLICT = {"type": "EgressIPConflict", "status": "False", "reason": "NoConflict",
                  "message": "", "lastTransitionTime": T_NOW}
WITHIN_SLOT_LIMIT = {"type": "SlotLimitExceeded", "status": "False",
                     "reason": "WithinSlotLimit", "message": "", "lastTransitionTime": T_NOW}
VALID_SPEC = {"type": "InvalidSpec", "status": "False", "reason": "Valid", "message": "",
              "lastTransitionTime": T_NOW}


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
        NO_IP_CONFLICT, WITHIN_SLOT_LIMIT, VALID_SPEC,
    ]
    assert status["slots"] == [
        {"ip": "192.0.2.50", "index": 0, "holder": "gw1/1", "node": None, "publicKey": None,
         "endpoint": None, "ready": False, "since": format_time(NOW - 10)},
        _empty("192.0.2.51", 1),
        _empty("192.0.2.52", 2, format_time(NOW - 1)),
        _empty("192.0.2.53", 3, format_time(NOW - 5)),
    ]


def test_a_newcomer_listing_a_served_ip_is_told_who_serves_it_and_the_holder_stays_ready():
    older = {**gateway("egw", ["192.0.2.50", "192.0.2.99"]),
             "metadata": {"name": "egw", "creationTimestamp": T_EARLIER, "generation": 1}}
    newer = {**gateway("dup", ["192.0.2.99", "192.0.2.60"]),
             "metadata": {"name": "dup", "creationTimestamp": T_NOW, "generation": 1}}
    m = model([older, newer])
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50"),
               SlotId("egw", 1): held("gw2/1", ip="192.0.2.99", node="gw2", port=51901),
               SlotId("dup", 1): held("gw2/1", ip="192.0.2.60", node="gw2", port=51902)}
    status = compute_gateway_status(m.gateways["egw"], older, records, NOW)
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("Ready", "True", "SlotsReady"), ("Degraded", "False", "SlotsReady"),
        ("EgressIPConflict", "False", "NoConflict"),
        ("SlotLimitExceeded", "False", "WithinSlotLimit"), ("InvalidSpec", "False", "Valid")]
    why = (f"egress IP 192.0.2.99 is served by EgressGateway egw, created first ({T_EARLIER}; "
           f"this one: {T_NOW}); this gateway does not serve it")
    dup = compute_gateway_status(m.gateways["dup"], newer, records, NOW)
    assert [(c["type"], c["status"], c["reason"], c["message"])
            for c in dup["conditions"]] == [
        ("Ready", "True", "SlotsReady", "1 of 1 egress IPs are held and published"),
        ("Degraded", "True", "EgressIPConflict", why),
        ("EgressIPConflict", "True", "EgressIPConflict", why),
        ("SlotLimitExceeded", "False", "WithinSlotLimit", ""),
        ("InvalidSpec", "False", "Valid", ""),
    ]
    # Its other IP works; the contested one shows no holder, though egw's holder has it.
    assert dup["slots"][0] == _empty("192.0.2.99", 0)
    assert dup["slots"][1]["holder"] == "gw2/1" and dup["slots"][1]["ready"]


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
            NO_IP_CONFLICT, WITHIN_SLOT_LIMIT,
            {"type": "InvalidSpec", "status": "True", "reason": "Invalid",
             "message": f"generation 7 is invalid: {message}; no earlier valid generation is "
                        "recorded, so nothing of it applies", "lastTransitionTime": T_NOW},
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
         ("Conflict", "False", "NoConflict", ""), ("InvalidSpec", "False", "Valid", "")], 2)),
    ([policy("lost", "nope", "a")], "lost", (
        [("Accepted", "False", "GatewayNotFound",
          "EgressGateway nope does not exist: the traffic of the 2 pods it selects is "
          "dropped until it does"),
         ("Conflict", "False", "NoConflict", ""), ("InvalidSpec", "False", "Valid", "")], 2)),
    ([policy("x", "egw", "a", 5), policy("y", "egw", "a", 5)], "x", (
        [("Accepted", "False", "Conflict", CONFLICT),
         ("Conflict", "True", "Conflict", CONFLICT), ("InvalidSpec", "False", "Valid", "")],
        2)),
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
    assert status["acceptedSpec"] == policies[0]["spec"]


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
            {"type": "InvalidSpec", "status": "True", "reason": "Invalid",
             "message": "generation 9 is invalid: spec.namespaceSelector: required; use {} to "
                        "select every namespace; no earlier valid generation is recorded, so "
                        "nothing of it applies", "lastTransitionTime": T_NOW},
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


TYPO_MESSAGE = 'spec.destinationCIDRs[1]: "10.0.0.0/33" is not a CIDR'


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_a_policy_replaced_by_an_invalid_one_keeps_its_last_valid_generation_in_status():
    gw_obj = gateway("egw", ["192.0.2.50"])
    valid = {**policy("ok", "egw", "a"), "metadata": {"name": "ok", "generation": 3,
                                                      "uid": "u-ok"}}

    def updates(obj: dict[str, Any], now: float = NOW):
        m = model([gw_obj], [obj])
        found = compute_status_updates(m, {"egw": gw_obj}, {"ok": obj}, {}, now)
        events = compute_status_events(found, {"egw": gw_obj}, {"ok": obj},
                                       reporting_instance="gw1/7")
        return found.policies.get("ok"), [e for e in events if e.regarding.name == "ok"]

    first, events = updates(valid)
    assert first is not None and events == []
    assert (first["observedGeneration"], first["acceptedSpec"]) == (3, valid["spec"])
    # Generation 4 has a typo; the status written for generation 3 is stored with it.
    broken = {**valid, "metadata": {**valid["metadata"], "generation": 4},
              "spec": {**valid["spec"], "destinationCIDRs": ["0.0.0.0/0", "10.0.0.0/33"]},
              "status": first}
    second, events = updates(broken, NOW + 5)
    assert second is not None
    assert (second["observedGeneration"], second["acceptedSpec"]) == (3, valid["spec"])
    invalid = (f"generation 4 is invalid: {TYPO_MESSAGE}; generation 3, the last valid one, "
               "still applies")
    assert _conditions(second) == {
        "Accepted": ("True", "LastValidGeneration",
                     "generation 3, the last valid one, applies (2 pods selected): "
                     f"generation 4 is invalid: {TYPO_MESSAGE}"),
        "Conflict": ("False", "NoConflict", ""),
        "InvalidSpec": ("True", "Invalid", invalid)}
    assert second["selectedPods"] == 2
    assert events == [EventRecord(
        regarding=ObjectReference(Kind.EGRESS_POLICY, "ok", "", "u-ok"), reason="InvalidSpec",
        note=invalid, type="Warning", action="Validate",
        reporting_controller="meshgress.io/gateway", reporting_instance="gw1/7")]
    # Written once, it is stable: no further write, no further Event (any process).
    assert updates({**broken, "status": second}, NOW + 60) == (None, [])
    # Fixed: generation 5 applies and is recorded; no Warning.
    fixed = {**valid, "metadata": {**valid["metadata"], "generation": 5},
             "spec": {**valid["spec"], "priority": 7}, "status": second}
    third, events = updates(fixed, NOW + 70)
    assert third is not None and events == []
    assert (third["observedGeneration"], third["acceptedSpec"]) == (5, fixed["spec"])
    assert _conditions(third)["InvalidSpec"] == ("False", "Valid", "")


def test_a_gateway_replaced_by_an_invalid_one_keeps_serving_and_says_why():
    valid = {**gateway("egw", ["192.0.2.50"], generation=2),
             "status": {"observedGeneration": 2, "acceptedSpec": {"egressIPs": ["192.0.2.50"]}}}
    broken = {**valid, "metadata": {"name": "egw", "generation": 3},
              "spec": {"egressIPs": ["192.0.2.50", "192.0.2.300"]}}
    m = model([broken])
    records = {SlotId("egw", 0): held("gw1/1", ip="192.0.2.50")}
    status = compute_gateway_status(m.gateways["egw"], broken, records, NOW)
    invalid = ('generation 3 is invalid: spec.egressIPs[1]: "192.0.2.300" is not an IP '
               "address; generation 2, the last valid one, still applies")
    assert _conditions(status) == {
        "Ready": ("True", "SlotsReady", "1 of 1 egress IPs are held and published"),
        "Degraded": ("True", "InvalidSpec", invalid),
        "EgressIPConflict": ("False", "NoConflict", ""),
        "SlotLimitExceeded": ("False", "WithinSlotLimit", ""),
        "InvalidSpec": ("True", "Invalid", invalid)}
    assert status["observedGeneration"] == 2
    assert status["acceptedSpec"] == {"egressIPs": ["192.0.2.50"]}
    assert [s["ip"] for s in status["slots"]] == ["192.0.2.50"]


def _ips(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{i}" for i in range(1, count + 1)]


def test_a_gateway_whose_ips_get_no_slot_says_so_and_the_older_one_stays_ready():
    """Two gateways of 64 egress IPs: 128 in all, 126 slots. The newer one serves its
    first 62 and names the other two; the older one is untouched."""
    older = {**gateway("egw", _ips("10.1.0", 64)),
             "metadata": {"name": "egw", "creationTimestamp": T_EARLIER, "generation": 1}}
    newer = {**gateway("aa-new", _ips("10.2.0", 64)),
             "metadata": {"name": "aa-new", "creationTimestamp": T_NOW, "generation": 1}}
    m = model([older, newer])
    records = {slot: held("gw1/1", ip=str(ip)) for view in m.gateways.values()
               for slot, ip in view.slots}
    why = ("2 egress IPs get no slot and are not served (10.2.0.63, 10.2.0.64): at most 126 "
           "egress IPs are served across all EgressGateways, given to the gateways created "
           "first (then by name), each in spec order; remove egress IPs from this gateway or "
           "another one")
    status = compute_gateway_status(m.gateways["aa-new"], newer, records, NOW)
    assert [(c["type"], c["status"], c["reason"], c["message"])
            for c in status["conditions"]] == [
        ("Ready", "True", "SlotsReady", "62 of 62 egress IPs are held and published"),
        ("Degraded", "True", "SlotLimitExceeded", why),
        ("EgressIPConflict", "False", "NoConflict", ""),
        ("SlotLimitExceeded", "True", "SlotLimitExceeded", why),
        ("InvalidSpec", "False", "Valid", ""),
    ]
    assert status["slots"][61]["ready"] and status["slots"][62] == _empty("10.2.0.63", 62)
    assert _conditions(compute_gateway_status(m.gateways["egw"], older, records, NOW)) == {
        "Ready": ("True", "SlotsReady", "64 of 64 egress IPs are held and published"),
        "Degraded": ("False", "SlotsReady", ""),
        "EgressIPConflict": ("False", "NoConflict", ""),
        "SlotLimitExceeded": ("False", "WithinSlotLimit", ""),
        "InvalidSpec": ("False", "Valid", "")}
    # The Warning Event comes with the status that first says it.
    updates = compute_status_updates(m, {"egw": older, "aa-new": newer}, {}, records, NOW)
    [event] = compute_status_events(updates, {"egw": older, "aa-new": newer}, {},
                                    reporting_instance="gw1/1")
    assert (event.regarding.name, event.reason, event.type, event.action, event.note) == (
        "aa-new", "SlotLimitExceeded", "Warning", "AssignEgressIPs", why)


def test_a_gateway_with_no_slot_left_at_all_is_not_ready():
    full = {**gateway("full", _ips("10.1.0", 126)),
            "metadata": {"name": "full", "creationTimestamp": T_EARLIER, "generation": 1}}
    late = {**gateway("late", ["192.0.2.50"]),
            "metadata": {"name": "late", "creationTimestamp": T_NOW, "generation": 1}}
    status = compute_gateway_status(model([full, late]).gateways["late"], late, {}, NOW)
    conditions = _conditions(status)
    assert conditions["Ready"][:2] == ("False", "NoServableEgressIPs")
    assert conditions["Ready"][2].startswith(
        "no egress IP can be served: 1 egress IPs get no slot and are not served "
        "(192.0.2.50): at most 126 egress IPs")
    assert conditions["Degraded"][:2] == ("True", "NoServableEgressIPs")
    assert conditions["SlotLimitExceeded"][:2] == ("True", "SlotLimitExceeded")
    assert status["slots"] == [_empty("192.0.2.50", 0)]


@pytest.mark.parametrize(("stored", "events"), [
    (None, ["EgressIPConflict"]),
    ("same", []),
    ("other-message", ["EgressIPConflict"]),
    ("was-false", ["EgressIPConflict"]),
], ids=["first-time", "already-stored", "message-changed", "turned-true"])
def test_a_warning_event_comes_with_each_new_conflict_condition(stored, events):
    older = {**gateway("egw", ["192.0.2.50"]),
             "metadata": {"name": "egw", "creationTimestamp": T_EARLIER}}
    newer = {**gateway("dup", ["192.0.2.50"]),
             "metadata": {"name": "dup", "creationTimestamp": T_NOW, "uid": "u-dup"}}
    m = model([older, newer])
    status = compute_gateway_status(m.gateways["dup"], newer, {}, NOW)
    conflict = next(c for c in status["conditions"] if c["type"] == "EgressIPConflict")
    if stored is not None:
        before = {**conflict, "message": "an older message" if stored == "other-message"
                  else conflict["message"], "status": "False" if stored == "was-false"
                  else "True"}
        newer = {**newer, "status": {"conditions": [before]}}
    found = compute_status_updates(m, {"egw": older, "dup": newer}, {}, {}, NOW)
    recorded = compute_status_events(found, {"egw": older, "dup": newer}, {},
                                     reporting_instance="gw2/1")
    assert [(e.regarding.name, e.reason) for e in recorded if e.reason != "InvalidSpec"] == \
        [("dup", reason) for reason in events]
    for event in recorded:
        assert event.type == "Warning" and "served by EgressGateway egw" in event.note
