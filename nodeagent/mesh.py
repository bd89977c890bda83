"""What this node's share of the WireGuard mesh should be, computed from the cluster.

Given the Node objects and this node's own key, MTU and cluster ranges, `compute_mesh`
returns the desired `meshgress0` device (one peer per other node that publishes a valid
key and endpoint, allowed-ips = that node's pod CIDRs), the routes that send each remote
pod CIDR into the tunnel, and the fail-closed fallback that makes every other address of
the cluster pod range unreachable rather than routable over the underlay.

Which nodes can be peers is the cluster contract's answer (`meshgress.cluster`): nodes
whose annotations are malformed, or whose pod CIDRs collide with another node's, are left
out with a reason (for logs, metrics and `meshgress status`), and their pod range then
falls to the unreachable fallback — dropped, never leaked.

Handshakes are started by one side of each pair only (`is_initiator`). When both sides
of a new pair start sending at the same instant, both would otherwise send a handshake
initiation at once; each consumes the other's, the answers to their own are rejected
("Received invalid response message"), and WireGuard holds both back for its 5 s rekey
timeout: nothing flows for 5 s or more. So the side with the lower public key kicks a
handshake as soon as it adds the peer, and the other side keeps the peer's pod CIDRs on
a silent blackhole route (no packet into the tunnel, so no initiation of its own; TCP
simply retransmits) for a short grace (`handshake_grace`), then kicks once itself and
routes into the mesh (`compute_routes_while_pending`). The agent's mesh manager keeps
the timers; peers found on the device at start count as established.

Purely computational: no I/O, no clocks. `compute_mesh` memoises the Peer each node
yields (Peer validation parses keys, endpoints and networks), so that with
`meshgress.cluster.NodeParseCache` a pass after one Node changed costs one node's work,
not 5,000 nodes'; the memo keys on values, so it changes the cost and never the answer.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshgress.cluster import NodeInfo, select_peer_nodes
from meshgress.config import ClusterConfig
from meshgress.kernel_ids import ROUTE_PROTOCOL, WIREGUARD_INTERFACE, WIREGUARD_PORT
from wireguard.keys import parse_key, public_key
from wireguard.model import Device, Peer

RouteType = Literal["unicast", "unreachable", "blackhole"]

HANDSHAKE_GRACE = 0.3
"""Seconds the responding side of a new pair waits for the initiator's handshake before
starting one itself (it must exceed the underlay's one-way delay plus processing)."""
HANDSHAKE_JITTER = 0.1
"""Up to this much more, per pair, so that no two pairs' timers line up by design."""


@dataclass(frozen=True, order=True)
class RouteSpec:
    """One route meshgress owns in the main table (tagged with ROUTE_PROTOCOL)."""

    dst: ipaddress.IPv4Network
    type: RouteType = "unicast"
    oif: str | None = None
    protocol: int = ROUTE_PROTOCOL
    _order: tuple[int, int, str, str, int] = field(default=(0, 0, "", "", 0), init=False,
                                                   repr=False, compare=False)
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Worked out once per value: 5,000 routes are sorted, hashed and compared on every
        # pass, and `ipaddress` does both in Python. `_order` sorts as the fields do.
        order = (int(self.dst.network_address), self.dst.prefixlen, self.type, self.oif or "",
                 self.protocol)
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_hash", hash(order))

    def __hash__(self) -> int:
        return self._hash


def route_order(route: RouteSpec) -> tuple[int, int, str, str, int]:
    """A sort key equal to RouteSpec's own order, cheap to compare."""
    return route._order


@dataclass(frozen=True)
class MeshInputs:
    self_name: str
    nodes: tuple[NodeInfo, ...]
    private_key: str
    mtu: int
    cluster: ClusterConfig
    listen_port: int = WIREGUARD_PORT
    interface: str = WIREGUARD_INTERFACE


@dataclass(frozen=True)
class MeshState:
    device: Device
    routes: tuple[RouteSpec, ...]
    peer_names: Mapping[str, str] = field(default_factory=dict)
    """public key → node name, for metrics and status."""
    peer_routes: Mapping[str, tuple[RouteSpec, ...]] = field(default_factory=dict)
    """public key → the routes into the mesh for that peer's pod CIDRs."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """node name → why it is not a peer."""


@dataclass(frozen=True)
class _NodeParts:
    peer: Peer | None
    routes: tuple[RouteSpec, ...]


@functools.lru_cache(maxsize=1 << 14)
def _node_parts(node: NodeInfo, interface: str) -> _NodeParts:
    """What one node contributes to the mesh, memoised: unchanged nodes (the same
    NodeInfo, thanks to NodeParseCache) cost a dictionary lookup, not a Peer's validation."""
    peer = None
    if node.public_key is not None and node.endpoint is not None:
        peer = Peer(node.public_key, endpoint=node.endpoint, allowed_ips=node.pod_cidrs)
    routes = tuple(RouteSpec(dst=cidr, oif=interface) for cidr in node.pod_cidrs)
    return _NodeParts(peer, routes)


@functools.lru_cache(maxsize=16)
def _own_public_key(private_key: str) -> str:
    return public_key(private_key)


def compute_mesh(inputs: MeshInputs) -> MeshState:
    selected = select_peer_nodes(inputs.nodes, own_public_key=_own_public_key(inputs.private_key),
                                 own_name=inputs.self_name)
    peers: list[Peer] = []
    routes: list[RouteSpec] = []
    peer_routes: dict[str, tuple[RouteSpec, ...]] = {}
    for node in selected.nodes:
        parts = _node_parts(node, inputs.interface)
        assert parts.peer is not None
        peers.append(parts.peer)
        routes.extend(parts.routes)
        peer_routes[parts.peer.public_key] = parts.routes
    for cidr in inputs.cluster.pod_cidrs:
        if isinstance(cidr, ipaddress.IPv4Network):
            routes.append(RouteSpec(dst=cidr, type="unreachable"))
    device = Device(inputs.interface, private_key=inputs.private_key,
                    listen_port=inputs.listen_port, mtu=inputs.mtu, peers=peers)
    return MeshState(device=device, routes=tuple(sorted(routes, key=route_order)),
                     peer_names=selected.names, peer_routes=peer_routes,
                     skipped=selected.skipped)


def is_initiator(own_public_key: str, peer_public_key: str) -> bool:
    """Whether this side starts the handshakes of the pair: the one whose public key is the
    lower as 32 raw bytes. Both sides compute the same answer."""
    return parse_key(own_public_key) < parse_key(peer_public_key)


def handshake_grace(own_public_key: str, peer_public_key: str) -> float:
    """How long the responding side of a new pair waits before it kicks a handshake
    itself: HANDSHAKE_GRACE plus a per-pair jitter derived from both keys."""
    digest = hashlib.sha256(f"{own_public_key}/{peer_public_key}".encode()).digest()
    return HANDSHAKE_GRACE + HANDSHAKE_JITTER * int.from_bytes(digest[:2], "big") / 0xFFFF


def compute_routes_while_pending(mesh: MeshState, pending: frozenset[str]
                                 ) -> tuple[RouteSpec, ...]:
    """The mesh's routes with those of `pending` peers (new pairs whose handshake this side
    leaves to the other) as blackholes: a packet to them is dropped silently instead of
    entering the tunnel and starting a handshake of its own."""
    if not pending:
        return mesh.routes
    held = {r for key in pending for r in mesh.peer_routes.get(key, ())}
    if not held:
        return mesh.routes
    return tuple(sorted(
        (RouteSpec(dst=r.dst, type="blackhole") if r in held else r for r in mesh.routes),
        key=route_order))
