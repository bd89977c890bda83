"""The node's own nftables table, `inet meshgress`: what it holds, as a pure function.

Why it exists: the node agent owns this table whole. It keeps the fail-closed promise —
no pod packet leaves on the underlay in plaintext, and no packet from the underlay may
claim a pod source — masquerades unselected pod traffic leaving the cluster, and guards
meshgress's own endpoints (the agent's and the gateway's /metrics, /healthz, /readyz,
which have no authentication): pods never reach them, on this node or another, and
besides loopback only the cluster's nodes and configured sources do. Egress steering adds
its sets, maps and chain to the same table (`nodeagent.steering`); `with_steering` joins
the two.

The generic model, plan and adapter live in `meshgress.kernel`; this module only decides
what this table contains.

Purely computational.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from meshgress.kernel.nft_model import (
    ACCEPT,
    DROP,
    MASQUERADE,
    Hook,
    NftChain,
    NftCounter,
    NftSet,
    Rule,
    Ruleset,
    counter_ref,
    match,
    meta,
    payload,
    set_ref,
)
from meshgress.kernel.rtnetlink import IFNAMSIZ
from meshgress.kernel_ids import (
    EGRESS_INTERFACE_PREFIX,
    NFT_FAMILY,
    NFT_TABLE,
    POD_HOST_VETH_PREFIX,
    WIREGUARD_INTERFACE,
)
from nodeagent.steering import POLICY_COUNTER_PREFIX, SteeringState

TABLE_COMMENT = "managed by meshgress; do not edit"

# Hook priorities (nft's names in brackets). See the chain docstrings in compute_ruleset.
PRIORITY_GUARD_IN = -300
"""[raw] after defragmentation (-400), *before* conntrack (-200)."""
PRIORITY_MASQ = 100
"""[srcnat] the standard source-NAT slot."""
PRIORITY_GUARD_OUT = 110
"""[srcnat + 10] after source NAT, so masqueraded packets already carry the node address."""
PRIORITY_GUARD_ENDPOINTS = 0
"""[filter] after destination NAT (-100): a Service in front of an endpoint is no way
around the guard."""

COUNTER_LEAK_OUT = "leak_out"
COUNTER_SPOOF_IN = "spoof_in"
SET_CLUSTER = "cluster_v4"
SET_NONMASQ = "nonmasq_v4"
CHAIN_GUARD_OUT = "guard_out"
CHAIN_GUARD_IN = "guard_in"
CHAIN_MASQ = "masq"
CHAIN_GUARD_ENDPOINTS = "guard_endpoints"
COUNTER_ENDPOINT_PODS = "endpoint_pods"
COUNTER_ENDPOINT_OTHER = "endpoint_other"
SET_ENDPOINT_PORTS = "endpoint_ports"
SET_NODES = "nodes_v4"
SET_ENDPOINT_ALLOWED = "endpoint_allowed_v4"
SET_ENDPOINT_PODS = "endpoint_pods_v4"


def _networks(values: Iterable[ipaddress.IPv4Network | str]) -> tuple[ipaddress.IPv4Network, ...]:
    nets = []
    for value in values:
        net = ipaddress.ip_network(value, strict=True)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"{value}: only IPv4 networks are supported")
        nets.append(net)
    return tuple(nets)


@dataclass(frozen=True)
class FirewallSpec:
    """What the node's table depends on. CIDRs are normalised (sorted, de-duplicated);
    overlapping or adjacent ones are merged later, when sets are computed."""

    cluster_pod_cidrs: tuple[ipaddress.IPv4Network, ...]
    service_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    mesh_interface: str = WIREGUARD_INTERFACE
    pod_interface_prefix: str = POD_HOST_VETH_PREFIX
    egress_interface_prefix: str = EGRESS_INTERFACE_PREFIX
    masquerade: bool = True
    endpoint_ports: tuple[int, ...] = ()
    """TCP ports of meshgress's endpoints on every node (none: no guard)."""
    node_networks: tuple[ipaddress.IPv4Network, ...] = ()
    """Every node's InternalIP, merged (`compute_node_networks`): the sources allowed
    besides loopback, and the addresses whose endpoints pods must not reach (from another
    node their packets arrive masqueraded, so the guard has to stop them where they
    start)."""
    endpoint_allowed_sources: tuple[ipaddress.IPv4Network, ...] = ()
    """More sources that may reach the endpoints (a monitoring network)."""
    endpoint_allowed_pods: tuple[ipaddress.IPv4Address, ...] = ()
    """Pods on this node that may reach them (say, Prometheus)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cluster_pod_cidrs",
                           tuple(sorted(set(_networks(self.cluster_pod_cidrs)))))
        object.__setattr__(self, "service_cidrs",
                           tuple(sorted(set(_networks(self.service_cidrs)))))
        object.__setattr__(self, "endpoint_allowed_sources",
                           tuple(sorted(set(_networks(self.endpoint_allowed_sources)))))
        for port in self.endpoint_ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"endpoint port {port!r}: not a TCP port")
        object.__setattr__(self, "endpoint_ports", tuple(sorted(set(self.endpoint_ports))))
        if not all(isinstance(v, ipaddress.IPv4Network) for v in self.node_networks):
            raise ValueError("node_networks: only IPv4 networks are supported")
        if not all(isinstance(v, ipaddress.IPv4Address) for v in self.endpoint_allowed_pods):
            raise ValueError("endpoint_allowed_pods: only IPv4 addresses are supported")
        object.__setattr__(self, "endpoint_allowed_pods",
                           tuple(sorted(set(self.endpoint_allowed_pods))))
        for what, name, limit in (
                ("mesh_interface", self.mesh_interface, IFNAMSIZ - 1),
                ("pod_interface_prefix", self.pod_interface_prefix, IFNAMSIZ - 2),
                ("egress_interface_prefix", self.egress_interface_prefix, IFNAMSIZ - 2)):
            if not name or len(name) > limit or any(c in name for c in ' \t\n"*/\\'):
                raise ValueError(f"{what} {name!r}: not a usable interface name or prefix")


def compute_node_networks(addresses: Iterable[ipaddress.IPv4Address]
                          ) -> tuple[ipaddress.IPv4Network, ...]:
    """Node addresses as the fewest networks, sorted: consecutive addresses (nodes of one
    subnet usually are) merge. Works on integers: at 5,000 nodes the standard library's
    collapse takes a tenth of a second. Purely computational."""
    values = sorted({int(a) for a in addresses})
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    nets: list[ipaddress.IPv4Network] = []
    for lo, hi in runs:
        if lo == hi:
            nets.append(ipaddress.IPv4Network(lo))
        else:
            nets.extend(ipaddress.summarize_address_range(ipaddress.IPv4Address(lo),
                                                          ipaddress.IPv4Address(hi)))
    return tuple(nets)


def _collapse(nets: Iterable[ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, ...]:
    """Merge overlapping and adjacent networks: nft refuses overlapping interval elements."""
    return tuple(sorted(ipaddress.collapse_addresses(nets)))


def compute_ruleset(spec: FirewallSpec) -> Ruleset:
    """The node's `inet meshgress` table for `spec`. Purely computational.

    guard_out — filter, postrouting, priority 110 (srcnat + 10): the fail-closed guard.
      It runs after source NAT, so pod traffic that was masqueraded (leaving the cluster
      legitimately) already carries the node address and passes; anything still *from*
      or *to* a cluster pod address that leaves on another interface than loopback, the
      mesh, a pod veth or an egress tunnel would cross the underlay in plaintext: it is
      counted in `leak_out` and dropped.
    guard_in — filter, prerouting, priority -300 (raw): anti-spoofing. A packet that
      arrives on another interface than loopback, the mesh, a pod veth or an egress
      tunnel while claiming a cluster pod source is counted in `spoof_in` and dropped.
      It runs *before* conntrack (-200) on purpose: the check is stateless, and a forged
      packet dropped this early never creates, refreshes or changes the state of a
      conntrack entry (a spoofed pod tuple could otherwise keep a pod's flow alive, feed
      TCP window tracking or poison a NAT mapping), and costs no conntrack lookup in a
      flood. It still runs after defragmentation (-400) and before the egress mangle
      chain (-150), so marking never sees a spoofed packet.
    masq — nat, postrouting, priority 100 (srcnat): pod traffic to anything outside the
      cluster pod and service ranges, leaving on neither the mesh nor an egress tunnel,
      is masqueraded to the node address. Egress tunnels keep the pod source on purpose:
      the gateway selects by it. With `spec.masquerade` False the chain exists but is empty.
    guard_endpoints — filter, prerouting, priority 0 (after dstnat): TCP to the endpoint
      ports. Loopback and the allowed pods pass. A packet from the cluster pod range to
      this node (`fib daddr type local`) or to any node's address is counted in
      `endpoint_pods` and dropped — here, where it starts: masqueraded on its way to
      another node it would arrive there with this node's address. A packet to this node
      from a source that is neither a node nor an allowed source is counted in
      `endpoint_other` and dropped. Traffic the node itself sends never passes prerouting
      (except over loopback), so the node and hostNetwork pods are unaffected, and pod
      traffic to other pods on these ports is untouched. Without `endpoint_ports` there
      is no such chain (nor its sets and counters).
    """
    cluster = _collapse(spec.cluster_pod_cidrs)
    nonmasq = _collapse(spec.cluster_pod_cidrs + spec.service_cidrs)
    pods_wild = spec.pod_interface_prefix + "*"
    egress_wild = spec.egress_interface_prefix + "*"
    trusted = ("lo", spec.mesh_interface, pods_wild, egress_wild)
    saddr, daddr = payload("ip", "saddr"), payload("ip", "daddr")

    guard_out = NftChain(
        CHAIN_GUARD_OUT,
        hook=Hook("filter", "postrouting", PRIORITY_GUARD_OUT),
        rules=(
            *(Rule.of(match(meta("oifname"), name), ACCEPT) for name in trusted),
            Rule.of(match(saddr, set_ref(SET_CLUSTER)), counter_ref(COUNTER_LEAK_OUT), DROP),
            Rule.of(match(daddr, set_ref(SET_CLUSTER)), counter_ref(COUNTER_LEAK_OUT), DROP),
        ),
    )
    guard_in = NftChain(
        CHAIN_GUARD_IN,
        hook=Hook("filter", "prerouting", PRIORITY_GUARD_IN),
        rules=(
            *(Rule.of(match(meta("iifname"), name), ACCEPT) for name in trusted),
            Rule.of(match(saddr, set_ref(SET_CLUSTER)), counter_ref(COUNTER_SPOOF_IN), DROP),
        ),
    )
    masq_rules: tuple[Rule, ...] = ()
    if spec.masquerade:
        masq_rules = (Rule.of(
            match(saddr, set_ref(SET_CLUSTER)),
            match(daddr, set_ref(SET_NONMASQ), "!="),
            match(meta("oifname"), spec.mesh_interface, "!="),
            match(meta("oifname"), egress_wild, "!="),
            MASQUERADE,
        ),)
    masq = NftChain(CHAIN_MASQ, hook=Hook("nat", "postrouting", PRIORITY_MASQ),
                    rules=masq_rules)
    base = Ruleset(
        family=NFT_FAMILY, table=NFT_TABLE, comment=TABLE_COMMENT,
        sets=(
            NftSet(SET_CLUSTER, "ipv4_addr", ("interval",), cluster),
            NftSet(SET_NONMASQ, "ipv4_addr", ("interval",), nonmasq),
        ),
        counters=(
            NftCounter(COUNTER_LEAK_OUT,
                       "plaintext pod traffic dropped before leaving on the underlay"),
            NftCounter(COUNTER_SPOOF_IN,
                       "packets claiming a pod source dropped on a non-cluster interface"),
        ),
        chains=(guard_out, guard_in, masq),
    )
    return _with_endpoint_guard(base, spec) if spec.endpoint_ports else base


def _with_endpoint_guard(base: Ruleset, spec: FirewallSpec) -> Ruleset:
    """`base` plus the guard_endpoints chain, its sets and counters (see compute_ruleset)."""
    saddr, daddr = payload("ip", "saddr"), payload("ip", "daddr")
    dport = match(payload("tcp", "dport"), set_ref(SET_ENDPOINT_PORTS))
    local = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    rules = (
        Rule.of(dport, match(meta("iifname"), "lo"), ACCEPT),
        Rule.of(dport, match(saddr, set_ref(SET_ENDPOINT_PODS)), ACCEPT),
        Rule.of(dport, match(saddr, set_ref(SET_CLUSTER)), local,
                counter_ref(COUNTER_ENDPOINT_PODS), DROP),
        Rule.of(dport, match(saddr, set_ref(SET_CLUSTER)), match(daddr, set_ref(SET_NODES)),
                counter_ref(COUNTER_ENDPOINT_PODS), DROP),
        Rule.of(dport, local, match(saddr, set_ref(SET_NODES), "!="),
                match(saddr, set_ref(SET_ENDPOINT_ALLOWED), "!="),
                counter_ref(COUNTER_ENDPOINT_OTHER), DROP),
    )
    chain = NftChain(CHAIN_GUARD_ENDPOINTS, rules=rules,
                     hook=Hook("filter", "prerouting", PRIORITY_GUARD_ENDPOINTS))
    return Ruleset(
        family=base.family, table=base.table, comment=base.comment,
        sets=(
            *base.sets,
            NftSet(SET_ENDPOINT_PORTS, "inet_service", (), spec.endpoint_ports),
            NftSet(SET_NODES, "ipv4_addr", ("interval",), spec.node_networks),
            NftSet(SET_ENDPOINT_ALLOWED, "ipv4_addr", ("interval",),
                   _collapse(spec.endpoint_allowed_sources)),
            NftSet(SET_ENDPOINT_PODS, "ipv4_addr", (), spec.endpoint_allowed_pods),
        ),
        counters=(
            *base.counters,
            NftCounter(COUNTER_ENDPOINT_PODS,
                       "pod packets to a node's meshgress endpoints, dropped"),
            NftCounter(COUNTER_ENDPOINT_OTHER,
                       "packets from outside the cluster's nodes to this node's meshgress "
                       "endpoints, dropped"),
        ),
        chains=(*base.chains, chain),
    )


def with_steering(base: Ruleset, steering: SteeringState) -> Ruleset:
    """The node's whole table: the guard and masquerade, plus the egress steering. The
    per-policy flow counters come and go with their policies."""
    return Ruleset(family=base.family, table=base.table, comment=base.comment,
                   sets=base.sets + steering.sets, counters=base.counters + steering.counters,
                   chains=base.chains + steering.chains,
                   pruned_counters=(POLICY_COUNTER_PREFIX,))
