"""`meshgress status`: this node's mesh as the kernel has it, checked against the cluster.

Honest status means comparing the two ends, not echoing what the agent meant to do: for
every other node it shows the public key that node publishes next to the key configured
for it here, the endpoint, the latest handshake and the traffic counters, and it checks
this node's own published key against the key its interface really has, and the
interface's MTU against the one computed from the underlay. It also names every object
the datastore cannot read (the agents and gateways skip those, so part of the
configuration is not in effect). Any mismatch or unreadable object is reported and makes
the command exit non-zero, so it can gate scripts and probes.

`compute_status_report` is pure; `collect_status` reads the kernel and the datastore.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgress.cluster import NodeInfo, parse_node
from meshgress.datastore import Datastore, Kind, RejectedObject
from meshgress.kernel_ids import WIREGUARD_INTERFACE
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

    @property
    def mesh_healthy(self) -> bool:
        return not self.problems and all(not p.problems for p in self.peers)

    @property
    def healthy(self) -> bool:
        return self.mesh_healthy and not self.rejected

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "interfacePresent": self.interface_present,
            "ownKeyPublished": self.own_key_published,
            "ownKeyConfigured": self.own_key_configured,
            "mtu": self.mtu, "expectedMTU": self.expected_mtu, "healthy": self.healthy,
            "meshHealthy": self.mesh_healthy, "problems": list(self.problems),
            "rejectedObjects": [{
                "kind": r.kind.value, "namespace": r.namespace, "name": r.name,
                "source": r.source, "reason": r.reason} for r in self.rejected],
            "peers": [{
                "node": p.node, "publishedKey": p.published_key,
                "configuredKey": p.configured_key, "endpoint": p.endpoint,
                "allowedIPs": list(p.allowed_ips), "handshakeAgeSeconds": p.handshake_age,
                "rxBytes": p.rx_bytes, "txBytes": p.tx_bytes, "problems": list(p.problems),
            } for p in self.peers],
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


WATCHED_KINDS = (Kind.NODE, Kind.POD, Kind.NAMESPACE, Kind.EGRESS_GATEWAY, Kind.EGRESS_POLICY,
                 Kind.LEASE)
"""The kinds agents and gateways read: an unreadable object of any of them is skipped."""


def collect_status(node_name: str, store: Datastore, backend: WireGuardBackend,
                   underlay_mtu_of: Any) -> StatusReport:
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
    return compute_status_report(node_name, nodes, device, stats=stats, underlay_mtu=mtu,
                                 now=time.time(), rejected=rejected)


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
    if report.rejected:
        lines.append(f"  datastore: {len(report.rejected)} object(s) cannot be read; every "
                     "process skips them:")
        lines += [f"    ! {r.describe()}" for r in report.rejected]
    return "\n".join(lines)
