"""The cluster contract: what meshgress publishes on Kubernetes objects, and how it reads
them back — parsed in this one place.

Agents, gateways, `meshgress explain`, `status` and the lab all look at the same Node
annotations and slot Leases; the components never parse them themselves, they get the
values defined here:

- a Node: its pod CIDRs, InternalIP and the WireGuard key and endpoint its agent
  publishes (`NodeInfo`, `parse_node`, `NodeParseCache`, `node_annotations`);
- which nodes can be WireGuard peers (`select_peer_nodes`): both the mesh and every
  gateway slot need the same answer and the same reasons for leaving a node out;
- a slot Lease: who holds an egress IP slot and how nodes reach that holder
  (`SlotHolder`, `parse_slot_holder`, on top of the datastore's `parse_lease`), and what
  a holder publishes there (`slot_lease_annotations`, `slot_annotations_to_clear`).

Parsers never raise: what cannot be used is left out with a reason a person can act on.
Purely computational: no I/O, no clocks (callers pass `now`). `NodeParseCache` is the one
stateful helper; its memo changes the cost of a pass, never the answer.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from meshgress.datastore import Invalid, parse_lease
from meshgress.slots import SlotId, gateway_port, parse_slot_lease_name
from wireguard.keys import is_valid_key, normalise_key
from wireguard.model import format_endpoint, normalise_endpoint

PUBLIC_KEY_ANNOTATION: Final = "meshgress.io/wireguard-public-key"
"""On a Node: its agent's WireGuard public key. On a slot Lease: the holder's slot key."""
ENDPOINT_ANNOTATION: Final = "meshgress.io/wireguard-endpoint"
"""On a Node: where its mesh interface listens (IP:port). On a slot Lease: where the
holder's slot interface listens."""
EGRESS_IP_ANNOTATION: Final = "meshgress.io/egress-ip"
"""On a slot Lease: the egress IP the holder has up."""
HOLDER_NODE_ANNOTATION: Final = "meshgress.io/holder-node"
"""On a slot Lease: the node the holder runs on."""
HOLDER_ANNOTATION: Final = "meshgress.io/holder"
"""On a slot Lease: the holderIdentity that published the other slot annotations. Taking a
lease over and clearing the previous holder's annotations are two writes; in between,
readers would pair the new holder with the old holder's key and endpoint. They trust the
annotations only while this one names the lease's current holder."""

NODE_ANNOTATIONS: Final = (PUBLIC_KEY_ANNOTATION, ENDPOINT_ANNOTATION)
"""Every annotation an agent publishes on its own Node."""
SLOT_LEASE_ANNOTATIONS: Final = (PUBLIC_KEY_ANNOTATION, ENDPOINT_ANNOTATION,
                                 EGRESS_IP_ANNOTATION, HOLDER_NODE_ANNOTATION,
                                 HOLDER_ANNOTATION)
"""Every annotation the holder of a slot publishes on its Lease."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# --- Nodes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """The parts of a Node object meshgress needs, parsed and validated."""

    name: str
    pod_cidrs: tuple[ipaddress.IPv4Network, ...]
    internal_ip: IPAddress | None
    public_key: str | None
    endpoint: str | None
    problems: tuple[str, ...] = ()
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashed once: the mesh memoises per NodeInfo, and `ipaddress` hashes the pod
        # CIDRs in Python every time.
        object.__setattr__(self, "_hash", hash((
            self.name, tuple((int(c.network_address), c.prefixlen) for c in self.pod_cidrs),
            self.internal_ip and int(self.internal_ip), self.public_key, self.endpoint,
            self.problems)))

    def __hash__(self) -> int:
        return self._hash


def _pod_cidrs(spec: Mapping[str, Any], problems: list[str]) -> list[ipaddress.IPv4Network]:
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
    return cidrs


def _internal_ip(status: Mapping[str, Any], problems: list[str]) -> IPAddress | None:
    addresses = status.get("addresses")
    for addr in addresses if isinstance(addresses, list) else []:
        if isinstance(addr, Mapping) and addr.get("type") == "InternalIP":
            try:
                return ipaddress.ip_address(str(addr.get("address")))
            except ValueError:
                problems.append(f"status.addresses: {addr.get('address')!r} is not an IP")
    return None


def parse_node(obj: Mapping[str, Any]) -> NodeInfo:
    """Never raises: what cannot be used is dropped and named in `problems`."""
    meta = _mapping(obj.get("metadata"))
    annotations = _mapping(meta.get("annotations"))
    problems: list[str] = []
    cidrs = _pod_cidrs(_mapping(obj.get("spec")), problems)
    internal_ip = _internal_ip(_mapping(obj.get("status")), problems)

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

    return NodeInfo(name=str(meta.get("name") or ""), pod_cidrs=tuple(sorted(cidrs)),
                    internal_ip=internal_ip, public_key=public_key, endpoint=endpoint,
                    problems=tuple(problems))


def node_labels(obj: Mapping[str, Any] | None) -> dict[str, str]:
    """A Node's labels as strings ({} when it has none or is not there)."""
    labels = _mapping(_mapping(obj.get("metadata") if obj else None).get("labels"))
    return {str(k): str(v) for k, v in labels.items()}


def node_annotations(public_key: str, endpoint_ip: IPAddress | str,
                     port: int) -> dict[str, str]:
    """What an agent publishes on its own Node."""
    return {PUBLIC_KEY_ANNOTATION: public_key,
            ENDPOINT_ANNOTATION: format_endpoint(ipaddress.ip_address(endpoint_ip), port)}


_Entry = tuple[Mapping[str, Any], str, NodeInfo]


class NodeParseCache:
    """`parse_node` remembered per Node, by name.

    An entry is reused when the object is the very same one as last time (an informer's
    cache hands out one dict per object until an event replaces it; the entry holds a
    reference, so the identity cannot be recycled) or when both carry the same non-empty
    `metadata.resourceVersion` (the datastore changes it on every write). `parse_all`
    forgets the nodes it was not given, so the cache never outgrows the cluster. At 5,000
    nodes this is what makes a pass after one change re-parse one Node, not all.
    Thread-safe: an agent's loop and its CNI hook both parse."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_id: dict[int, _Entry] = {}
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
            kept: dict[str, _Entry] = {}
            by_id: dict[int, _Entry] = {}
            infos = [self._parse(obj, kept, by_id) for obj in objs]
            self._entries, self._by_id = kept, by_id
            return infos

    def _parse(self, obj: Mapping[str, Any], into: dict[str, _Entry],
               by_id: dict[int, _Entry]) -> NodeInfo:
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


# --- which nodes can be peers ---------------------------------------------------------------


@dataclass(frozen=True)
class PeerNodes:
    """The nodes a WireGuard device can have as peers, in name order."""

    nodes: tuple[NodeInfo, ...]
    names: Mapping[str, str] = field(default_factory=dict)
    """public key → node name."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """node name → why it is not a peer."""


def colliding_pod_cidrs(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """Nodes whose pod CIDRs overlap another node's, with the reason. Both sides of a
    collision are left out: cryptokey routing cannot tell them apart, and picking one
    would be picking at random.

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


def select_peer_nodes(nodes: Iterable[NodeInfo], *, own_public_key: str,
                      own_name: str | None = None, need_endpoint: bool = True,
                      collisions: Mapping[str, str] | None = None) -> PeerNodes:
    """The nodes that can be peers of a device whose key is `own_public_key`: each
    publishes a valid key (and, with `need_endpoint`, an endpoint) and has an IPv4 pod
    CIDR that no other node's overlaps; a node publishing the device's own key or another
    node's key is left out. `own_name` (the device's own node) is not considered at all.
    `collisions`: `colliding_pod_cidrs(nodes)` when the caller has it already."""
    everyone = list(nodes)
    # The device's own node counts for collisions: a CIDR overlapping its own is unusable.
    clashes = colliding_pod_cidrs(everyone) if collisions is None else collisions
    listed = sorted((n for n in everyone if n.name != own_name), key=lambda n: n.name)
    names: dict[str, str] = {}
    kept: list[NodeInfo] = []
    skipped: dict[str, str] = {}
    for node in listed:
        reason = _skip_reason(node, clashes, names, own_public_key, need_endpoint)
        if reason is not None:
            skipped[node.name] = reason
            continue
        assert node.public_key is not None
        names[node.public_key] = node.name
        kept.append(node)
    return PeerNodes(tuple(kept), names, skipped)


def _skip_reason(node: NodeInfo, collisions: Mapping[str, str], names: Mapping[str, str],
                 own_public_key: str, need_endpoint: bool) -> str | None:
    if node.name in collisions:
        return collisions[node.name]
    if node.public_key is None:
        return node.problems[0] if node.problems else "no public key published yet"
    if need_endpoint and node.endpoint is None:
        return "no endpoint published yet"
    if not node.pod_cidrs:
        return "no IPv4 pod CIDR"
    if node.public_key == own_public_key:
        return "publishes this device's own public key"
    if node.public_key in names:
        return f"publishes the same public key as {names[node.public_key]}"
    return None


# --- slot Leases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotHolder:
    """A slot's current holder, as published on its lease (only while the lease is valid)."""

    slot: SlotId
    holder: str
    public_key: str
    endpoint: str
    egress_ip: str
    node: str | None
    acquired: float = 0.0
    """The lease's acquireTime: with `holder`, it names one tenure of the slot."""

    @property
    def tenure(self) -> str:
        return f"{self.holder}@{self.acquired}"


def parse_slot_holder(obj: Mapping[str, Any], now: float) -> SlotHolder | None:
    """The holder of a slot lease, or None when it is not a slot lease, is free, expired,
    or lacks what nodes need to reach its holder (published by that holder). Never
    raises."""
    meta = _mapping(obj.get("metadata"))
    slot = parse_slot_lease_name(str(meta.get("name") or ""))
    if slot is None:
        return None
    try:
        lease = parse_lease(dict(obj))
    except (Invalid, KeyError, TypeError, AttributeError):
        return None
    if lease.holder is None or lease.expired(now):
        return None
    notes = _mapping(meta.get("annotations"))
    if notes.get(HOLDER_ANNOTATION) != lease.holder:
        return None
    key = notes.get(PUBLIC_KEY_ANNOTATION)
    if not isinstance(key, str) or not is_valid_key(key):
        return None
    try:
        endpoint = normalise_endpoint(str(notes.get(ENDPOINT_ANNOTATION) or ""))
    except ValueError:
        return None
    node = notes.get(HOLDER_NODE_ANNOTATION)
    return SlotHolder(slot=slot, holder=lease.holder, public_key=key, endpoint=endpoint,
                      egress_ip=str(notes.get(EGRESS_IP_ANNOTATION) or ""),
                      node=str(node) if node is not None else None,
                      acquired=lease.acquire_time)


def slot_lease_annotations(*, holder: str, public_key: str, internal_ip: IPAddress,
                           egress_ip: IPAddress, node: str, number: int | None
                           ) -> dict[str, str]:
    """What the holder of a slot publishes on its Lease. Without the slot's number the
    endpoint is left out (only the other fields are compared then)."""
    wanted = {
        PUBLIC_KEY_ANNOTATION: public_key,
        EGRESS_IP_ANNOTATION: str(egress_ip),
        HOLDER_NODE_ANNOTATION: node,
        HOLDER_ANNOTATION: holder,
    }
    if number is not None:
        wanted[ENDPOINT_ANNOTATION] = format_endpoint(internal_ip, gateway_port(number))
    return wanted


def slot_annotations_to_clear(current: Mapping[str, str] | None,
                              wanted: Mapping[str, str]) -> dict[str, None]:
    """The slot annotations a new holder must remove at once: any left by the previous
    holder that differ from what this holder will publish (so node agents never pair the
    new holder's lease with the old holder's key or endpoint)."""
    current = current or {}
    return {key: None for key in SLOT_LEASE_ANNOTATIONS
            if key in current and current.get(key) != wanted.get(key)}
