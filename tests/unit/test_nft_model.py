"""The `inet meshgress` table without a kernel: compute, render and plan (pure code).

Plans are checked case by case against a listing the in-memory fake produced (so the
observed side has the exact shape `nft -j list table` prints), then drifted by hand.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from meshgress.kernel.nft_model import (
    ACCEPT,
    DROP,
    Hook,
    NftChain,
    NftCounter,
    NftMap,
    NftPlan,
    NftSet,
    Rule,
    Ruleset,
    Verdict,
    canonical_json,
    counter_ref,
    jump,
    match,
    meta,
    parse_observed,
    payload,
    plan_ruleset,
    rule_comment,
    ruleset_commands,
    set_ref,
)
from meshgress.kernel.nftables import FakeNftablesAdapter, NftError, apply_ruleset
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE
from nodeagent.firewall import FirewallSpec, compute_ruleset

TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}

net = ipaddress.IPv4Network
SPEC = FirewallSpec((net("198.18.0.0/24"),), (net("198.19.0.0/24"),))


def ours(**extra: Any) -> dict[str, Any]:
    return {"family": "inet", "table": "meshgress", **extra}


def oif(name: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"left": {"meta": {"key": "oifname"}}, "op": op, "right": name}}


def iif(name: str) -> dict[str, Any]:
    return {"match": {"left": {"meta": {"key": "iifname"}}, "op": "==", "right": name}}


def ip(field: str, right: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"left": {"payload": {"field": field, "protocol": "ip"}}, "op": op,
                      "right": right}}


def rule(chain: str, comment: str, *expr: Any) -> dict[str, Any]:
    return {"add": {"rule": ours(chain=chain, comment=comment, expr=list(expr))}}


def prefix(addr: str, length: int) -> dict[str, Any]:
    return {"prefix": {"addr": addr, "len": length}}


# The whole table for SPEC, exactly as sent to libnftables. Rule comments are part of
# the contract: changing how they are computed makes every agent refill every chain once.
EXPECTED_CREATE = [
    {"add": {"table": {"family": "inet", "name": "meshgress"}}},
    {"add": {"set": ours(name="cluster_v4", type="ipv4_addr", flags=["interval"])}},
    {"add": {"set": ours(name="nonmasq_v4", type="ipv4_addr", flags=["interval"])}},
    {"add": {"counter": ours(name="leak_out", comment="plaintext pod traffic dropped before "
                                                   "leaving on the underlay")}},
    {"add": {"counter": ours(name="spoof_in", comment="packets claiming a pod source dropped "
                                                   "on a non-cluster interface")}},
    {"add": {"chain": ours(name="guard_out", type="filter", hook="postrouting", prio=110,
                        policy="accept")}},
    {"add": {"chain": ours(name="guard_in", type="filter", hook="prerouting", prio=-300,
                        policy="accept")}},
    {"add": {"chain": ours(name="masq", type="nat", hook="postrouting", prio=100,
                        policy="accept")}},
    {"add": {"element": ours(name="cluster_v4", elem=[prefix("198.18.0.0", 24)])}},
    {"add": {"element": ours(name="nonmasq_v4", elem=[prefix("198.18.0.0", 24),
                                                   prefix("198.19.0.0", 24)])}},
    rule("guard_out", "mg:82f6e8cfb24a", oif("lo"), {"accept": None}),
    rule("guard_out", "mg:47a44f19ce55", oif("meshgress0"), {"accept": None}),
    rule("guard_out", "mg:f45d59cf0f74", oif("mgc*"), {"accept": None}),
    rule("guard_out", "mg:e44d9dd70125", oif("mge*"), {"accept": None}),
    rule("guard_out", "mg:f2248cf0997b", ip("saddr", "@cluster_v4"), {"counter": "leak_out"},
         {"drop": None}),
    rule("guard_out", "mg:0795f279ff78", ip("daddr", "@cluster_v4"), {"counter": "leak_out"},
         {"drop": None}),
    rule("guard_in", "mg:e27d29a4aaf9", iif("lo"), {"accept": None}),
    rule("guard_in", "mg:bb0986a37d70", iif("meshgress0"), {"accept": None}),
    rule("guard_in", "mg:e66f9004ce02", iif("mgc*"), {"accept": None}),
    rule("guard_in", "mg:0b28fe06f852", iif("mge*"), {"accept": None}),
    rule("guard_in", "mg:0ed288a8615f", ip("saddr", "@cluster_v4"), {"counter": "spoof_in"},
         {"drop": None}),
    rule("masq", "mg:5c15a444b028", ip("saddr", "@cluster_v4"),
         ip("daddr", "@nonmasq_v4", "!="), oif("meshgress0", "!="), oif("mge*", "!="),
         {"masquerade": None}),
]


# --- compute and render ------------------------------------------------------------------


def test_small_spec_renders_exactly() -> None:
    assert ruleset_commands(compute_ruleset(SPEC)) == EXPECTED_CREATE


def test_rendering_is_deterministic_whatever_the_input_order() -> None:
    a = FirewallSpec((net("198.18.1.0/24"), net("198.18.0.0/24"), net("198.18.0.0/24")),
                     (net("198.19.0.0/16"),))
    b = FirewallSpec((net("198.18.0.0/24"), net("198.18.1.0/24")), (net("198.19.0.0/16"),))
    assert a == b
    assert canonical_json(ruleset_commands(compute_ruleset(a))) == \
        canonical_json(ruleset_commands(compute_ruleset(b)))


def test_overlapping_and_adjacent_cidrs_are_merged_for_interval_sets() -> None:
    spec = FirewallSpec((net("198.18.0.0/24"), net("198.18.1.0/24"), net("198.18.0.0/16")),
                        (net("198.19.0.0/16"), net("198.19.1.0/24")))
    ruleset = compute_ruleset(spec)
    assert ruleset.named_set("cluster_v4").elements == (net("198.18.0.0/16"),)
    # pod and service ranges are adjacent: one element, as nft would need anyway
    assert ruleset.named_set("nonmasq_v4").elements == (net("198.18.0.0/15"),)


def test_custom_interface_names_and_masquerade_off() -> None:
    spec = FirewallSpec((net("198.18.0.0/16"),), (), mesh_interface="wg9",
                        pod_interface_prefix="cali", egress_interface_prefix="egw",
                        masquerade=False)
    ruleset = compute_ruleset(spec)
    guard_out = [r.statements[0]["match"]["right"] for r in ruleset.chain("guard_out").rules[:4]]
    assert guard_out == ["lo", "wg9", "cali*", "egw*"]
    assert ruleset.chain("masq").rules == ()
    assert ruleset.chain("masq").hook == Hook("nat", "postrouting", 100)


@pytest.mark.parametrize("kwargs", [
    {"mesh_interface": ""},
    {"mesh_interface": "a-name-far-too-long"},
    {"pod_interface_prefix": 'x"y'},
    {"egress_interface_prefix": "mge*"},
], ids=["empty-mesh-name", "mesh-name-too-long", "quote-in-prefix", "wildcard-in-prefix"])
def test_spec_rejects_unusable_interface_names(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="interface"):
        FirewallSpec((net("198.18.0.0/16"),), **kwargs)


def test_spec_rejects_ipv6_and_host_bits() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        FirewallSpec((ipaddress.ip_network("fd00::/64"),))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FirewallSpec(("198.18.0.1/16",))  # type: ignore[arg-type]


def test_rule_comment_is_a_stable_hash_of_chain_and_expression() -> None:
    r = Rule.of(match(meta("oifname"), "lo"), ACCEPT)
    assert rule_comment("guard_out", r) == "mg:82f6e8cfb24a"
    assert rule_comment("guard_in", r) != rule_comment("guard_out", r)
    assert Rule.of(DROP) != r


@pytest.mark.parametrize("make, message", [
    (lambda: Ruleset(**TABLE, chains=(NftChain("c", (Rule.of(match(payload("ip", "saddr"),
                                                        set_ref("nope")), DROP),)),)),
     "unknown set 'nope'"),
    (lambda: Ruleset(**TABLE, chains=(NftChain("c", (Rule.of(counter_ref("nope"), DROP),)),)),
     "unknown counter"),
    (lambda: Ruleset(**TABLE, chains=(NftChain("c", (Rule.of(jump("x"),),)),)), "unknown chain"),
    (lambda: Ruleset(**TABLE, chains=(NftChain("b", hook=Hook("filter", "input", 0)),
                             NftChain("c", (Rule.of(jump("b"),),)))),
     "regular chains"),
    (lambda: Ruleset(**TABLE, sets=(NftMap("v", "ipv4_addr", "verdict",
                                  elements=((ipaddress.IPv4Address("1.2.3.4"),
                                             Verdict("jump", "gone")),)),)),
     "map v refers to unknown chain"),
    (lambda: NftChain("c", (Rule.of(ACCEPT), Rule.of(ACCEPT))), "the same rule twice"),
    (lambda: Ruleset(**TABLE, counters=(NftCounter("a"), NftCounter("a"))), "duplicate counter"),
    (lambda: NftSet("s", "ipv4_addr", elements=(net("10.0.0.0/8"),)), "needs flags interval"),
    (lambda: NftSet("s", "ipv4_addr", ("interval",),
                    elements=(net("10.0.0.0/8"), net("10.0.0.0/8"))), "duplicate element"),
    (lambda: NftSet("bad-name", "ipv4_addr"), "letters, digits"),
], ids=["unknown-set", "unknown-counter", "unknown-jump-target", "jump-to-base-chain",
        "vmap-to-unknown-chain", "duplicate-rule", "duplicate-counter",
        "prefix-without-interval", "duplicate-element", "bad-name"])
def test_ruleset_rejects_what_nft_would_refuse(make: Callable[[], object],
                                               message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# --- plan, table-driven --------------------------------------------------------------


DESIRED = compute_ruleset(FirewallSpec((net("198.18.0.0/17"),), (net("198.19.0.0/16"),)))


def listing(ruleset: Ruleset = DESIRED) -> dict[str, Any]:
    """What `nft -j list table` shows after `ruleset` was applied to an empty node."""
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, ruleset)
    doc = fake.read()
    assert doc is not None
    return doc


def objects(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [item[kind] for item in doc["nftables"] if kind in item]


def drop_rule(chain: str, index: int) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        victim = [i for i, item in enumerate(doc["nftables"])
                  if item.get("rule", {}).get("chain") == chain][index]
        del doc["nftables"][victim]
    return edit


def add_foreign_rule(chain: str, comment: str | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        body: dict[str, Any] = ours(chain=chain, handle=999, expr=[{"accept": None}])
        if comment:
            body["comment"] = comment
        doc["nftables"].append({"rule": body})
    return edit


def swap_rules(chain: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        idx = [i for i, item in enumerate(doc["nftables"])
               if item.get("rule", {}).get("chain") == chain]
        items = doc["nftables"]
        items[idx[0]], items[idx[1]] = items[idx[1]], items[idx[0]]
    return edit


def set_chain(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for chain in objects(doc, "chain"):
            if chain["name"] == name:
                chain.update(fields)
    return edit


def set_set(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for item in objects(doc, "set"):
            if item["name"] == name:
                item.update(fields)
                for key in [k for k, v in fields.items() if v is None]:
                    del item[key]
    return edit


def add_object(kind: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["nftables"].append({kind: ours(handle=998, **fields)})
    return edit


def remove_counter_and_chain(counter: str, chain: str) -> Callable[[dict[str, Any]], None]:
    """As an older agent without that counter and the chain that uses it left it."""
    def edit(doc: dict[str, Any]) -> None:
        doc["nftables"] = [
            i for i in doc["nftables"]
            if i.get("counter", {}).get("name") != counter
            and i.get("chain", {}).get("name") != chain
            and i.get("rule", {}).get("chain") != chain]
    return edit


GUARD_OUT_RULES = len(DESIRED.chain("guard_out").rules)
GUARD_IN_RULES = len(DESIRED.chain("guard_in").rules)


def summary(plan: NftPlan) -> dict[str, Any]:
    """The plan's shape, compact enough to write down per case."""
    return {k: v for k, v in {
        "create_table": plan.create_table,
        "flush": plan.flush_chains,
        "delete_chains": plan.delete_chains,
        "delete_sets": plan.delete_sets,
        "delete_elements": {c.set_name: len(c.elements) for c in plan.delete_elements},
        "add_sets": tuple(s.name for s in plan.add_sets),
        "add_counters": tuple(c.name for c in plan.add_counters),
        "add_chains": tuple(c.name for c in plan.add_chains),
        "add_elements": {c.set_name: len(c.elements) for c in plan.add_elements},
        "add_rules": len(plan.add_rules),
    }.items() if v}


CASES: list[tuple[str, Ruleset, Callable[[dict[str, Any]], None] | None, dict[str, Any]]] = [
    ("missing-table-creates-everything", DESIRED, None,
     {"create_table": True, "add_sets": ("cluster_v4", "nonmasq_v4"),
      "add_counters": ("leak_out", "spoof_in"), "add_chains": ("guard_out", "guard_in", "masq"),
      "add_elements": {"cluster_v4": 1, "nonmasq_v4": 2}, "add_rules": 12}),
    ("identical-is-empty", DESIRED, lambda doc: None, {}),
    ("pod-cidr-changed-is-an-element-diff-only",
     compute_ruleset(FirewallSpec((net("198.18.0.0/16"), net("198.20.0.0/24")),
                                  (net("198.19.0.0/16"),))),
     lambda doc: None,
     {"delete_elements": {"cluster_v4": 1, "nonmasq_v4": 2},
      "add_elements": {"cluster_v4": 2, "nonmasq_v4": 2}}),
    ("service-cidr-added-touches-nonmasq-only",
     compute_ruleset(FirewallSpec((net("198.18.0.0/17"),),
                                  (net("198.19.0.0/16"), net("198.19.255.0/24"),
                                   net("10.96.0.0/12")))),
     lambda doc: None, {"add_elements": {"nonmasq_v4": 1}}),
    ("chain-missing-a-rule-is-refilled", DESIRED, drop_rule("guard_out", 4),
     {"flush": ("guard_out",), "add_rules": GUARD_OUT_RULES}),
    ("foreign-rule-without-comment-in-our-chain", DESIRED, add_foreign_rule("guard_in"),
     {"flush": ("guard_in",), "add_rules": GUARD_IN_RULES}),
    ("foreign-rule-with-a-copied-comment", DESIRED,
     add_foreign_rule("guard_in", rule_comment("guard_in", DESIRED.chain("guard_in").rules[0])),
     {"flush": ("guard_in",), "add_rules": GUARD_IN_RULES}),
    ("reordered-rules", DESIRED, swap_rules("guard_out"),
     {"flush": ("guard_out",), "add_rules": GUARD_OUT_RULES}),
    ("emptied-chain", DESIRED,
     lambda doc: doc.__setitem__("nftables", [i for i in doc["nftables"]
                                              if i.get("rule", {}).get("chain") != "masq"]),
     {"flush": ("masq",), "add_rules": 1}),
    ("chain-priority-changed-is-recreated", DESIRED, set_chain("guard_in", prio=-150),
     {"flush": ("guard_in",), "delete_chains": ("guard_in",), "add_chains": ("guard_in",),
      "add_rules": GUARD_IN_RULES}),
    ("chain-policy-changed-is-recreated", DESIRED, set_chain("guard_out", policy="drop"),
     {"flush": ("guard_out",), "delete_chains": ("guard_out",), "add_chains": ("guard_out",),
      "add_rules": GUARD_OUT_RULES}),
    ("foreign-chain-is-removed", DESIRED, add_object("chain", name="zz"),
     {"flush": ("zz",), "delete_chains": ("zz",)}),
    ("foreign-set-is-removed", DESIRED, add_object("set", name="zz", type="ipv4_addr"),
     {"delete_sets": (("set", "zz"),)}),
    ("set-lost-its-interval-flag-is-recreated-with-its-users",
     DESIRED, set_set("nonmasq_v4", flags=None),
     {"flush": ("masq",), "delete_sets": (("set", "nonmasq_v4"),), "add_sets": ("nonmasq_v4",),
      "add_elements": {"nonmasq_v4": 2}, "add_rules": 1}),
    ("foreign-element-is-deleted", DESIRED,
     set_set("cluster_v4", elem=[prefix("198.18.0.0", 17), "10.1.2.3"]),
     {"delete_elements": {"cluster_v4": 1}}),
    ("missing-counter-is-created", DESIRED, remove_counter_and_chain("spoof_in", "guard_in"),
     {"add_counters": ("spoof_in",), "add_chains": ("guard_in",), "add_rules": GUARD_IN_RULES}),
    ("foreign-counter-is-left-alone", DESIRED, add_object("counter", name="zz", packets=5,
                                                          bytes=500), {}),
    ("other-tables-in-the-listing-are-ignored", DESIRED,
     lambda doc: doc["nftables"].append(
         {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1}}), {}),
]


@pytest.mark.parametrize("desired, edit, expected",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(desired: Ruleset, edit: Callable[[dict[str, Any]], None] | None,
              expected: dict[str, Any]) -> None:
    observed = None
    if edit is not None:
        observed = listing()
        edit(observed)
    plan = plan_ruleset(desired, observed)
    assert summary(plan) == expected
    assert plan.empty == (expected == {})

    commands = plan.commands()
    for command in commands:  # never a counter or the table in a delete or flush
        for verb in ("delete", "flush"):
            assert "counter" not in command.get(verb, {}), command
            assert "table" not in command.get(verb, {}), command
    if observed is not None:
        assert not plan.create_table

    # Applying the plan to that observed state gives the desired table; nothing left.
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    if observed is not None:
        fake.run(rebuild_commands(observed))
    fake.apply(plan)
    assert plan_ruleset(desired, fake.read()).empty


def rebuild_commands(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Commands that make the fake hold exactly the (possibly hand-edited) listing."""
    out: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": "meshgress"}}}]
    strip = {"handle", "packets", "bytes", "elem"}
    for item in doc["nftables"]:
        ((kind, body),) = item.items()
        if kind in ("metainfo", "table") or body.get("table") != "meshgress":
            continue
        out.append({"add": {kind: {k: v for k, v in body.items() if k not in strip}}})
        if body.get("elem"):
            out.append({"add": {"element": ours(name=body["name"], elem=body["elem"])}})
    return out


def test_counters_keep_their_values_through_every_plan() -> None:
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, DESIRED)
    fake.hit("leak_out", 3)
    fake.hit("spoof_in", 2)
    other = compute_ruleset(FirewallSpec((net("198.18.0.0/16"),), (), masquerade=False,
                                         mesh_interface="wg0"))
    plan = apply_ruleset(fake, other)
    assert plan.flush_chains and plan.delete_elements  # a big change...
    assert fake.counters() == {"leak_out": (3, 252), "spoof_in": (2, 168)}  # ...kept them


def test_failed_apply_changes_nothing_and_says_why() -> None:
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, DESIRED)
    before = copy.deepcopy(fake.read())
    broken = NftPlan(NFT_FAMILY, NFT_TABLE, flush_chains=("guard_out",), delete_chains=("nosuch",))
    with pytest.raises(NftError, match="no chain nosuch") as info:
        fake.apply(broken)
    assert info.value.commands == broken.commands()
    assert fake.read() == before


def test_plan_deletes_elements_before_adding_overlapping_ones() -> None:
    # nft refuses an interval overlapping an existing one even when that one is deleted
    # later in the same transaction; the fake does too.
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, DESIRED)
    wider = compute_ruleset(FirewallSpec((net("198.18.0.0/16"),), (net("198.19.0.0/16"),)))
    plan = apply_ruleset(fake, wider)
    verbs = [next(iter(c)) for c in plan.commands()]
    assert verbs == ["delete", "delete", "add", "add"]
    assert plan_ruleset(wider, fake.read()).empty
    wrong_order = [c for c in plan_ruleset(DESIRED, fake.read()).commands()
                   if "add" in c] + [c for c in plan_ruleset(DESIRED, fake.read()).commands()
                                     if "delete" in c]
    with pytest.raises(NftError, match="overlaps"):
        fake.run(wrong_order)


def test_egress_shaped_ruleset_needs_no_new_plan_code() -> None:
    """Sets of pod IPs, a mark map, a verdict map into a regular chain, a concatenation
    and a mangle chain: the egress work adds values like these."""
    pods = NftSet("pods_p1", "ipv4_addr", elements=(ipaddress.IPv4Address("198.18.1.9"),))
    ports = NftSet("pod_ports", ("ipv4_addr", "inet_service"),
                   elements=((ipaddress.IPv4Address("198.18.1.9"), 443),))
    marks = NftMap("slot_marks", "mark", "mark", elements=((0, 0x10000), (1, 0x20000)))
    vmap = NftMap("policies", "ipv4_addr", "verdict",
                  elements=((ipaddress.IPv4Address("198.18.1.9"), Verdict("jump", "policy_p1")),))
    policy = NftChain("policy_p1", (Rule.of(
        {"mangle": {"key": meta("mark"), "value": {"map": {"key": meta("mark"),
                                                           "data": "@slot_marks"}}}}),))
    steer = NftChain("egress_mark", hook=Hook("filter", "prerouting", -150), rules=(
        Rule.of({"vmap": {"key": payload("ip", "saddr"), "data": set_ref("policies")}}),
        Rule.of(match({"concat": [payload("ip", "saddr"), payload("tcp", "dport")]},
                      set_ref("pod_ports")), match(payload("ip", "saddr"), set_ref("pods_p1")),
                ACCEPT),
    ))
    extended = Ruleset(**TABLE, sets=(*DESIRED.sets, pods, ports, marks, vmap),
                       counters=DESIRED.counters, chains=(*DESIRED.chains, policy, steer))
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, DESIRED)
    apply_ruleset(fake, extended)
    assert plan_ruleset(extended, fake.read()).empty

    changed = Ruleset(
        **TABLE,
        sets=(*DESIRED.sets,
              NftSet("pods_p1", "ipv4_addr", elements=(ipaddress.IPv4Address("198.18.1.10"),)),
              ports, NftMap("slot_marks", "mark", "mark", elements=((0, 0x30000), (1, 0x20000))),
              vmap),
        counters=DESIRED.counters, chains=extended.chains)
    plan = apply_ruleset(fake, changed)
    assert summary(plan) == {"delete_elements": {"pods_p1": 1, "slot_marks": 1},
                             "add_elements": {"pods_p1": 1, "slot_marks": 1}}
    assert plan_ruleset(changed, fake.read()).empty

    # Back to the base table: the vmap goes before the chain it jumps to.
    plan = apply_ruleset(fake, DESIRED)
    assert set(plan.delete_chains) == {"policy_p1", "egress_mark"}
    assert plan_ruleset(DESIRED, fake.read()).empty


def test_parse_observed_reads_what_the_plan_needs() -> None:
    doc = listing()
    observed = parse_observed(doc, NFT_FAMILY, NFT_TABLE)
    assert observed is not None
    assert observed.chains["guard_in"].hook == Hook("filter", "prerouting", -300)
    assert observed.chains["guard_out"].rule_comments == DESIRED.chain("guard_out").rule_comments()
    assert observed.counters == {"leak_out": (0, 0), "spoof_in": (0, 0)}
    assert parse_observed(None, NFT_FAMILY, NFT_TABLE) is None
    assert parse_observed({"nftables": [{"metainfo": {}}]}, NFT_FAMILY, NFT_TABLE) is None
    assert parse_observed(doc, NFT_FAMILY, "other") is None


def test_summary_is_one_readable_line() -> None:
    assert plan_ruleset(DESIRED, listing()).summary() == "no change"
    text = plan_ruleset(DESIRED, None).summary()
    assert text.startswith("create table inet meshgress; add sets cluster_v4,nonmasq_v4")


def _with_policy_counters(*names: str) -> Ruleset:
    """DESIRED plus one counted rule per name, counters pruned by their prefix."""
    counters = tuple(NftCounter(f"egress_policy_{n}") for n in names)
    chain = NftChain("steer", hook=Hook("filter", "prerouting", -150), rules=tuple(
        Rule.of(match(meta("mark"), i + 1), counter_ref(c.name), ACCEPT)
        for i, c in enumerate(counters)))
    return Ruleset(**TABLE, sets=DESIRED.sets, counters=DESIRED.counters + counters,
                   chains=(*DESIRED.chains, chain), pruned_counters=("egress_policy_",))


def test_pruned_counters_go_with_what_they_count_and_no_other_counter_does() -> None:
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, _with_policy_counters("a", "b"))
    fake.run([{"add": {"counter": {"family": "inet", "table": "meshgress",
                                   "name": "someone_elses"}}}])
    fake.hit("egress_policy_b", 4)
    plan = apply_ruleset(fake, _with_policy_counters("b"))
    assert plan.delete_counters == ("egress_policy_a",)
    commands = [next(iter(c)) + " " + next(iter(next(iter(c.values())))) for c in
                plan.commands()]
    # the rules that use it are flushed first, in the same transaction
    assert commands.index("flush chain") < commands.index("delete counter")
    assert set(fake.counters()) == {"leak_out", "spoof_in", "someone_elses",
                                    "egress_policy_b"}
    assert fake.counters()["egress_policy_b"][0] == 4
    assert apply_ruleset(fake, _with_policy_counters("b")).empty
