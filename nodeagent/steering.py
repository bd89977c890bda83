"""Egress steering on a node: which local pod's packets are marked for which gateway slot.

From the cluster's egress decisions (`meshgress.egress.compute_egress`), the slot holders
published on leases and the health the prober measured, `compute_steering` derives this
node's share:

- one WireGuard interface per slot (peer = the holder's slot key and endpoint,
  allowed-ips 0.0.0.0/0), carrying the node's probe address; a slot without a holder
  keeps its interface without a peer and without a route to it, so a takeover changes a
  peer in place instead of starting a tunnel (with wireguard-go, a process) from scratch;
- per slot a routing table whose default route is that interface (with a blackhole
  behind it, so a vanished interface never sends its marks to the main table), selected
  by an `ip rule` on the slot's fwmark; and a drop table (`blackhole default`) for
  FailClosed;
- nftables additions to the node's table: per policy a set of its local pods and a set of
  its effective destinations; a prerouting chain that keeps a flow on its slot while the
  slot is healthy (the choice lives in the conntrack mark) and otherwise sends the packet
  through the policies in priority order; per policy a pick chain that spreads flows over
  the gateway's healthy slots by a hash over BUCKETS fixed buckets.

Buckets are assigned so that a failure moves only the failed slot's buckets: bucket b
belongs to slot b mod n when that slot is healthy, else to the healthy slot with the
highest rendezvous weight for b — the same on every node.

Purely computational: no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshgress.api import FailurePolicy, HealthCheck
from meshgress.cluster import SlotHolder
from meshgress.egress import EgressModel, PolicyView, ranges_to_cidrs
from meshgress.kernel.nft_model import Hook as NftHook
from meshgress.kernel.nft_model import (
    NftChain,
    NftCounter,
    NftSet,
    Rule,
    counter_ref,
    goto,
    match,
    meta,
    payload,
    set_ref,
)
from meshgress.kernel_ids import FWMARK_MASK, POD_HOST_VETH_PREFIX
from meshgress.slots import (
    DROP_MARK,
    DROP_TABLE,
    SlotId,
    assign_slot_numbers,
    node_slot_port,
    slot_mark,
    slot_table,
)
from wireguard.model import Device, Peer

BUCKETS = 64
HASH_SEED = 0x6D657368  # "mesh": fixed, so every node hashes a flow the same way
PRIORITY_STEER = -150  # mangle: before routing, after conntrack and the raw-priority guard
CHAIN_STEER = "egress_steer"
SET_HEALTHY = "egress_healthy"
SET_NEVER = "egress_never"
"""The always-excluded destinations (pod and service ranges, node addresses), shared."""
ALL_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class LocalPod:
    namespace: str
    name: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class ProbeTarget:
    slot: SlotId
    interface: str
    address: ipaddress.IPv4Address
    """Where the probe goes through the tunnel: the slot's egress IP, which is up only on
    its holder's node (so the echo also shows the holder has it)."""
    interval_ms: int
    timeout_ms: int
    failure_threshold: int
    local: LocalHolder | None = None
    """Set when the slot's holder runs on this very node: a probe cannot go through the
    tunnel then (the egress IP is this node's own, so the kernel delivers it locally),
    so the slot is checked where it lives instead."""


@dataclass(frozen=True)
class LocalHolder:
    """What shows, on this node, that the gateway holding a slot here serves it: the slot's
    gateway interface exists and its egress IP is up (the gateway keeps the IP up only
    while it renews its lease: the kernel removes it shortly after a renewal is missed)."""

    gateway_interface: str
    egress_ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class SteeringInputs:
    model: EgressModel
    local_pods: tuple[LocalPod, ...]
    holders: Mapping[SlotId, SlotHolder]
    healthy: frozenset[SlotId]
    private_key: str
    mtu: int
    probe_source: ipaddress.IPv4Address
    kept_numbers: Mapping[SlotId, int] = field(default_factory=dict)
    """The number (mark, table) each slot has on this node now, read back from the kernel:
    kept, so that other slots coming and going never renumber a slot under its flows."""
    node_name: str = ""
    """This node: a slot whose holder runs here is checked locally, not probed."""


@dataclass(frozen=True)
class SteeringState:
    devices: tuple[Device, ...]
    probe_targets: tuple[ProbeTarget, ...]
    rules: tuple[tuple[int, int], ...]
    """(fwmark, table) for every slot table and the drop table."""
    routes: tuple[tuple[int, str | None], ...]
    """(table, interface) default routes; interface None = a blackhole (the drop table's
    only route, and each slot table's fallback: `slot_table_routes`)."""
    sets: tuple[NftSet, ...]
    chains: tuple[NftChain, ...]
    buckets: Mapping[str, tuple[int, ...]]
    """gateway → the fwmark of each bucket (0 = not steered, DROP_MARK = dropped)."""
    tenures: Mapping[str, str]
    """slot interface → the holder tenure its peer points at. A new tenure (another
    gateway process, or the same one restarted) needs a fresh WireGuard session even when
    key and endpoint are unchanged: the new process has no session state."""
    numbers: Mapping[SlotId, int] = field(default_factory=dict)
    """slot → its number on this node (see meshgress.slots.assign_slot_numbers)."""
    counters: tuple[NftCounter, ...] = ()
    """One per slot number (flows this node sent into the slot) and one per policy with
    local pods (flows it steered), for metrics."""
    selected_pods: Mapping[str, int] = field(default_factory=dict)
    """policy → how many of this node's pods it selects (accepted policies only)."""
    steered_ips: frozenset[ipaddress.IPv4Address] = frozenset()
    """Addresses of this node's pods whose packets some policy steers."""


def compute_buckets(slots: list[SlotId], healthy: frozenset[SlotId],
                    marks: Mapping[SlotId, int]) -> tuple[int, ...] | None:
    """The slot mark of each bucket, or None when no slot of the gateway is healthy."""
    alive = [s for s in slots if s in healthy]
    if not alive:
        return None
    out: list[int] = []
    for bucket in range(BUCKETS):
        home = slots[bucket % len(slots)]
        if home in healthy:
            out.append(marks[home])
            continue

        def weight(slot: SlotId, b: int = bucket) -> bytes:
            return hashlib.sha256(f"{b}/{slot.gateway}/{slot.index}".encode()).digest()
        out.append(marks[max(alive, key=weight)])
    return tuple(out)


POLICY_COUNTER_PREFIX = "egress_policy_"


def policy_flows_counter(policy: str) -> str:
    """The named counter of the flows a policy steered on this node (new flows, and flows
    re-picked after their slot failed). Policy names may hold '-' and '.', which counter
    names may not: a hash keeps them apart."""
    return POLICY_COUNTER_PREFIX + hashlib.sha256(policy.encode()).hexdigest()[:16]


def slot_flows_counter(number: int) -> str:
    """The named counter of the flows this node steers into the slot with `number`."""
    return f"egress_flows_{number}"


def _policy_key(view: PolicyView) -> tuple[int, str]:
    return (view.policy.priority if view.policy else 0, view.name)


def probe_target(slot: SlotId, egress_ip: ipaddress.IPv4Address, holder: SlotHolder,
                 node_name: str, check: HealthCheck) -> ProbeTarget:
    """How this node checks a held slot: through its tunnel, or where it lives when the
    holder runs on this very node."""
    held_here = (LocalHolder(slot.gateway_interface, egress_ip)
                 if node_name and holder.node == node_name else None)
    return ProbeTarget(slot, slot.node_interface, egress_ip, check.interval_ms,
                       check.timeout_ms, check.failure_threshold, held_here)


@dataclass
class _SlotTunnels:
    devices: list[Device] = field(default_factory=list)
    probes: list[ProbeTarget] = field(default_factory=list)
    tenures: dict[str, str] = field(default_factory=dict)
    rules: list[tuple[int, int]] = field(default_factory=list)
    routes: list[tuple[int, str | None]] = field(default_factory=list)


def _slot_tunnels(inputs: SteeringInputs, numbers: Mapping[SlotId, int]) -> _SlotTunnels:
    """Per slot: its tunnel, and while it has a holder, its probe, table and rule."""
    out = _SlotTunnels()
    for gw in inputs.model.gateways.values():
        if gw.gateway is None:
            continue
        check = gw.gateway.health_check
        for slot, egress_ip in gw.slots:
            if not isinstance(egress_ip, ipaddress.IPv4Address):
                continue  # gateways serve IPv4 egress IPs only: nobody holds this slot
            holder = inputs.holders.get(slot)
            out.devices.append(Device(
                slot.node_interface, private_key=inputs.private_key,
                listen_port=node_slot_port(numbers[slot]),
                mtu=inputs.mtu,
                peers=[Peer(holder.public_key, endpoint=holder.endpoint,
                            allowed_ips=[ALL_IPV4], persistent_keepalive=0)]
                if holder is not None else []))
            if holder is None:
                continue
            out.tenures[slot.node_interface] = holder.tenure
            out.probes.append(probe_target(slot, egress_ip, holder, inputs.node_name,
                                           check))
            out.rules.append((slot_mark(numbers[slot]), slot_table(numbers[slot])))
            out.routes += slot_table_routes(numbers[slot], slot.node_interface)
    return out


def slot_table_routes(number: int, interface: str) -> tuple[tuple[int, str | None], ...]:
    """The routes of the table of the slot numbered `number`: the default route through
    its tunnel and, behind it, a blackhole. Should the tunnel vanish, its route goes with
    it; the blackhole then drops the slot's marked packets, whose lookup would otherwise
    fall through to the main table and leave with the node's address."""
    table = slot_table(number)
    return ((table, interface), (table, None))


def compute_steering(inputs: SteeringInputs) -> SteeringState:
    model = inputs.model
    all_slots = [slot for gw in model.gateways.values() for slot, _ in gw.slots]
    numbers = assign_slot_numbers(all_slots, inputs.kept_numbers)
    marks = {slot: slot_mark(n) for slot, n in numbers.items()}

    tunnels = _slot_tunnels(inputs, numbers)
    devices, probes, tenures = tunnels.devices, tunnels.probes, tunnels.tenures
    rules: list[tuple[int, int]] = [(DROP_MARK, DROP_TABLE), *tunnels.rules]
    routes: list[tuple[int, str | None]] = [(DROP_TABLE, None), *tunnels.routes]
    usable_healthy = frozenset(s for s in inputs.healthy if s in inputs.holders)

    pods_by_key = {(p.namespace, p.name): p for p in inputs.local_pods}
    sets: list[NftSet] = [
        NftSet(SET_HEALTHY, "mark", (), tuple(sorted(
            marks[s] for s in usable_healthy if s in marks))),
        NftSet(SET_NEVER, "ipv4_addr", ("interval",), ranges_to_cidrs(model.always_excluded)),
    ]
    steer_rules: list[Rule] = [
        Rule.of(match(meta("iifname"), POD_HOST_VETH_PREFIX + "*", "!="), {"return": None}),
        Rule.of(match({"&": [{"ct": {"key": "mark"}}, FWMARK_MASK]}, 0, "!="),
                match({"&": [{"ct": {"key": "mark"}}, FWMARK_MASK]}, set_ref(SET_HEALTHY)),
                {"mangle": {"key": meta("mark"),
                            "value": {"&": [{"ct": {"key": "mark"}}, FWMARK_MASK]}}},
                {"return": None}),
    ]
    pick_chains: list[NftChain] = []
    buckets_by_gateway: dict[str, tuple[int, ...]] = {}
    selected_pods: dict[str, int] = {}
    steered: set[ipaddress.IPv4Address] = set()
    policy_counters: list[NftCounter] = []
    # Policies whose gateway is missing or invalid come after every applied one: they drop
    # what no applied policy steers (their own priority cannot be honoured without their
    # gateway), so pods they select never leave with their node's address.
    steered_views = sorted((v for v in model.policies.values()
                            if v.policy and (v.accepted or v.drops_selected)),
                           key=lambda v: (not v.accepted, *_policy_key(v)))
    for number, view in enumerate(steered_views):
        assert view.policy is not None
        local = sorted(pods_by_key[k].ip for k in view.selected if k in pods_by_key)
        if view.accepted:
            selected_pods[view.name] = len(local)
        if not local or not view.destinations:
            continue
        steered.update(local)
        slots: list[SlotId] = []
        if view.drops_selected:
            buckets = tuple([DROP_MARK] * BUCKETS)
        else:
            gw = model.gateways[view.policy.gateway]
            assert gw.gateway is not None
            slots = [slot for slot, _ in gw.slots]
            picked = compute_buckets(slots, usable_healthy, marks)
            if picked is None:
                fallback = (DROP_MARK if gw.gateway.failure_policy is FailurePolicy.FAIL_CLOSED
                            else 0)
                picked = tuple([fallback] * BUCKETS)
            buckets = picked
            buckets_by_gateway[gw.name] = buckets
        prefix = f"ep{number}"
        sets.append(NftSet(f"{prefix}_pods", "ipv4_addr", (), tuple(local)))
        sets.append(NftSet(f"{prefix}_dst", "ipv4_addr", ("interval",),
                           ranges_to_cidrs(view.requested)))
        steer_rules.append(Rule.of(
            match(payload("ip", "saddr"), set_ref(f"{prefix}_pods")),
            match(payload("ip", "daddr"), set_ref(f"{prefix}_dst")),
            match(payload("ip", "daddr"), set_ref(SET_NEVER), "!="),
            counter_ref(policy_flows_counter(view.name)),
            goto(f"{prefix}_pick")))
        policy_counters.append(NftCounter(policy_flows_counter(view.name),
                                          comment=f"flows of EgressPolicy {view.name}"))
        flow = {"concat": [payload("ip", "saddr"), payload("ip", "daddr"),
                           payload("th", "sport"), payload("th", "dport")]}
        count = tuple(Rule.of(match(meta("mark"), marks[slot]),
                              counter_ref(slot_flows_counter(numbers[slot])))
                      for slot in slots if marks[slot] in buckets)
        pick_chains.append(NftChain(f"{prefix}_pick", rules=(
            Rule.of({"mangle": {"key": meta("mark"), "value": {"map": {
                "key": {"jhash": {"mod": BUCKETS, "seed": HASH_SEED, "expr": flow}},
                "data": {"set": [[b, m] for b, m in enumerate(buckets)]}}}}},
                {"mangle": {"key": {"ct": {"key": "mark"}}, "value": meta("mark")}}),
            *count,
        )))
    steer = NftChain(CHAIN_STEER, hook=NftHook("filter", "prerouting", PRIORITY_STEER),
                     rules=tuple(steer_rules))
    return SteeringState(devices=tuple(devices), probe_targets=tuple(probes),
                         rules=tuple(sorted(set(rules))), routes=tuple(sorted(
                             set(routes), key=lambda r: (r[0], r[1] or ""))),
                         sets=tuple(sets), chains=(steer, *pick_chains),
                         buckets=buckets_by_gateway, tenures=tenures, numbers=numbers,
                         counters=(*(NftCounter(slot_flows_counter(n)) for n in
                                     sorted(set(numbers.values()))), *policy_counters),
                         selected_pods=selected_pods, steered_ips=frozenset(steered))
