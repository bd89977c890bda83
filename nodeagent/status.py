"""`meshgress status`: this node's mesh as the kernel has it, checked against the cluster.

Honest status means comparing the two ends, not echoing what the agent meant to do: for
every other node it shows the public key that node publishes next to the key configured
for it here, the endpoint, the latest handshake and the traffic counters, and it checks
this node's own published key against the key its interface really has, and the
interface's MTU against the one computed from the underlay. For every egress slot it
shows the holder its lease names, the key this node's tunnel to the slot points at next
to the key the holder publishes, and whether the slot answers a probe sent now, through
that tunnel as the node's pods' packets go (or, for a slot held on this very node, where
it lives). It also names every object the datastore cannot read (the agents and gateways
skip those, so part of the configuration is not in effect). Any mismatch, silent slot or
unreadable object is reported and makes the command exit non-zero, so it can gate
scripts and probes.

`compute_status_report` and `compute_slot_rows` are pure; `collect_status` reads the
kernel and the datastore, and probes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from meshgress.cluster import NodeInfo, SlotHolder, parse_node, parse_slot_holder
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig
from meshgress.datastore import Datastore, Kind, ListResult, RejectedObject
from meshgress.egress import EgressModel, compute_egress
from meshgress.kernel_ids import WIREGUARD_INTERFACE
from meshgress.slots import SlotId
from nodeagent.prober import probe_once
from nodeagent.steering import ProbeTarget, probe_target
from wireguard.backend import WireGuardBackend
from wireguard.model import Device, Peer, PeerStats, tunnel_mtu

HANDSHAKE_STALE_SECONDS = 180
"""WireGuard re-handshakes every 2 minutes while traffic flows; 3 minutes means stale."""


@dataclass(frozen=True)
class PeerRow:
    node: str
    published_key: str | None
    configured_key: str | None
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    handshake_age: float | None
    rx_bytes: int
    tx_bytes: int
    problems: tuple[str, ...]


@dataclass(frozen=True)
class SlotRow:
    """One egress slot as this node sees it."""

    gateway: str
    index: int
    egress_ip: str
    holder: str | None
    holder_node: str | None
    published_key: str | None
    """The holder's slot key, as its lease publishes it."""
    tunnel_key: str | None
    """The peer key of this node's tunnel to the slot (None: no tunnel, or no peer)."""
    handshake_age: float | None
    held_here: bool
    answered: bool | None
    """Whether it answered the probe sent now (None: not probed, nobody holds it)."""
    problems: tuple[str, ...]


@dataclass(frozen=True)
class StatusReport:
    node: str
    interface_present: bool
    own_key_published: str | None
    own_key_configured: str | None
    mtu: int | None
    expected_mtu: int | None
    peers: tuple[PeerRow, ...]
    problems: tuple[str, ...] = field(default=())
    rejected: tuple[RejectedObject, ...] = ()
    """Objects the datastore cannot read, which every process skips."""
    slots: tuple[SlotRow, ...] = ()

    @property
    def mesh_healthy(self) -> bool:
        return not self.problems and all(not p.problems for p in self.peers)

    @property
    def egress_healthy(self) -> bool:
        return all(not s.problems for s in self.slots)

    @property
    def healthy(self) -> bool:
        return self.mesh_healthy and self.egress_healthy and not self.rejected

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "interfacePresent": self.interface_present,
            "ownKeyPublished": self.own_key_published,
            "ownKeyConfigured": self.own_key_configured,
            "mtu": self.mtu, "expectedMTU": self.expected_mtu, "healthy": self.healthy,
            "meshHealthy": self.mesh_healthy, "egressHealthy": self.egress_healthy,
            "problems": list(self.problems),
            "rejectedObjects": [{
                "kind": r.kind.value, "namespace": r.namespace, "name": r.name,
                "source": r.source, "reason": r.reason} for r in self.rejected],
            "peers": [{
                "node": p.node, "publishedKey": p.published_key,
                "configuredKey": p.configured_key, "endpoint": p.endpoint,
                "allowedIPs": list(p.allowed_ips), "handshakeAgeSeconds": p.handshake_age,
                "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes, "problems": list(p.problems),
            } for p in self.peers],
            "egressSlots": [{
                "gateway": s.gateway, "index": s.index, "egressIP": s.egress_ip,
                "holder": s.holder, "holderNode": s.holder_node,
                "publishedKey": s.published_key, "tunnelKey": s.tunnel_key,
                "handshakeAgeSeconds": s.handshake_age, "heldHere": s.held_here,
                "answered": s.answered, "problems": list(s.problems),
            } for s in self.slots],
        }


def compute_status_report(node_name: str, nodes: list[NodeInfo], device: Device | None, *,
                          stats: tuple[PeerStats, ...], underlay_mtu: int | None,
                          now: float, rejected: tuple[RejectedObject, ...] = ()
                          ) -> StatusReport:
    """Purely computational."""
    own = next((n for n in nodes if n.name == node_name), None)
    problems: list[str] = []
    if own is None:
        problems.append(f"no Node object named {node_name}")
    if device is None:
        problems.append(f"interface {WIREGUARD_INTERFACE} does not exist")
    own_published = own.public_key if own else None
    own_configured = device.public_key if device else None
    if own_published and own_configured and own_published != own_configured:
        problems.append("this node publishes a different public key than its interface has")
    expected_mtu = None
    if own is not None and own.internal_ip is not None and underlay_mtu is not None:
        expected_mtu = tunnel_mtu(underlay_mtu, own.internal_ip.version == 6)
        if device is not None and device.mtu > expected_mtu:
            problems.append(f"MTU {device.mtu} is above underlay MTU {underlay_mtu} minus "
                            f"the WireGuard overhead ({expected_mtu})")
    by_key = {s.public_key: s for s in stats}
    configured = {p.public_key: p for p in device.peers} if device else {}
    rows = [_peer_row(node, configured, by_key, now)
            for node in sorted(nodes, key=lambda n: n.name) if node.name != node_name]
    seen_keys = {row.configured_key for row in rows if row.configured_key}
    rows += [PeerRow(node="?", published_key=None, configured_key=key, endpoint=peer.endpoint,
                     allowed_ips=tuple(str(n) for n in peer.allowed_ips), handshake_age=None,
                     rx_bytes=0, tx_bytes=0,
                     problems=("configured here but no node publishes it",))
             for key, peer in sorted(configured.items()) if key not in seen_keys]
    return StatusReport(node=node_name, interface_present=device is not None,
                        own_key_published=own_published, own_key_configured=own_configured,
                        mtu=device.mtu if device else None, expected_mtu=expected_mtu,
                        peers=tuple(rows), problems=tuple(problems), rejected=rejected)


def _peer_row(node: NodeInfo, configured: Mapping[str, Peer],
              stats: Mapping[str, PeerStats], now: float) -> PeerRow:
    """Another node as this node's device sees it."""
    peer = configured.get(node.public_key) if node.public_key else None
    if peer is None and node.pod_cidrs:
        # A peer configured for this node's pod range but under another key?
        peer = next((p for p in configured.values()
                     if set(node.pod_cidrs) & set(p.allowed_ips)), None)
    problems: list[str] = list(node.problems)
    if node.public_key is None:
        problems.append("publishes no public key")
    if peer is None:
        problems.append("no peer configured here")
    elif node.public_key and peer.public_key != node.public_key:
        problems.append("configured key differs from the published key")
    stat = stats.get(peer.public_key) if peer else None
    age = None
    if stat is not None and stat.last_handshake:
        age = max(0.0, now - stat.last_handshake)
        if age > HANDSHAKE_STALE_SECONDS and stat.tx_bytes:
            problems.append(f"latest handshake {age:.0f}s ago")
    return PeerRow(
        node=node.name, published_key=node.public_key,
        configured_key=peer.public_key if peer else None,
        endpoint=peer.endpoint if peer else node.endpoint,
        allowed_ips=tuple(str(n) for n in peer.allowed_ips) if peer else (),
        handshake_age=age, rx_bytes=stat.rx_bytes if stat else 0,
        tx_bytes=stat.tx_bytes if stat else 0, problems=tuple(problems))


def compute_slot_rows(model: EgressModel, holders: Mapping[SlotId, SlotHolder], *,
                      tunnels: Mapping[str, tuple[Device | None, tuple[PeerStats, ...]]],
                      answered: Set[SlotId], node_name: str, now: float
                      ) -> tuple[SlotRow, ...]:
    """Every slot of every gateway in effect, as this node sees it: its holder, this
    node's tunnel to it (`tunnels`: slot interface → its device and peer counters) and
    whether it `answered` a probe. Purely computational."""
    rows: list[SlotRow] = []
    for name in sorted(model.gateways):
        view = model.gateways[name]
        if view.gateway is None:
            continue
        for slot, ip in view.slots:
            if isinstance(ip, ipaddress.IPv4Address):
                rows.append(_slot_row(slot, ip, holders.get(slot),
                                      tunnel=tunnels.get(slot.node_interface, (None, ())),
                                      answered=slot in answered, node_name=node_name,
                                      now=now))
    return tuple(rows)


def _slot_row(slot: SlotId, ip: ipaddress.IPv4Address, holder: SlotHolder | None, *,
              tunnel: tuple[Device | None, tuple[PeerStats, ...]], answered: bool,
              node_name: str, now: float) -> SlotRow:
    if holder is None:
        return SlotRow(slot.gateway, slot.index, str(ip), None, None, None, None, None,
                       held_here=False, answered=None,
                       problems=("no gateway holds it (its lease is free or expired)",))
    device, stats = tunnel
    peer = device.peers[0] if device is not None and device.peers else None
    held_here = bool(node_name) and holder.node == node_name
    problems: list[str] = []
    if device is None:
        problems.append("this node has no tunnel to it")
    elif peer is None or peer.public_key != holder.public_key:
        configured = f"{peer.public_key[:10]}…" if peer else "no peer"
        problems.append(f"this node's tunnel has {configured}, the holder publishes "
                        f"{holder.public_key[:10]}…")
    if not answered:
        problems.append("held on this node, but its slot interface or egress IP is missing"
                        if held_here else "no answer to a probe through the tunnel")
    stat = next((st for st in stats if peer and st.public_key == peer.public_key), None)
    age = max(0.0, now - stat.last_handshake) if stat and stat.last_handshake else None
    return SlotRow(slot.gateway, slot.index, str(ip), holder.holder, holder.node,
                   holder.public_key, peer.public_key if peer else None, age,
                   held_here=held_here, answered=answered, problems=tuple(problems))


WATCHED_KINDS = (Kind.NODE, Kind.POD, Kind.NAMESPACE, Kind.EGRESS_GATEWAY, Kind.EGRESS_POLICY,
                 Kind.LEASE)
"""The kinds agents and gateways read: an unreadable object of any of them is skipped."""


Prober = Callable[[Sequence[ProbeTarget], str], Set[SlotId]]
"""Which of the targets answer now, probed from the given source address."""


def collect_status(node_name: str, store: Datastore, backend: WireGuardBackend,
                   underlay_mtu_of: Any, *, cluster: ClusterConfig = DEFAULT_CLUSTER_CONFIG,
                   prober: Prober = probe_once) -> StatusReport:
    listed = {kind: store.list(kind) for kind in WATCHED_KINDS}
    rejected = tuple(r for result in listed.values() for r in result.rejected)
    nodes = [parse_node(o) for o in listed[Kind.NODE].items]
    device = backend.read(WIREGUARD_INTERFACE)
    stats = backend.stats(WIREGUARD_INTERFACE) if device else ()
    own = next((n for n in nodes if n.name == node_name), None)
    mtu = None
    if own is not None and own.internal_ip is not None:
        try:
            mtu = underlay_mtu_of(str(own.internal_ip))
        except Exception:
            mtu = None
    now = time.time()
    report = compute_status_report(node_name, nodes, device, stats=stats, underlay_mtu=mtu,
                                   now=now, rejected=rejected)
    slots = _collect_slots(node_name, own, listed, backend=backend, cluster=cluster,
                           prober=prober, now=now)
    return dataclasses.replace(report, slots=slots)


def _collect_slots(node_name: str, own: NodeInfo | None, listed: Mapping[Kind, ListResult],
                   *, backend: WireGuardBackend, cluster: ClusterConfig, prober: Prober,
                   now: float) -> tuple[SlotRow, ...]:
    model = compute_egress(gateways=listed[Kind.EGRESS_GATEWAY].items, policies=(),
                           namespaces={}, pods=(), node_addresses=(), cluster=cluster)
    holders = {h.slot: h for h in (parse_slot_holder(o, now)
                                   for o in listed[Kind.LEASE].items) if h}
    targets: list[ProbeTarget] = []
    tunnels: dict[str, tuple[Device | None, tuple[PeerStats, ...]]] = {}
    for view in model.gateways.values():
        for slot, ip in view.slots:
            if view.gateway is None or not isinstance(ip, ipaddress.IPv4Address):
                continue
            tunnel = backend.read(slot.node_interface)
            tunnels[slot.node_interface] = (
                tunnel, backend.stats(slot.node_interface) if tunnel else ())
            holder = holders.get(slot)
            if holder is not None:
                targets.append(probe_target(slot, ip, holder, node_name,
                                            view.gateway.health_check))
    source = probe_source(own)
    answered = prober(targets, str(source)) if targets and source else set()
    return compute_slot_rows(model, holders, tunnels=tunnels, answered=answered,
                             node_name=node_name, now=now)


def probe_source(own: NodeInfo | None) -> ipaddress.IPv4Address | None:
    """The node's probe address: the network address of its IPv4 pod CIDR."""
    if own is None:
        return None
    return next((c.network_address for c in own.pod_cidrs
                 if isinstance(c, ipaddress.IPv4Network)), None)


def format_status(report: StatusReport) -> str:
    def short(key: str | None) -> str:
        return f"{key[:10]}…" if key else "-"

    lines = [
        f"node {report.node}: mesh {'healthy' if report.mesh_healthy else 'NOT HEALTHY'}",
        f"  {WIREGUARD_INTERFACE}: {'present' if report.interface_present else 'MISSING'}, "
        f"MTU {report.mtu} (expected {report.expected_mtu}), key published "
        f"{short(report.own_key_published)} / configured {short(report.own_key_configured)}",
    ]
    lines += [f"  ! {p}" for p in report.problems]
    lines.append(f"  {'peer':<8} {'published':<12} {'configured':<12} {'endpoint':<20} "
                 f"{'handshake':>10} {'rx':>10} {'tx':>10}")
    for row in report.peers:
        hs = "never" if row.handshake_age is None else f"{row.handshake_age:.0f}s ago"
        lines.append(f"  {row.node:<8} {short(row.published_key):<12} "
                     f"{short(row.configured_key):<12} {row.endpoint or '-':<20} {hs:>10} "
                     f"{row.rx_bytes:>10} {row.tx_bytes:>10}")
        lines += [f"    ! {p}" for p in row.problems]
    if report.slots:
        lines.append(f"egress: {'healthy' if report.egress_healthy else 'NOT HEALTHY'} "
                     "(slots as this node reaches them)")
        lines.append(f"  {'slot':<14} {'egress IP':<16} {'holder':<34} {'tunnel':<12} "
                     f"{'handshake':>10} {'probe':>8}")
    for slot in report.slots:
        where = "on this node" if slot.held_here else f"on {slot.holder_node or '?'}"
        holder = f"{slot.holder} {where}" if slot.holder else "-"
        hs = "-" if slot.handshake_age is None else f"{slot.handshake_age:.0f}s ago"
        probe = {True: "answers", False: "SILENT", None: "-"}[slot.answered]
        lines.append(f"  {slot.gateway + '/' + str(slot.index):<14} {slot.egress_ip:<16} "
                     f"{holder:<34} {short(slot.tunnel_key):<12} {hs:>10} {probe:>8}")
        lines += [f"    ! {p}" for p in slot.problems]
    if report.rejected:
        lines.append(f"  datastore: {len(report.rejected)} object(s) cannot be read; every "
                     "process skips them:")
        lines += [f"    ! {r.describe()}" for r in report.rejected]
    return "\n".join(lines)
