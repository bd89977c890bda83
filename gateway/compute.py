"""What this gateway process should serve, computed from the cluster's objects.

`compute_egress` (shared with node agents and `meshgress explain`) decides which
policies are accepted, which pods they select and which slots every gateway has; this
module turns that into the gateway's own terms:

- `compute_servable_slots`: the slots this node may hold (its labels match the
  gateway's nodeSelector, the egress IP is IPv4);
- `compute_allowed_sources`: per gateway, the pod IPs it may SNAT;
- `compute_slot_peers`: one WireGuard peer per node that publishes a key (allowed-ips =
  its pod CIDRs, endpoint learnt from the node's own packets);
- `compute_slot_dataplane`: everything one held slot needs on this node, as one value.

What a holder publishes on the slot's Lease is the cluster contract's
(`meshgress.cluster.slot_lease_annotations`).

Spec-derived values (`SlotInfo`) and runtime-derived ones (which slots are held) stay in
separate types, as in Cilium's egress gateway: only the process decides what it holds.

Purely computational: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshgress.cluster import (
    ENDPOINT_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    NodeInfo,
    select_peer_nodes,
)
from meshgress.egress import EgressModel, PodView
from meshgress.selectors import matches
from meshgress.slots import (
    SlotId,
    assign_slot_numbers,
    gateway_mark,
    gateway_port,
    gateway_table,
    slot_number_of_port,
)
from wireguard.model import Device, Peer, tunnel_mtu

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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

    Raises ValueError when there are more slots than numbers, which `compute_egress`
    prevents (it gives out at most MAX_SLOTS)."""
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
    """One peer per node that publishes a valid key and has an IPv4 pod CIDR (the rules
    the mesh follows too: `meshgress.cluster.select_peer_nodes`).

    The endpoint is left unset: a node always speaks first (its traffic or its probe),
    and WireGuard learns where from."""
    selected = select_peer_nodes(nodes, own_public_key=own_public_key, need_endpoint=False)
    peers = tuple(Peer(node.public_key, allowed_ips=node.pod_cidrs)
                  for node in selected.nodes if node.public_key is not None)
    return PeerSet(peers, selected.names, dict(sorted(selected.skipped.items())))


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
        """The slot's hash, for names of nftables objects."""
        return self.slot.suffix


def compute_slot_dataplane(info: SlotInfo, *, number: int, external_interface: str,
                           external_mtu: int, allowed_sources: Iterable[ipaddress.IPv4Address],
                           private_key: str, peers: PeerSet) -> SlotDataplane:
    device = Device(info.slot.gateway_interface, private_key=private_key,
                    listen_port=gateway_port(number),
                    mtu=tunnel_mtu(external_mtu, underlay_is_ipv6=False),
                    peers=peers.peers)
    return SlotDataplane(slot=info.slot, egress_ip=info.egress_ip, number=number,
                         external_interface=external_interface,
                         allowed_sources=tuple(sorted(set(allowed_sources))), device=device)
