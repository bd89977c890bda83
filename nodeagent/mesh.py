"""What this node's share of the WireGuard mesh should be, computed from the cluster.

Given the Node objects and this node's own key, MTU and cluster ranges, `compute_mesh`
returns the desired `meshgress0` device (one peer per other node that publishes a valid
key and endpoint, allowed-ips = that node's pod CIDRs), the routes that send each remote
pod CIDR into the tunnel, and the fail-closed fallback that makes every other address of
the cluster pod range unreachable rather than routable over the underlay.

Nodes whose annotations are malformed, or whose pod CIDRs collide with another node's,
are left out with a reason (for logs, metrics and `meshgress status`): their pod range
then falls to the unreachable fallback — dropped, never leaked.

Purely computational: no I/O, no clocks (the caller passes `now`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from meshgress.config import ClusterConfig
from meshgress.kernel_ids import ROUTE_PROTOCOL, WIREGUARD_INTERFACE, WIREGUARD_PORT
from wireguard.keys import is_valid_key, normalise_key
from wireguard.model import Device, Peer, normalise_endpoint

PUBLIC_KEY_ANNOTATION = "meshgress.io/wireguard-public-key"
ENDPOINT_ANNOTATION = "meshgress.io/wireguard-endpoint"

IPV4_OVERHEAD = 60
"""Outer IPv4 (20) + UDP (8) + WireGuard (32) bytes per packet."""
IPV6_OVERHEAD = 80
"""Outer IPv6 (40) + UDP (8) + WireGuard (32) bytes per packet."""


@dataclass(frozen=True)
class NodeInfo:
    """The parts of a Node object the mesh needs, parsed and validated."""

    name: str
    pod_cidrs: tuple[ipaddress.IPv4Network, ...]
    internal_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    public_key: str | None
    endpoint: str | None
    problems: tuple[str, ...] = ()


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    """Never raises: what cannot be used is dropped and named in `problems`."""
    meta = _mapping(obj.get("metadata"))
    name = str(meta.get("name") or "")
    annotations = _mapping(meta.get("annotations"))
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    problems: list[str] = []

    raw_cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    cidrs: list[ipaddress.IPv4Network] = []
    for raw in raw_cidrs if isinstance(raw_cidrs, list) else []:
        try:
            net = ipaddress.ip_network(str(raw), strict=True)
        except ValueError:
            problems.append(f"spec.podCIDRs: {raw!r} is not a CIDR")
            continue
        if isinstance(net, ipaddress.IPv4Network):
            cidrs.append(net)

    internal_ip = None
    for addr in status.get("addresses") or []:
        if isinstance(addr, dict) and addr.get("type") == "InternalIP":
            try:
                internal_ip = ipaddress.ip_address(str(addr.get("address")))
                break
            except ValueError:
                problems.append(f"status.addresses: {addr.get('address')!r} is not an IP")

    key = annotations.get(PUBLIC_KEY_ANNOTATION)
    public_key = None
    if key is not None:
        if isinstance(key, str) and is_valid_key(key):
            public_key = normalise_key(key)
        else:
            problems.append(f"{PUBLIC_KEY_ANNOTATION}: not a WireGuard public key")

    raw_endpoint = annotations.get(ENDPOINT_ANNOTATION)
    endpoint = None
    if raw_endpoint is not None:
        try:
            endpoint = normalise_endpoint(str(raw_endpoint))
        except ValueError as exc:
            problems.append(f"{ENDPOINT_ANNOTATION}: {exc}")

    return NodeInfo(name=name, pod_cidrs=tuple(sorted(cidrs)), internal_ip=internal_ip,
                    public_key=public_key, endpoint=endpoint, problems=tuple(problems))


RouteType = Literal["unicast", "unreachable"]


@dataclass(frozen=True, order=True)
class RouteSpec:
    """One route meshgress owns in the main table (tagged with ROUTE_PROTOCOL)."""

    dst: ipaddress.IPv4Network
    type: RouteType = "unicast"
    oif: str | None = None
    protocol: int = ROUTE_PROTOCOL


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
    skipped: Mapping[str, str] = field(default_factory=dict)
    """node name → why it is not a peer."""


def compute_mtu(underlay_mtu: int, underlay_is_ipv6: bool) -> int:
    return underlay_mtu - (IPV6_OVERHEAD if underlay_is_ipv6 else IPV4_OVERHEAD)


def _colliding_cidrs(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """Nodes whose pod CIDRs overlap another node's, with the reason. Both sides of a
    collision are left out: picking one would be picking at random.

    A sweep over the CIDRs sorted by start address, so 5,000 nodes cost a sort, not 25
    million comparisons: a CIDR overlaps an earlier one exactly when it starts before the
    furthest end seen so far."""
    spans = sorted((int(c.network_address), int(c.broadcast_address), n.name, c)
                   for n in nodes for c in n.pod_cidrs)
    bad: dict[str, str] = {}
    reach: tuple[int, str, ipaddress.IPv4Network] | None = None
    for start, end, name, cidr in spans:
        if reach is not None and start <= reach[0] and reach[1] != name:
            other, other_cidr = reach[1], reach[2]
            bad.setdefault(name, f"pod CIDR {cidr} overlaps {other}'s {other_cidr}")
            bad.setdefault(other, f"pod CIDR {other_cidr} overlaps {name}'s {cidr}")
        if reach is None or end > reach[0]:
            reach = (end, name, cidr)
    return bad


def compute_mesh(inputs: MeshInputs) -> MeshState:
    collisions = _colliding_cidrs(inputs.nodes)
    peers: list[Peer] = []
    routes: list[RouteSpec] = []
    names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    own_key = Device(inputs.interface, private_key=inputs.private_key).public_key
    for node in sorted(inputs.nodes, key=lambda n: n.name):
        if node.name == inputs.self_name:
            continue
        reason = None
        if node.name in collisions:
            reason = collisions[node.name]
        elif node.public_key is None:
            reason = node.problems[0] if node.problems else "no public key published yet"
        elif node.endpoint is None:
            reason = "no endpoint published yet"
        elif not node.pod_cidrs:
            reason = "no IPv4 pod CIDR"
        elif node.public_key == own_key:
            reason = "publishes this node's own public key"
        elif node.public_key in names:
            reason = f"publishes the same public key as {names[node.public_key]}"
        if reason is not None:
            skipped[node.name] = reason
            continue
        assert node.public_key is not None
        names[node.public_key] = node.name
        peers.append(Peer(node.public_key, endpoint=node.endpoint, allowed_ips=node.pod_cidrs))
        routes.extend(RouteSpec(dst=cidr, oif=inputs.interface) for cidr in node.pod_cidrs)
    for cidr in inputs.cluster.pod_cidrs:
        if isinstance(cidr, ipaddress.IPv4Network):
            routes.append(RouteSpec(dst=cidr, type="unreachable"))
    device = Device(inputs.interface, private_key=inputs.private_key,
                    listen_port=inputs.listen_port, mtu=inputs.mtu, peers=peers)
    return MeshState(device=device, routes=tuple(sorted(routes)), peer_names=names,
                     skipped=skipped)


def compute_node_annotations(public_key: str, endpoint_ip: str, port: int) -> dict[str, str]:
    """What this node publishes on its own Node object."""
    address = ipaddress.ip_address(endpoint_ip)
    host = f"[{address}]" if address.version == 6 else str(address)
    return {PUBLIC_KEY_ANNOTATION: public_key, ENDPOINT_ANNOTATION: f"{host}:{port}"}
