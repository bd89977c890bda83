"""The guard on meshgress's own endpoints in the node's table (`nodeagent.firewall`):
who may reach the agent's and the gateway's /metrics, /healthz and /readyz.

Packets are run through the computed chain by a small interpreter of exactly the
expressions the chain uses (interface, addresses, port, set lookups, `fib daddr type`), so
each case says what happens to a packet, not how the rules are spelled. Only the first
case pins the spelling (rules keep their comments; a change refills the chain once).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from meshgress.kernel.nft_model import Ruleset
from nodeagent.firewall import (
    CHAIN_GUARD_ENDPOINTS,
    COUNTER_ENDPOINT_OTHER,
    COUNTER_ENDPOINT_PODS,
    SET_ENDPOINT_PODS,
    SET_NODES,
    FirewallSpec,
    compute_node_networks,
    compute_ruleset,
)
from nodeagent.options import parse_cidrs, parse_ports

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
THIS_NODE, OTHER_NODE, GATEWAY_NODE = A("192.0.2.11"), A("192.0.2.12"), A("192.0.2.101")
OUTSIDE = A("192.0.2.254")
POD, SCRAPER, REMOTE_POD = A("198.18.1.7"), A("198.18.1.9"), A("198.18.2.5")
SPEC = FirewallSpec(
    cluster_pod_cidrs=(N("198.18.0.0/16"),), service_cidrs=(N("198.19.0.0/16"),),
    endpoint_ports=(9821, 9820),
    node_networks=compute_node_networks((GATEWAY_NODE, OTHER_NODE, THIS_NODE)),
    endpoint_allowed_sources=(N("203.0.113.0/28"),), endpoint_allowed_pods=(SCRAPER,))
LOCAL = {THIS_NODE, A("127.0.0.1"), A("192.0.2.201")}
"""Addresses of this node (an egress IP held by a gateway here is one too)."""


@dataclass(frozen=True)
class Packet:
    iif: str
    saddr: ipaddress.IPv4Address
    daddr: ipaddress.IPv4Address
    dport: int


def elements(ruleset: Ruleset, name: str) -> list[Any]:
    return next(s for s in ruleset.sets if s.name == name).elements  # type: ignore[no-any-return]


def contains(ruleset: Ruleset, name: str, value: Any) -> bool:
    for element in elements(ruleset, name):
        if isinstance(element, N) and isinstance(value, A):
            if value in element:
                return True
        elif element == value:
            return True
    return False


def evaluate(ruleset: Ruleset, packet: Packet) -> tuple[str, str | None]:
    """The guard chain's verdict for `packet` ("accept" when no rule decides) and the
    counter it bumped."""
    chain = next(c for c in ruleset.chains if c.name == CHAIN_GUARD_ENDPOINTS)
    for rule in chain.rules:
        counter = None
        verdict = None
        matched = True
        for expr in rule.statements:
            if "match" in expr:
                m = expr["match"]
                left, right, op = m["left"], m["right"], m["op"]
                if "meta" in left:
                    value: Any = packet.iif
                elif "fib" in left:
                    value = "local" if packet.daddr in LOCAL else "unicast"
                else:
                    value = {"saddr": packet.saddr, "daddr": packet.daddr,
                             "dport": packet.dport}[left["payload"]["field"]]
                if isinstance(right, str) and right.startswith("@"):
                    hit = contains(ruleset, right[1:], value)
                else:
                    hit = value == right
                if hit != (op == "=="):
                    matched = False
                    break
            elif "counter" in expr:
                counter = expr["counter"]
            else:
                verdict = next(iter(expr))
        if matched and verdict is not None:
            return verdict, counter
    return "accept", None


def test_the_chain_is_spelled_as_sent() -> None:
    ruleset = compute_ruleset(SPEC)
    chain = next(c for c in ruleset.chains if c.name == CHAIN_GUARD_ENDPOINTS)
    assert chain.hook is not None
    assert (chain.hook.type, chain.hook.hook, chain.hook.priority) == ("filter", "prerouting", 0)
    assert elements(ruleset, "endpoint_ports") == (9820, 9821)
    assert elements(ruleset, SET_NODES) == (N("192.0.2.11/32"), N("192.0.2.12/32"),
                                            N("192.0.2.101/32"))
    assert elements(ruleset, SET_ENDPOINT_PODS) == (SCRAPER,)
    dport = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": "@endpoint_ports"}}
    assert chain.rules[0].statements[:2] == [dport, {"match": {"op": "==", "left": {
        "meta": {"key": "iifname"}}, "right": "lo"}}]
    assert {COUNTER_ENDPOINT_PODS, COUNTER_ENDPOINT_OTHER} <= {c.name for c in ruleset.counters}


@pytest.mark.parametrize(("packet", "verdict", "counter"), [
    # Pods: never, on this node or another, whatever address of the node they aim at.
    (Packet("mgc0a1b2c3d4e5", POD, THIS_NODE, 9820), "drop", COUNTER_ENDPOINT_PODS),
    (Packet("mgc0a1b2c3d4e5", POD, A("192.0.2.201"), 9821), "drop", COUNTER_ENDPOINT_PODS),
    (Packet("mgc0a1b2c3d4e5", POD, GATEWAY_NODE, 9821), "drop", COUNTER_ENDPOINT_PODS),
    (Packet("mgc0a1b2c3d4e5", POD, OTHER_NODE, 9820), "drop", COUNTER_ENDPOINT_PODS),
    (Packet("meshgress0", REMOTE_POD, THIS_NODE, 9820), "drop", COUNTER_ENDPOINT_PODS),
    # ... but another pod listening on the same port is none of the guard's business,
    # nor are other ports of the node.
    (Packet("mgc0a1b2c3d4e5", POD, REMOTE_POD, 9820), "accept", None),
    (Packet("mgc0a1b2c3d4e5", POD, THIS_NODE, 53), "accept", None),
    (Packet("mgc0a1b2c3d4e5", POD, OUTSIDE, 9820), "accept", None),
    # The pods of the allowed namespaces (Prometheus) may.
    (Packet("mgc0a1b2c3d4e5", SCRAPER, THIS_NODE, 9820), "accept", None),
    (Packet("mgc0a1b2c3d4e5", SCRAPER, GATEWAY_NODE, 9821), "accept", None),
    # Loopback (the kubelet's probes; the node scraping itself), the cluster's nodes
    # (Prometheus elsewhere arrives masqueraded to its node's address), allowed sources.
    (Packet("lo", A("127.0.0.1"), A("127.0.0.1"), 9820), "accept", None),
    (Packet("lo", THIS_NODE, THIS_NODE, 9821), "accept", None),
    (Packet("eth0", OTHER_NODE, THIS_NODE, 9820), "accept", None),
    (Packet("eth0", A("203.0.113.9"), THIS_NODE, 9820), "accept", None),
    # Anyone else: not to this node.
    (Packet("eth0", OUTSIDE, THIS_NODE, 9820), "drop", COUNTER_ENDPOINT_OTHER),
    (Packet("eth0", OUTSIDE, A("192.0.2.201"), 9821), "drop", COUNTER_ENDPOINT_OTHER),
    (Packet("eth0", OUTSIDE, OTHER_NODE, 9820), "accept", None),  # routed through: not ours
], ids=["pod to its node", "pod to an egress IP here", "pod to the gateway node",
        "pod to another node", "remote pod through the mesh", "pod to a pod",
        "pod to another port", "pod to the outside", "scraper pod to its node",
        "scraper pod to the gateway node", "loopback probe", "node to itself",
        "another node", "an allowed source", "the outside host",
        "the outside host to an egress IP", "forwarded past this node"])
def test_who_reaches_the_endpoints(packet, verdict, counter) -> None:
    assert evaluate(compute_ruleset(SPEC), packet) == (verdict, counter)


def test_without_ports_there_is_no_guard() -> None:
    ruleset = compute_ruleset(FirewallSpec((N("198.18.0.0/16"),), endpoint_ports=()))
    assert CHAIN_GUARD_ENDPOINTS not in {c.name for c in ruleset.chains}
    assert not {SET_NODES, SET_ENDPOINT_PODS} & {s.name for s in ruleset.sets}


@pytest.mark.parametrize("spec", [
    {"endpoint_ports": (0,)}, {"endpoint_ports": (70000,)}, {"endpoint_ports": (True,)},
    {"node_networks": (ipaddress.IPv6Network("2001:db8::/64"),)},
    {"endpoint_allowed_pods": ("198.18.1.1",)},
    {"endpoint_allowed_sources": ("2001:db8::/64",)},
], ids=["port 0", "port too large", "a boolean", "IPv6 node", "a string", "IPv6 source"])
def test_bad_input_is_refused(spec) -> None:
    with pytest.raises(ValueError):
        FirewallSpec((N("198.18.0.0/16"),), **spec)


def test_the_agent_options_parse_ports_and_sources() -> None:
    assert parse_ports("9820, 9821,") == (9820, 9821)
    assert parse_cidrs("203.0.113.0/28,192.0.2.7") == (N("203.0.113.0/28"), N("192.0.2.7/32"))
    for bad in ("98x", "0", "65536"):
        with pytest.raises(Exception, match="not a TCP port"):
            parse_ports(bad)
    for bad in ("203.0.113.1/28", "2001:db8::/64", "nope"):
        with pytest.raises(Exception):  # noqa: B017 - argparse's own error type
            parse_cidrs(bad)


def test_node_addresses_merge_into_the_fewest_networks() -> None:
    def nets(*addresses: str) -> list[str]:
        return [str(n) for n in compute_node_networks(A(a) for a in addresses)]

    assert nets("192.0.2.12", "192.0.2.11", "192.0.2.101", "192.0.2.11") == [
        "192.0.2.11/32", "192.0.2.12/32", "192.0.2.101/32"]
    assert nets("10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8") == [
        "10.0.0.4/30", "10.0.0.8/32"]
    assert nets(*(str(A("10.1.0.0") + i) for i in range(256))) == ["10.1.0.0/24"]
    assert nets() == []
