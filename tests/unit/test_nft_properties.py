"""Properties of plan_ruleset, checked against the in-memory fake nftables.

The fake applies plans with nft's semantics (atomic transactions, overlap checks on
interval sets, reference checks, counters that survive), so "apply the plan, then plan
again" must always give an empty plan, whatever the table looked like before.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshgress.kernel.nft_model import (
    ACCEPT,
    Hook,
    NftChain,
    NftMap,
    NftPlan,
    NftSet,
    ObservedTable,
    Rule,
    Ruleset,
    match,
    meta,
    parse_observed,
    payload,
    plan_ruleset,
    set_ref,
)
from meshgress.kernel.nftables import FakeNftablesAdapter, apply_ruleset
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE
from nodeagent.firewall import FirewallSpec, compute_ruleset

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def networks(base: str) -> st.SearchStrategy[ipaddress.IPv4Network]:
    root = ipaddress.IPv4Network(base)
    return st.builds(
        lambda offset, length: ipaddress.IPv4Network(
            (int(root.network_address) + offset, length), strict=False),
        st.integers(0, root.num_addresses - 1), st.integers(root.prefixlen, 32))


specs = st.builds(
    FirewallSpec,
    cluster_pod_cidrs=st.lists(networks("198.18.0.0/16"), max_size=4).map(tuple),
    service_cidrs=st.lists(networks("198.19.0.0/16") | networks("198.18.0.0/16"),
                           max_size=3).map(tuple),
    mesh_interface=st.sampled_from(["meshgress0", "wg0"]),
    masquerade=st.booleans(),
)

TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}

addresses = st.builds(ipaddress.IPv4Address, st.integers(0xC6120000, 0xC612FFFF))


@st.composite
def rulesets(draw: st.DrawFn) -> Ruleset:
    """The agent's table, sometimes with egress-like extras (pod sets, a mark map, a chain)."""
    base = compute_ruleset(draw(specs))
    if not draw(st.booleans()):
        return base
    pods = NftSet("pods_p1", "ipv4_addr",
                  elements=tuple(draw(st.lists(addresses, max_size=6, unique=True))))
    marks = NftMap("slot_marks", "mark", "mark", elements=tuple(sorted(draw(
        st.dictionaries(st.integers(0, 15), st.sampled_from([0x10000, 0x20000, 0x30000]),
                        max_size=5)).items())))
    rules = [Rule.of(match(payload("ip", "saddr"), set_ref("pods_p1")),
                     {"mangle": {"key": meta("mark"),
                                 "value": {"map": {"key": meta("mark"),
                                                   "data": "@slot_marks"}}}})]
    if draw(st.booleans()):
        rules.append(Rule.of(match(meta("iifname"), "mgc*"), ACCEPT))
    steer = NftChain("egress_mark", tuple(draw(st.permutations(rules))),
                     Hook("filter", "prerouting", draw(st.sampled_from([-150, -140]))))
    return Ruleset(**TABLE, sets=(*base.sets, pods, marks), counters=base.counters,
                   chains=(*base.chains, steer))


def normalised(observed: ObservedTable | None) -> Any:
    """An observed table without listing order or counter values."""
    assert observed is not None
    return (
        {name: (c.hook, c.rule_comments) for name, c in observed.chains.items()},
        {name: (s.kind, s.definition, frozenset(s.elements)) for name, s in observed.sets.items()},
        set(observed.counters),
    )


def fresh(ruleset: Ruleset) -> FakeNftablesAdapter:
    fake = FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE)
    apply_ruleset(fake, ruleset)
    return fake


@SETTINGS
@given(desired=rulesets())
def test_applying_the_plan_from_nothing_leaves_nothing_to_do(desired: Ruleset) -> None:
    fake = fresh(desired)
    assert plan_ruleset(desired, fake.read()).empty


@SETTINGS
@given(before=rulesets(), desired=rulesets(), leaks=st.integers(0, 5),
       spoofs=st.integers(0, 5))
def test_any_table_converges_in_one_plan_and_keeps_its_counters(
        before: Ruleset, desired: Ruleset, leaks: int, spoofs: int) -> None:
    fake = fresh(before)
    fake.hit("leak_out", leaks)
    fake.hit("spoof_in", spoofs)
    counters = fake.counters()

    plan = apply_ruleset(fake, desired)

    assert plan_ruleset(desired, fake.read()).empty
    assert normalised(parse_observed(fake.read(), NFT_FAMILY, NFT_TABLE)) == normalised(
        parse_observed(fresh(desired).read(), NFT_FAMILY, NFT_TABLE))
    assert fake.counters() == counters
    assert not any("counter" in c.get("delete", {}) for c in plan.commands())


@SETTINGS
@given(spec=specs, other=specs)
def test_cidr_changes_are_element_changes_only(spec: FirewallSpec, other: FirewallSpec) -> None:
    moved = FirewallSpec(other.cluster_pod_cidrs, other.service_cidrs, spec.mesh_interface,
                         masquerade=spec.masquerade)
    fake = fresh(compute_ruleset(spec))
    plan = plan_ruleset(compute_ruleset(moved), fake.read())
    rest = NftPlan(NFT_FAMILY, NFT_TABLE, plan.table_comment,
                   delete_elements=plan.delete_elements,
                   add_elements=plan.add_elements)
    assert plan == rest
    fake.apply(plan)
    assert plan_ruleset(compute_ruleset(moved), fake.read()).empty


drift_commands = st.sampled_from([
    [{"flush": {"chain": {"family": "inet", "table": "meshgress", "name": "guard_out"}}}],
    [{"add": {"rule": {"family": "inet", "table": "meshgress", "chain": "guard_in",
                       "expr": [{"accept": None}]}}}],
    [{"add": {"chain": {"family": "inet", "table": "meshgress", "name": "foreign"}}},
     {"add": {"rule": {"family": "inet", "table": "meshgress", "chain": "foreign",
                       "expr": [{"match": {"op": "==", "left": {"payload": {
                           "protocol": "ip", "field": "saddr"}}, "right": "@cluster_v4"}},
                           {"counter": "leak_out"}, {"drop": None}]}}}],
    [{"add": {"set": {"family": "inet", "table": "meshgress", "name": "junk",
                      "type": "ipv4_addr"}}},
     {"add": {"element": {"family": "inet", "table": "meshgress", "name": "junk",
                          "elem": ["10.0.0.1"]}}}],
    [{"add": {"element": {"family": "inet", "table": "meshgress", "name": "cluster_v4",
                          "elem": ["10.0.0.1"]}}}],
    [{"add": {"counter": {"family": "inet", "table": "meshgress", "name": "junk"}}}],
    [{"flush": {"chain": {"family": "inet", "table": "meshgress", "name": "masq"}}},
     {"delete": {"chain": {"family": "inet", "table": "meshgress", "name": "masq"}}},
     {"add": {"chain": {"family": "inet", "table": "meshgress", "name": "masq", "type": "nat",
                        "hook": "postrouting", "prio": 50, "policy": "accept"}}}],
])


@SETTINGS
@given(desired=rulesets(), drifts=st.lists(drift_commands, min_size=1, max_size=3))
def test_drift_is_repaired_by_one_plan(desired: Ruleset, drifts: list[list[Any]]) -> None:
    fake = fresh(desired)
    fake.hit("leak_out", 7)
    for commands in drifts:
        fake.run(commands)
    apply_ruleset(fake, desired)
    assert plan_ruleset(desired, fake.read()).empty
    assert fake.counters()["leak_out"] == (7, 7 * 84)
