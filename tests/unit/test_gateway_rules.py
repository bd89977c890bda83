"""The gateway's `inet meshgress-gw` table (`gateway.rules`): exact rule shapes, and how
it plans against an existing table (pure code, the in-memory nft fake)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from gateway.rules import COUNTER_STALE, SlotRules, compute_gateway_ruleset
from meshgress.kernel.nft_model import Hook, plan_ruleset
from meshgress.kernel.nftables import FakeNftablesAdapter, apply_ruleset
from meshgress.kernel_ids import GATEWAY_NFT_TABLE as NFT_TABLE

ip = ipaddress.IPv4Address
SLOT_A = SlotRules(suffix="aaaa0000", interface="mgegaaaa0000", external_interface="eth0",
                   egress_ip=ip("192.0.2.50"), mark=0x800000,
                   allowed_sources=(ip("198.18.1.11"), ip("198.18.1.10")))
SLOT_B = SlotRules(suffix="bbbb0000", interface="mgegbbbb0000", external_interface="ens5",
                   egress_ip=ip("192.0.2.51"), mark=0x810000)


def iif(name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}}


def oif(name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": name}}


def field_is(protocol: str, name: str, value: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": name}},
                      "right": value}}


CT_MARK = {"ct": {"key": "mark"}}
META_MARK = {"meta": {"key": "mark"}}


def masked_mark_is(mark: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"&": [CT_MARK, 0x00FF0000]}, "right": mark}}


def set_mark(key: dict[str, Any], mark: int) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": {"|": [{"&": [key, 0xFF00FFFF]}, mark]}}}


PROBE = [field_is("ip", "daddr", "192.0.2.50"), field_is("udp", "dport", 51899)]
"""The health probe: to the slot's egress IP (SLOT_A's), through its tunnel."""
STALE = [{"counter": COUNTER_STALE}, {"drop": None}]


def rules(ruleset, chain: str) -> list[list[Any]]:
    return [rule.statements for rule in ruleset.chain(chain).rules]


def test_one_slot_exact_rules():
    rs = compute_gateway_ruleset([SLOT_A])
    assert (rs.family, rs.table) == ("inet", NFT_TABLE) == ("inet", "meshgress-gw")
    [src] = rs.sets
    assert (src.name, src.type, src.flags) == ("src_aaaa0000", "ipv4_addr", ())
    assert src.elements == (ip("198.18.1.10"), ip("198.18.1.11"))  # sorted
    assert [c.name for c in rs.counters] == [
        "out_aaaa0000", "in_aaaa0000", "flows_aaaa0000", "drop_aaaa0000", "drop_stale"]
    assert [(c.name, c.hook) for c in rs.chains] == [
        ("tunnel_in", Hook("filter", "prerouting", -150)),
        ("forward", Hook("filter", "forward", 0)),
        ("input", Hook("filter", "input", 0)),
        ("snat", Hook("nat", "postrouting", 90)),
    ]
    i = "mgegaaaa0000"
    saddr_allowed = {"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                                "field": "saddr"}},
                               "right": "@src_aaaa0000"}}
    assert rules(rs, "tunnel_in") == [
        [iif(i), *PROBE, {"accept": None}],
        [iif(i), saddr_allowed,
         {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
         set_mark(CT_MARK, 0x800000)],
        [iif(i), saddr_allowed, {"accept": None}],
        [iif(i), {"counter": "drop_aaaa0000"}, {"drop": None}],
        [iif("eth0"), masked_mark_is(0x800000), set_mark(META_MARK, 0x800000)],
        [iif("mgeg*"), *STALE],
    ]
    assert rules(rs, "forward") == [
        [iif(i), oif("eth0"), {"counter": "out_aaaa0000"}, {"accept": None}],
        [iif(i), {"counter": "drop_aaaa0000"}, {"drop": None}],
        [oif(i), masked_mark_is(0x800000), {"counter": "in_aaaa0000"}, {"accept": None}],
        [oif(i), {"counter": "drop_aaaa0000"}, {"drop": None}],
        [iif("mgeg*"), *STALE],
        [oif("mgeg*"), *STALE],
    ]
    assert rules(rs, "input") == [
        [iif(i), *PROBE, {"accept": None}],
        [iif(i), {"counter": "drop_aaaa0000"}, {"drop": None}],
        [iif("mgeg*"), *STALE],
    ]
    assert rules(rs, "snat") == [
        [oif("eth0"), masked_mark_is(0x800000), {"counter": "flows_aaaa0000"},
         {"snat": {"family": "ip", "addr": "192.0.2.50"}}],
    ]


def test_no_slot_still_drops_on_leftover_slot_interfaces():
    rs = compute_gateway_ruleset([])
    assert rs.sets == ()
    assert [c.name for c in rs.counters] == ["drop_stale"]
    assert rules(rs, "tunnel_in") == [[iif("mgeg*"), *STALE]]
    assert rules(rs, "forward") == [[iif("mgeg*"), *STALE], [oif("mgeg*"), *STALE]]
    assert rules(rs, "snat") == []


def test_two_slots_in_a_stable_order_whatever_the_input_order():
    assert compute_gateway_ruleset([SLOT_B, SLOT_A]) == compute_gateway_ruleset([SLOT_A, SLOT_B])
    rs = compute_gateway_ruleset([SLOT_B, SLOT_A])
    assert [s.name for s in rs.sets] == ["src_aaaa0000", "src_bbbb0000"]
    snat = rules(rs, "snat")
    assert [r[0] for r in snat] == [oif("eth0"), oif("ens5")]
    # The reply-mark rules come after every tunnel rule, one per slot.
    tail = rules(rs, "tunnel_in")[-3:]
    assert tail == [[iif("eth0"), masked_mark_is(0x800000), set_mark(META_MARK, 0x800000)],
                    [iif("ens5"), masked_mark_is(0x810000), set_mark(META_MARK, 0x810000)],
                    [iif("mgeg*"), *STALE]]


def test_refuses_duplicate_interfaces_and_marks_outside_the_mask():
    with pytest.raises(ValueError, match="listed twice"):
        compute_gateway_ruleset([SLOT_A, SLOT_A])
    with pytest.raises(ValueError, match="outside the mask"):
        SlotRules("x", "mgegx", "eth0", ip("192.0.2.1"), mark=0x4000)


def test_plans_like_the_agent_table_add_a_slot_then_drop_it_counters_survive():
    nft = FakeNftablesAdapter(family="inet", table=NFT_TABLE)
    apply_ruleset(nft, compute_gateway_ruleset([SLOT_A]))
    assert plan_ruleset(compute_gateway_ruleset([SLOT_A]), nft.read()).empty
    nft.hit("flows_aaaa0000", 3)
    # A pod appears: one element added, no chain touched.
    grown = SlotRules(**{**SLOT_A.__dict__, "allowed_sources": (
        *SLOT_A.allowed_sources, ip("198.18.1.12"))})
    plan = apply_ruleset(nft, compute_gateway_ruleset([grown]))
    assert plan.flush_chains == () and [c.set_name for c in plan.add_elements] == [
        "src_aaaa0000"]
    # A second slot, then the first is gone: its rules go, its counters stay.
    apply_ruleset(nft, compute_gateway_ruleset([grown, SLOT_B]))
    apply_ruleset(nft, compute_gateway_ruleset([SLOT_B]))
    assert nft.counters()["flows_aaaa0000"][0] == 3
    assert plan_ruleset(compute_gateway_ruleset([SLOT_B]), nft.read()).empty
    listed = nft.read()
    assert listed is not None
    sets = [item["set"]["name"] for item in listed["nftables"] if "set" in item]
    assert sets == ["src_bbbb0000"]
