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
- a typo never fails open: an object whose current generation is invalid keeps applying
  its last valid generation, recorded in its status (`meshgress.api`'s
  `parse_*_in_effect`), and says why; only an object that never had a valid generation
  applies nothing (a policy: not accepted, reason Invalid);
- a policy naming a gateway that is missing or has no valid generation is not accepted,
  with a reason;
- a newcomer never steals a live egress IP: an IP listed by several gateways is served
  by the one created first (oldest `metadata.creationTimestamp`; equal ones go to the
  name that sorts first; an object without one counts as the newest), and the others
  name it in their `ip_conflicts` and serve their other IPs;
- the cluster has at most MAX_SLOTS slots (one per served egress IP; the API caps each
  gateway, not their sum): they go to the gateways in that same order, each one's IPs in
  spec order, so a newcomer never takes an established gateway's slot. IPs left over
  are served by nobody; their gateway lists them in its `over_slot_limit`.

Purely computational: no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from meshgress.api import (
    EgressGateway,
    EgressPolicy,
    IPAddress,
    parse_egress_gateway_in_effect,
    parse_egress_policy_in_effect,
)
from meshgress.config import ClusterConfig
from meshgress.selectors import matches
from meshgress.slots import MAX_SLOTS, SlotId

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
    """The generation that applies: the current one, else the last valid one, else None."""
    error: str | None
    """Why the current generation is invalid; None when it is valid."""
    slots: tuple[tuple[SlotId, ipaddress.IPv4Address | ipaddress.IPv6Address], ...]
    """The slots that may be served: every egress IP no older gateway lists, within the
    cluster's MAX_SLOTS."""
    disabled_ips: Mapping[str, str] = field(default_factory=dict)
    """Egress IP → why it is not served."""
    ip_conflicts: Mapping[str, str] = field(default_factory=dict)
    """Egress IP → the (older) gateway that serves it instead of this one."""
    spec: Mapping[str, Any] | None = None
    """The spec of `gateway` as written (for status.acceptedSpec)."""
    current_generation: int = 1
    over_slot_limit: tuple[str, ...] = ()
    """Egress IPs of this gateway that get no slot, in spec order: the cluster's MAX_SLOTS
    slots went to older gateways and to this one's earlier IPs."""

    @property
    def on_last_valid_generation(self) -> bool:
        return self.gateway is not None and self.error is not None


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
    """The generation that applies (the current one when none does)."""
    rejected: str | None = None
    """Why the current generation is invalid; None when it is valid."""

    @property
    def drops_selected(self) -> bool:
        """Not applied because its gateway is missing or invalid: the traffic it selects
        that no applied policy steers is dropped meanwhile, as FailClosed does — a typo in
        a gateway's name never lets selected pods leave with their node's address."""
        return self.policy is not None and self.reason in ("GatewayNotFound",
                                                           "GatewayInvalid")
    spec: Mapping[str, Any] | None = None
    """The spec of `policy` as written (for status.acceptedSpec)."""
    current_generation: int = 1

    @property
    def on_last_valid_generation(self) -> bool:
        return self.policy is not None and self.rejected is not None


@dataclass(frozen=True)
class EgressModel:
    gateways: Mapping[str, GatewayView]
    policies: Mapping[str, PolicyView]
    always_excluded: tuple[IPv4Range, ...] = ()
    """The cluster pod range, the service range and every node address, merged."""

    def over_slot_limit(self) -> dict[str, tuple[str, ...]]:
        """Gateway → its egress IPs that get no slot (only gateways that have some)."""
        return {name: view.over_slot_limit for name, view in sorted(self.gateways.items())
                if view.over_slot_limit}


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
        effect = parse_egress_policy_in_effect(obj)
        policy = effect.value
        rejected = None if effect.rejected is None else str(effect.rejected)
        if policy is None:
            assert rejected is not None
            staged.append(PolicyView(name, None, False, "Invalid", rejected,
                                     generation=effect.generation, rejected=rejected,
                                     current_generation=effect.generation))
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
            reason, message, accepted = (
                "GatewayNotFound", f"EgressGateway {policy.gateway} does not exist: the "
                f"traffic of the {len(selected)} pods it selects is dropped until it does",
                False)
        elif gw.gateway is None:
            reason, message, accepted = (
                "GatewayInvalid", f"EgressGateway {policy.gateway} is invalid: {gw.error}; "
                f"the traffic of the {len(selected)} pods it selects is dropped until it is "
                "valid", False)
        elif rejected is not None:
            reason, message, accepted = (
                "LastValidGeneration",
                f"generation {policy.generation}, the last valid one, applies "
                f"({len(selected)} pods selected): generation {effect.generation} is "
                f"invalid: {rejected}", True)
        else:
            reason, message, accepted = "Accepted", f"{len(selected)} pods selected", True
        staged.append(PolicyView(name, policy, accepted, reason, message,
                                 destinations=destinations,
                                 excluded=tuple(excluded), requested=requested,
                                 selected=selected, namespaces=in_namespaces,
                                 generation=policy.generation, rejected=rejected,
                                 spec=effect.spec, current_generation=effect.generation))
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


def _created(obj: Mapping[str, Any]) -> datetime | None:
    """metadata.creationTimestamp, or None when it is missing or unreadable."""
    meta = obj.get("metadata")
    value = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    if not isinstance(value, str):
        return None
    try:
        created = datetime.fromisoformat(value)
    except ValueError:
        return None
    return created if created.tzinfo is not None else None


def _seniority(name: str, created: datetime | None) -> tuple[bool, float, str]:
    """Sorts the gateway that serves a contested egress IP first: the oldest, then by name;
    one without a creation time after every one with it."""
    return created is None, created.timestamp() if created else 0.0, name


def _why_not_served(ip: IPAddress, owner: str, owner_created: datetime | None,
                    created: datetime | None) -> str:
    def shown(when: datetime | None) -> str:
        return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else "no creationTimestamp"

    if owner_created is not None and created is not None and owner_created == created:
        why = f"created at the same time ({shown(created)}) and named first"
    else:
        why = f"created first ({shown(owner_created)}; this one: {shown(created)})"
    return (f"egress IP {ip} is served by EgressGateway {owner}, {why}; this gateway does "
            "not serve it")


def _over_slot_limit_reason(ip: IPAddress) -> str:
    return (f"egress IP {ip} gets no slot: at most {MAX_SLOTS} egress IPs are served "
            "across all EgressGateways, given to the gateways created first (then by "
            "name), each in spec order, and none is left for it")


def _compute_gateways(objs: Iterable[Mapping[str, Any]],
                      cluster: ClusterConfig) -> dict[str, GatewayView]:
    parsed = {_name(obj): (parse_egress_gateway_in_effect(obj, cluster), _created(obj))
              for obj in objs}
    by_seniority = sorted(parsed, key=lambda name: _seniority(name, parsed[name][1]))
    owners: dict[IPAddress, str] = {}
    for name in by_seniority:
        gw = parsed[name][0].value
        for ip in gw.egress_ips if gw else ():
            owners.setdefault(ip, name)
    # The slots, in the order they get one of the MAX_SLOTS.
    slotted: set[SlotId] = set()
    for name in by_seniority:
        gw = parsed[name][0].value
        for index, ip in enumerate(gw.egress_ips if gw else ()):
            if owners[ip] == name and len(slotted) < MAX_SLOTS:
                slotted.add(SlotId(name, index))
    views: dict[str, GatewayView] = {}
    for name, (effect, created) in sorted(parsed.items()):
        gw = effect.value
        slots: list[tuple[SlotId, IPAddress]] = []
        disabled: dict[str, str] = {}
        conflicts: dict[str, str] = {}
        over_limit: list[str] = []
        for index, ip in enumerate(gw.egress_ips if gw else ()):
            owner = owners[ip]
            if owner != name:
                disabled[str(ip)] = _why_not_served(ip, owner, parsed[owner][1], created)
                conflicts[str(ip)] = owner
            elif SlotId(name, index) not in slotted:
                disabled[str(ip)] = _over_slot_limit_reason(ip)
                over_limit.append(str(ip))
            else:
                slots.append((SlotId(name, index), ip))
        views[name] = GatewayView(
            name, gw, None if effect.rejected is None else str(effect.rejected), tuple(slots),
            disabled, conflicts, effect.spec, effect.generation,
            over_slot_limit=tuple(over_limit))
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
