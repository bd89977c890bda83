"""What this gateway process should serve, computed from the cluster's objects.

`compute_egress` (shared with node agents and `meshgress explain`) decides which
policies are accepted, which pods they select and which slots every gateway has; this
module turns that into the gateway's own terms:

- `compute_servable_slots`: the slots this node may hold (its labels match the
  gateway's nodeSelector, the egress IP is IPv4);
- `compute_allowed_sources`: per gateway, the pod IPs it may SNAT;
- `compute_slot_peers`: one WireGuard peer per node that publishes a key (allowed-ips =
  its pod CIDRs, endpoint learnt from the node's own packets);
- `compute_slot_dataplane`: everything one held slot needs on this node, as one value;
- `compute_lease_annotations`: what the holder publishes on the slot's Lease.

Spec-derived values (`SlotInfo`) and runtime-derived ones (which slots are held) stay in
separate types, as in Cilium's egress gateway: only the process decides what it holds.

Purely computational: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgress.egress import EgressModel, PodView
from meshgress.selectors import matches
from meshgress.slots import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    SlotId,
    assign_slot_numbers,
    gateway_mark,
    gateway_port,
    gateway_table,
    slot_number_of_port,
)
from nodeagent.mesh import NodeInfo
from wireguard.model import Device, Peer, format_endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNDERLAY_OVERHEAD_IPV4 = 60
"""Outer IPv4 + UDP + WireGuard bytes per packet (as the mesh computes its MTU)."""

LEASE_ANNOTATIONS = (PUBLIC_KEY_ANNOTATION, ENDPOINT_ANNOTATION, EGRESS_IP_ANNOTATION,
                     HOLDER_NODE_ANNOTATION)
"""Every annotation the holder of a slot publishes on its Lease."""


@dataclass(frozen=True, order=True)
class SlotInfo:
    """One servable slot as the spec defines it."""

    slot: SlotId
    egress_ip: ipaddress.IPv4Address
    interface: str | None
    """External interface named by the EgressGateway; None: the default-route one."""


@dataclass(frozen=True)
class ServableSlots:
    slots: tuple[SlotInfo, ...]
    skipped: Mapping[SlotId, str] = field(default_factory=dict)
    """Slots this node matches but cannot serve, with the reason (for logs)."""


def node_labels(obj: Mapping[str, Any] | None) -> dict[str, str]:
    meta = obj.get("metadata") if obj else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def compute_servable_slots(model: EgressModel, labels: Mapping[str, str]) -> ServableSlots:
    """Slots of valid gateways whose nodeSelector matches this node. IPv6 egress IPs
    are skipped with a reason: this gateway serves IPv4 only (for now)."""
    slots: list[SlotInfo] = []
    skipped: dict[SlotId, str] = {}
    for name in sorted(model.gateways):
        view = model.gateways[name]
        gw = view.gateway
        if gw is None or not matches(gw.node_selector, labels):
            continue
        for slot, ip in view.slots:
            if isinstance(ip, ipaddress.IPv4Address):
                slots.append(SlotInfo(slot, ip, gw.interface))
            else:
                skipped[slot] = f"egress IP {ip} is IPv6, which this gateway does not serve yet"
    return ServableSlots(tuple(sorted(slots)), skipped)


def compute_slot_numbers(model: EgressModel, kept: Mapping[SlotId, int]
                         ) -> dict[SlotId, int]:
    """A stable number (port, mark, table) for every slot of every valid gateway; `kept`
    is what this process used so far (see meshgress.slots.assign_slot_numbers).

    Raises ValueError when there are more slots than numbers (a permanent error)."""
    return assign_slot_numbers(
        [slot for view in model.gateways.values() for slot, _ in view.slots], kept)


def compute_kept_numbers(records: Mapping[SlotId, Mapping[str, str]], node: str
                         ) -> dict[SlotId, int]:
    """The numbers this node published on the leases of slots it holds (or held): the
    port of the endpoint. A restarted gateway keeps them, so its endpoints do not move."""
    kept: dict[SlotId, int] = {}
    for slot, notes in records.items():
        if notes.get(HOLDER_NODE_ANNOTATION) != node:
            continue
        _, _, port = str(notes.get(ENDPOINT_ANNOTATION) or "").rpartition(":")
        number = slot_number_of_port(int(port)) if port.isdigit() else None
        if number is not None:
            kept[slot] = number
    return kept


def compute_allowed_sources(model: EgressModel, pods: Iterable[PodView]
                            ) -> dict[str, tuple[ipaddress.IPv4Address, ...]]:
    """Gateway name → the IPv4 addresses of pods selected by an accepted policy that
    names it, sorted. Pods without an address yet are left out."""
    ips: dict[tuple[str, str], ipaddress.IPv4Address] = {
        (p.namespace, p.name): p.ip for p in pods if p.ip is not None}
    allowed: dict[str, set[ipaddress.IPv4Address]] = {}
    for view in model.policies.values():
        if not view.accepted or view.policy is None:
            continue
        bucket = allowed.setdefault(view.policy.gateway, set())
        bucket.update(ips[key] for key in view.selected if key in ips)
    return {name: tuple(sorted(found)) for name, found in sorted(allowed.items())}


@dataclass(frozen=True)
class PeerSet:
    peers: tuple[Peer, ...]
    names: Mapping[str, str] = field(default_factory=dict)
    """public key → node name."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """node name → why it is not a peer."""


def compute_slot_peers(nodes: Iterable[NodeInfo], own_public_key: str) -> PeerSet:
    """One peer per node that publishes a valid key and has an IPv4 pod CIDR.

    The endpoint is left unset: a node always speaks first (its traffic or its probe),
    and WireGuard learns where from. Nodes whose pod CIDRs overlap another node's are
    both left out (cryptokey routing cannot tell them apart), as are duplicate keys.
    """
    listed = sorted(nodes, key=lambda n: n.name)
    skipped: dict[str, str] = {}
    for i, a in enumerate(listed):
        for b in listed[i + 1:]:
            for ca in a.pod_cidrs:
                for cb in b.pod_cidrs:
                    if ca.overlaps(cb):
                        skipped.setdefault(a.name, f"pod CIDR {ca} overlaps {b.name}'s {cb}")
                        skipped.setdefault(b.name, f"pod CIDR {cb} overlaps {a.name}'s {ca}")
    names: dict[str, str] = {}
    peers: list[Peer] = []
    for node in listed:
        if node.name in skipped:
            continue
        reason = None
        if node.public_key is None:
            reason = node.problems[0] if node.problems else "no public key published yet"
        elif not node.pod_cidrs:
            reason = "no IPv4 pod CIDR"
        elif node.public_key == own_public_key:
            reason = "publishes this gateway's own public key"
        elif node.public_key in names:
            reason = f"publishes the same public key as {names[node.public_key]}"
        if reason is not None:
            skipped[node.name] = reason
            continue
        assert node.public_key is not None
        names[node.public_key] = node.name
        peers.append(Peer(node.public_key, allowed_ips=node.pod_cidrs))
    return PeerSet(tuple(peers), names, dict(sorted(skipped.items())))


@dataclass(frozen=True)
class SlotDataplane:
    """Everything one held slot needs on this node."""

    slot: SlotId
    egress_ip: ipaddress.IPv4Address
    number: int
    external_interface: str
    allowed_sources: tuple[ipaddress.IPv4Address, ...]
    device: Device

    @property
    def interface(self) -> str:
        return self.slot.gateway_interface

    @property
    def mark(self) -> int:
        return gateway_mark(self.number)

    @property
    def table(self) -> int:
        return gateway_table(self.number)

    @property
    def suffix(self) -> str:
        """The slot's hash, for names of nftables objects (`mgeg` stripped)."""
        return self.slot.gateway_interface[len("mgeg"):]


def compute_mtu(external_mtu: int) -> int:
    return external_mtu - UNDERLAY_OVERHEAD_IPV4


def compute_slot_dataplane(info: SlotInfo, *, number: int, external_interface: str,
                           external_mtu: int, allowed_sources: Iterable[ipaddress.IPv4Address],
                           private_key: str, peers: PeerSet) -> SlotDataplane:
    device = Device(info.slot.gateway_interface, private_key=private_key,
                    listen_port=gateway_port(number), mtu=compute_mtu(external_mtu),
                    peers=peers.peers)
    return SlotDataplane(slot=info.slot, egress_ip=info.egress_ip, number=number,
                         external_interface=external_interface,
                         allowed_sources=tuple(sorted(set(allowed_sources))), device=device)


def compute_lease_annotations(*, public_key: str, internal_ip: IPAddress, slot: SlotId,
                              egress_ip: IPAddress, node: str,
                              number: int | None) -> dict[str, str]:
    """What the holder of `slot` publishes on its Lease (see meshgress.slots). Without the
    slot's number the endpoint is left out (only the other fields are compared then)."""
    wanted = {
        PUBLIC_KEY_ANNOTATION: public_key,
        EGRESS_IP_ANNOTATION: str(egress_ip),
        HOLDER_NODE_ANNOTATION: node,
    }
    if number is not None:
        wanted[ENDPOINT_ANNOTATION] = format_endpoint(internal_ip, gateway_port(number))
    return wanted


def annotations_to_clear(current: Mapping[str, str] | None,
                         wanted: Mapping[str, str]) -> dict[str, None]:
    """The slot annotations a new holder must remove at once: any left by the previous
    holder that differ from what this holder will publish (so node agents never pair the
    new holder's lease with the old holder's key or endpoint)."""
    current = current or {}
    return {key: None for key in LEASE_ANNOTATIONS
            if key in current and current.get(key) != wanted.get(key)}
