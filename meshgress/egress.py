"""Egress semantics: which pod's traffic goes to which gateway, and why — for the whole cluster.

Node agents (to steer their own pods), gateways (to know whom to SNAT and to write status)
and `meshgress explain` (to tell a person) all answer the same question, so they share
this one pure function, `compute_egress`, and can never disagree.

Rules, as the design fixes them:
- an EgressPolicy selects pods by namespace labels and pod labels; its destinations are
  `destinationCIDRs` minus `excludedCIDRs` minus what is always excluded (the cluster pod
  range, the service range and every node address);
- a packet takes the lowest-priority-number policy that selects its pod and matches its
  destination; policies of equal priority whose namespace selectors share a namespace and
  whose destinations overlap conflict: both get a Conflict condition naming the other and
  neither is applied (never resolved at random), so lower-priority policies or the plain
  node path take over until a person fixes it. Pod selectors are deliberately not
  compared: every node must reach the same verdict, and a node watches only its own
  pods, while every node sees every namespace;
- an invalid policy, or one naming a gateway that is missing or invalid, is not
  accepted, with a reason; an egress IP listed by two gateways is served by neither
  (a condition on both says why), while their other IPs keep working.

Purely computational: no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgress.api import EgressGateway, EgressPolicy, parse_egress_gateway, parse_egress_policy
from meshgress.config import ClusterConfig
from meshgress.selectors import matches
from meshgress.slots import SlotId
from meshgress.validation import ValidationError

IPv4Range = tuple[int, int]
"""An inclusive range of IPv4 addresses as integers."""


def _ranges(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[IPv4Range]:
    return _merge((int(n.network_address), int(n.broadcast_address))
                  for n in nets if n.version == 4)


def _merge(ranges: Iterable[IPv4Range]) -> list[IPv4Range]:
    """Sorted, with overlapping and adjacent ranges joined."""
    merged: list[IPv4Range] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(a: list[IPv4Range], b: list[IPv4Range]) -> list[IPv4Range]:
    out: list[IPv4Range] = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return out


def _overlap(a: list[IPv4Range], b: list[IPv4Range]) -> bool:
    return any(alo <= bhi and blo <= ahi for alo, ahi in a for blo, bhi in b)


def ranges_to_cidrs(ranges: Iterable[IPv4Range]) -> tuple[ipaddress.IPv4Network, ...]:
    out: list[ipaddress.IPv4Network] = []
    for lo, hi in ranges:
        out.extend(ipaddress.summarize_address_range(ipaddress.IPv4Address(lo),
                                                     ipaddress.IPv4Address(hi)))
    return tuple(out)


def range_contains(ranges: Iterable[IPv4Range], address: ipaddress.IPv4Address) -> bool:
    value = int(address)
    return any(lo <= value <= hi for lo, hi in ranges)


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    labels: Mapping[str, str]
    node: str | None
    ip: ipaddress.IPv4Address | None


@dataclass(frozen=True)
class GatewayView:
    name: str
    gateway: EgressGateway | None
    error: str | None
    slots: tuple[tuple[SlotId, ipaddress.IPv4Address | ipaddress.IPv6Address], ...]
    """The slots that may be served: every egress IP not claimed by another gateway."""
    disabled_ips: Mapping[str, str] = field(default_factory=dict)
    """Egress IP → why it is not served."""


@dataclass(frozen=True)
class PolicyView:
    name: str
    policy: EgressPolicy | None
    accepted: bool
    reason: str
    message: str
    conflicts_with: tuple[str, ...] = ()
    destinations: tuple[IPv4Range, ...] = ()
    """Effective destinations (destinationCIDRs minus everything excluded)."""
    excluded: tuple[IPv4Range, ...] = ()
    """excludedCIDRs plus the always-excluded ranges, for explanations."""
    requested: tuple[IPv4Range, ...] = ()
    """destinationCIDRs minus the policy's own excludedCIDRs: what a node's per-policy set
    holds (the always-excluded ranges are one set shared by every policy, so a node never
    programs "everything except 5,000 node addresses" once per policy)."""
    selected: tuple[tuple[str, str], ...] = ()
    """(namespace, name) of every pod it selects among the pods given (accepted or not)."""
    namespaces: frozenset[str] = frozenset()
    """The namespaces its namespaceSelector matches."""
    generation: int = 1


@dataclass(frozen=True)
class EgressModel:
    gateways: Mapping[str, GatewayView]
    policies: Mapping[str, PolicyView]
    always_excluded: tuple[IPv4Range, ...] = ()
    """The cluster pod range, the service range and every node address, merged."""


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("name") or "") if isinstance(meta, Mapping) else ""


def compute_egress(*, gateways: Iterable[Mapping[str, Any]],
                   policies: Iterable[Mapping[str, Any]],
                   namespaces: Mapping[str, Mapping[str, str]],
                   pods: Iterable[PodView],
                   node_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
                   cluster: ClusterConfig) -> EgressModel:
    """The cluster's egress decisions. `namespaces` maps a namespace to its labels."""
    gateway_views = _compute_gateways(gateways, cluster)
    # Node addresses as integer ranges directly: there may be thousands of them, and this
    # runs on every pass of every agent.
    always_excluded = _merge([*_ranges([*cluster.pod_cidrs, *cluster.service_cidrs]),
                              *((int(a), int(a)) for a in node_addresses if a.version == 4)])
    pod_list = list(pods)
    staged: list[PolicyView] = []
    for obj in policies:
        name = _name(obj)
        generation = _generation(obj)
        try:
            policy = parse_egress_policy(obj)
        except ValidationError as exc:
            staged.append(PolicyView(name, None, False, "Invalid", str(exc),
                                     generation=generation))
            continue
        in_namespaces = frozenset(ns for ns, labels in namespaces.items()
                                  if matches(policy.namespace_selector, labels))
        selected = tuple(sorted(
            (p.namespace, p.name) for p in pod_list
            if p.namespace in in_namespaces and matches(policy.pod_selector, p.labels)))
        own_excluded = _ranges(policy.excluded_cidrs)
        excluded = _merge([*own_excluded, *always_excluded])
        destinations = tuple(_subtract(_ranges(policy.destination_cidrs), excluded))
        requested = tuple(_subtract(_ranges(policy.destination_cidrs), own_excluded))
        gw = gateway_views.get(policy.gateway)
        if gw is None:
            reason, message, accepted = ("GatewayNotFound",
                                         f"EgressGateway {policy.gateway} does not exist", False)
        elif gw.gateway is None:
            reason, message, accepted = ("GatewayInvalid",
                                         f"EgressGateway {policy.gateway} is invalid: {gw.error}",
                                         False)
        else:
            reason, message, accepted = "Accepted", f"{len(selected)} pods selected", True
        staged.append(PolicyView(name, policy, accepted, reason, message,
                                 destinations=destinations,
                                 excluded=tuple(excluded), requested=requested,
                                 selected=selected, namespaces=in_namespaces,
                                 generation=policy.generation))
    conflicts: dict[str, set[str]] = {}
    accepted_views = [v for v in staged if v.accepted and v.policy is not None]
    for i, a in enumerate(accepted_views):
        for b in accepted_views[i + 1:]:
            assert a.policy is not None and b.policy is not None
            if a.policy.priority != b.policy.priority:
                continue
            if a.namespaces & b.namespaces and _overlap(list(a.destinations),
                                                       list(b.destinations)):
                conflicts.setdefault(a.name, set()).add(b.name)
                conflicts.setdefault(b.name, set()).add(a.name)
    views: dict[str, PolicyView] = {}
    for view in staged:
        if view.name in conflicts:
            others = tuple(sorted(conflicts[view.name]))
            assert view.policy is not None
            views[view.name] = dataclasses.replace(
                view, accepted=False, reason="Conflict", conflicts_with=others,
                message=(f"priority {view.policy.priority} is shared with {', '.join(others)}, "
                         "which selects pods in the same namespaces for overlapping "
                         "destinations; neither is applied until the priorities differ"))
        else:
            views[view.name] = view
    return EgressModel(gateways=gateway_views, policies=views,
                       always_excluded=tuple(always_excluded))


def _generation(obj: Mapping[str, Any]) -> int:
    meta = obj.get("metadata")
    value = meta.get("generation") if isinstance(meta, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def _compute_gateways(objs: Iterable[Mapping[str, Any]],
                      cluster: ClusterConfig) -> dict[str, GatewayView]:
    parsed: dict[str, tuple[EgressGateway | None, str | None]] = {}
    for obj in objs:
        name = _name(obj)
        try:
            parsed[name] = (parse_egress_gateway(obj, cluster), None)
        except ValidationError as exc:
            parsed[name] = (None, str(exc))
    owners: dict[str, list[str]] = {}
    for name, (gw, _) in parsed.items():
        for ip in gw.egress_ips if gw else ():
            owners.setdefault(str(ip), []).append(name)
    views: dict[str, GatewayView] = {}
    for name, (gw, error) in sorted(parsed.items()):
        slots: list[tuple[SlotId, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
        disabled: dict[str, str] = {}
        for index, ip in enumerate(gw.egress_ips if gw else ()):
            others = [o for o in owners[str(ip)] if o != name]
            if others:
                disabled[str(ip)] = (f"egress IP {ip} is also listed by EgressGateway "
                                     f"{', '.join(sorted(others))}; neither serves it")
                continue
            slots.append((SlotId(name, index), ip))
        views[name] = GatewayView(name, gw, error, tuple(slots), disabled)
    return views


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pod_view(obj: Mapping[str, Any]) -> PodView:
    """A Pod object reduced to what egress needs; never raises."""
    meta = _mapping(obj.get("metadata"))
    spec = _mapping(obj.get("spec"))
    status = _mapping(obj.get("status"))
    labels = _mapping(meta.get("labels"))
    ip: ipaddress.IPv4Address | None = None
    try:
        parsed = ipaddress.ip_address(str(status.get("podIP") or ""))
        ip = parsed if isinstance(parsed, ipaddress.IPv4Address) else None
    except ValueError:
        ip = None
    return PodView(namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
                   labels={str(k): str(v) for k, v in labels.items()},
                   node=str(spec["nodeName"]) if spec.get("nodeName") else None, ip=ip)


def namespace_labels(objs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for obj in objs:
        meta = _mapping(obj.get("metadata"))
        labels = _mapping(meta.get("labels"))
        out[str(meta.get("name") or "")] = {str(k): str(v) for k, v in labels.items()}
    return out
