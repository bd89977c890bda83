"""What this node's share of the WireGuard mesh should be, computed from the cluster.

Given the Node objects and this node's own key, MTU and cluster ranges, `compute_mesh`
returns the desired `meshgress0` device (one peer per other node that publishes a valid
key and endpoint, allowed-ips = that node's pod CIDRs), the routes that send each remote
pod CIDR into the tunnel, and the fail-closed fallback that makes every other address of
the cluster pod range unreachable rather than routable over the underlay.

Nodes whose annotations are malformed, or whose pod CIDRs collide with another node's,
are left out with a reason (for logs, metrics and `meshgress status`): their pod range
then falls to the unreachable fallback — dropped, never leaked.

Purely computational: no I/O, no clocks (the caller passes `now`). `NodeParseCache` is
the one stateful helper: it remembers `parse_node`'s answer per Node object, so that a pass
after one Node changed re-parses that one and not all 5,000 (0.3-0.7 s on this project's
machines); `compute_mesh` memoises the Peer each node yields for the same reason (Peer
validation parses keys, endpoints and networks). Both memos key on values, so they change
the cost and never the answer.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from meshgress.config import ClusterConfig
from meshgress.kernel_ids import ROUTE_PROTOCOL, WIREGUARD_INTERFACE, WIREGUARD_PORT
from wireguard.keys import is_valid_key, normalise_key, public_key
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
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashed once: compute_mesh memoises per NodeInfo, and `ipaddress` hashes the pod
        # CIDRs in Python every time.
        object.__setattr__(self, "_hash", hash((
            self.name, tuple((int(c.network_address), c.prefixlen) for c in self.pod_cidrs),
            self.internal_ip and int(self.internal_ip), self.public_key, self.endpoint,
            self.problems)))

    def __hash__(self) -> int:
        return self._hash


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


class NodeParseCache:
    """`parse_node` remembered per Node, by name.

    An entry is reused when the object is the very same one as last time (the informer's
    cache hands out one dict per object until an event replaces it; the entry holds a
    reference, so the identity cannot be recycled) or when both carry the same non-empty
    `metadata.resourceVersion` (the datastore changes it on every write). `parse_all`
    forgets the nodes it was not given, so the cache never outgrows the cluster.
    Thread-safe: the agent's loop and its CNI hook both parse."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Mapping[str, Any], str, NodeInfo]] = {}
        self._by_id: dict[int, tuple[Mapping[str, Any], str, NodeInfo]] = {}
        self._lock = threading.Lock()
        self.parsed = 0
        """How many objects were actually parsed (for tests and benchmarks)."""

    def __len__(self) -> int:
        return len(self._entries)

    def parse(self, obj: Mapping[str, Any]) -> NodeInfo:
        with self._lock:
            return self._parse(obj, self._entries, self._by_id)

    def parse_all(self, objs: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
        """Every object parsed (in the given order); entries of other nodes are dropped."""
        with self._lock:
            kept: dict[str, tuple[Mapping[str, Any], str, NodeInfo]] = {}
            by_id: dict[int, tuple[Mapping[str, Any], str, NodeInfo]] = {}
            infos = [self._parse(obj, kept, by_id) for obj in objs]
            self._entries, self._by_id = kept, by_id
            return infos

    def _parse(self, obj: Mapping[str, Any],
               into: dict[str, tuple[Mapping[str, Any], str, NodeInfo]],
               by_id: dict[int, tuple[Mapping[str, Any], str, NodeInfo]]) -> NodeInfo:
        entry = self._by_id.get(id(obj))
        if entry is not None and entry[0] is obj:  # the same object: nothing to look at
            into[entry[2].name] = by_id[id(obj)] = entry
            return entry[2]
        meta = _mapping(obj.get("metadata"))
        name = str(meta.get("name") or "")
        version = str(meta.get("resourceVersion") or "")
        entry = self._entries.get(name)
        if entry is None or not (entry[0] is obj or (version and entry[1] == version)):
            entry = (obj, version, parse_node(obj))
            self.parsed += 1
        into[name] = by_id[id(obj)] = entry
        return entry[2]


RouteType = Literal["unicast", "unreachable"]


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
    skipped: Mapping[str, str] = field(default_factory=dict)
    """node name → why it is not a peer."""


def compute_mtu(underlay_mtu: int, underlay_is_ipv6: bool) -> int:
    return underlay_mtu - (IPV6_OVERHEAD if underlay_is_ipv6 else IPV4_OVERHEAD)


def _colliding_cidrs(parts: Iterable[_NodeParts]) -> dict[str, str]:
    """Nodes whose pod CIDRs overlap another node's, with the reason. Both sides of a
    collision are left out: picking one would be picking at random.

    A sweep over the CIDRs sorted by start address, so 5,000 nodes cost a sort, not 25
    million comparisons: a CIDR overlaps an earlier one exactly when it starts before the
    furthest end seen so far."""
    spans = sorted(span for p in parts for span in p.spans)
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


@dataclass(frozen=True)
class _NodeParts:
    spans: tuple[tuple[int, int, str, ipaddress.IPv4Network], ...]
    peer: Peer | None
    routes: tuple[RouteSpec, ...]


@functools.lru_cache(maxsize=1 << 14)
def _node_parts(node: NodeInfo, interface: str) -> _NodeParts:
    """What one node contributes to the mesh, memoised: unchanged nodes (the same
    NodeInfo, thanks to NodeParseCache) cost a dictionary lookup, not a Peer's validation."""
    spans = tuple((int(c.network_address), int(c.broadcast_address), node.name, c)
                  for c in node.pod_cidrs)
    peer = None
    if node.public_key is not None and node.endpoint is not None:
        peer = Peer(node.public_key, endpoint=node.endpoint, allowed_ips=node.pod_cidrs)
    routes = tuple(RouteSpec(dst=cidr, oif=interface) for cidr in node.pod_cidrs)
    return _NodeParts(spans, peer, routes)


def _name(node: NodeInfo) -> str:
    return node.name


@functools.lru_cache(maxsize=16)
def _own_public_key(private_key: str) -> str:
    return public_key(private_key)


def compute_mesh(inputs: MeshInputs) -> MeshState:
    nodes = [(n, _node_parts(n, inputs.interface)) for n in sorted(inputs.nodes, key=_name)]
    collisions = _colliding_cidrs(p for _, p in nodes)
    peers: list[Peer] = []
    routes: list[RouteSpec] = []
    names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    own_key = _own_public_key(inputs.private_key)
    for node, parts in nodes:
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
        assert node.public_key is not None and parts.peer is not None
        names[node.public_key] = node.name
        peers.append(parts.peer)
        routes.extend(parts.routes)
    for cidr in inputs.cluster.pod_cidrs:
        if isinstance(cidr, ipaddress.IPv4Network):
            routes.append(RouteSpec(dst=cidr, type="unreachable"))
    device = Device(inputs.interface, private_key=inputs.private_key,
                    listen_port=inputs.listen_port, mtu=inputs.mtu, peers=peers)
    return MeshState(device=device, routes=tuple(sorted(routes, key=route_order)),
                     peer_names=names, skipped=skipped)


def compute_node_annotations(public_key: str, endpoint_ip: str, port: int) -> dict[str, str]:
    """What this node publishes on its own Node object."""
    address = ipaddress.ip_address(endpoint_ip)
    host = f"[{address}]" if address.version == 6 else str(address)
    return {PUBLIC_KEY_ANNOTATION: public_key, ENDPOINT_ANNOTATION: f"{host}:{port}"}
