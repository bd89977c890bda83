"""`meshgress explain POD [--to IP]`: which egress path a pod's traffic takes, and why.

No other egress implementation answers "which egress IP will pod X use?". This one does,
from the same pure decision function the node agents and gateways run
(`meshgress.egress.compute_egress`), so the answer cannot drift from what the dataplane
does: every policy that could apply is listed in the order packets try them, with why it
selects the pod or not, whether it lost on priority or a conflict, which excluded range
applied to the destination, and the gateway's slots with their holders and egress IPs.
A policy or gateway whose current spec is invalid says that it runs on its last valid
generation and why; objects the datastore could not read are named, since the answer
leaves them out.

`explain_pod` is pure; `collect_and_explain` reads the datastore.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from typing import Any

from meshgress.cluster import SlotHolder, parse_node, parse_slot_holder
from meshgress.config import ClusterConfig
from meshgress.datastore import Datastore, Kind, RejectedObject
from meshgress.egress import (
    EgressModel,
    PolicyView,
    compute_egress,
    namespace_labels,
    pod_view,
    range_contains,
    ranges_to_cidrs,
)
from meshgress.selectors import LabelSelector, matches


class ExplainError(ValueError):
    """The pod or address asked about does not exist or is malformed."""


def _describe_selector(selector: LabelSelector) -> str:
    if selector.is_empty:
        return "everything"
    parts = [f"{k}={v}" for k, v in selector.match_labels]
    parts += [f"{r.key} {r.operator.value} {list(r.values)}" if r.values
              else f"{r.key} {r.operator.value}" for r in selector.match_expressions]
    return ", ".join(parts)


def _why_excluded(view: PolicyView, to: ipaddress.IPv4Address,
                  cluster: ClusterConfig, node_addresses: set[str]) -> str | None:
    assert view.policy is not None
    if range_contains(view.destinations, to):
        return None
    for cidr in view.policy.excluded_cidrs:
        if to in cidr:
            return f"excluded by its excludedCIDRs entry {cidr}"
    for cidr in cluster.pod_cidrs:
        if to in cidr:
            return f"always excluded: the cluster pod range {cidr}"
    for cidr in cluster.service_cidrs:
        if to in cidr:
            return f"always excluded: the service range {cidr}"
    if str(to) in node_addresses:
        return "always excluded: a node address"
    return "not in its destinationCIDRs " + ", ".join(map(str, view.policy.destination_cidrs))


def explain_pod(*, model: EgressModel, pod: Mapping[str, Any],
                namespace_labels_: Mapping[str, str], holders: Mapping[Any, SlotHolder],
                cluster: ClusterConfig, node_addresses: set[str],
                to: ipaddress.IPv4Address | None,
                rejected: Sequence[RejectedObject] = ()) -> list[str]:
    """Purely computational. `rejected`: objects the datastore could not read."""
    view = pod_view(pod)
    lines = [f"pod {view.namespace}/{view.name} on {view.node or '?'}, IP {view.ip or '?'}",
             f"  namespace labels: {dict(namespace_labels_) or '{}'}",
             f"  pod labels: {dict(view.labels) or '{}'}"]
    lines += [f"  ! left out, the datastore cannot read it: {item.describe()}"
              for item in rejected]
    lines.append("policies, in the order packets try them:")
    # As nodes try them: applied policies by priority, then those that only drop (their
    # gateway missing or invalid), then the rest (shown, never applied).
    ordered = sorted(model.policies.values(),
                     key=lambda v: (0 if v.accepted else 1 if v.drops_selected else 2,
                                    v.policy.priority if v.policy else 1 << 30, v.name))
    applied: PolicyView | None = None
    for policy_view in ordered:
        line, applies = _policy_line(policy_view, (view.namespace, view.name),
                                     namespace_labels_=namespace_labels_, to=to,
                                     cluster=cluster, node_addresses=node_addresses,
                                     applied=applied)
        lines.append(line)
        if applies:
            applied = policy_view
    return lines + _verdict(model, applied, holders, to)


def _policy_line(policy_view: PolicyView, key: tuple[str, str], *,
                 namespace_labels_: Mapping[str, str], to: ipaddress.IPv4Address | None,
                 cluster: ClusterConfig, node_addresses: set[str],
                 applied: PolicyView | None) -> tuple[str, bool]:
    """What one policy does for the pod, and whether it is the one that applies."""
    policy = policy_view.policy
    if policy is None:
        return f"  - {policy_view.name}: invalid, ignored ({policy_view.message})", False
    stale = (f"; runs on generation {policy.generation}, its last valid one: generation "
             f"{policy_view.current_generation} is invalid: {policy_view.rejected}"
             if policy_view.on_last_valid_generation else "")
    head = f"  - {policy_view.name} (priority {policy.priority}, gateway {policy.gateway}{stale})"
    if key not in policy_view.selected:
        if not matches(policy.namespace_selector, namespace_labels_):
            why = f"namespaceSelector [{_describe_selector(policy.namespace_selector)}] " \
                  "does not match the namespace"
        else:
            why = f"podSelector [{_describe_selector(policy.pod_selector)}] does not " \
                  "match the pod"
        return f"{head}: does not select this pod: {why}", False
    if not policy_view.accepted and not policy_view.drops_selected:
        return (f"{head}: selects this pod but is NOT applied: "
                f"{policy_view.reason}: {policy_view.message}", False)
    if to is not None:
        excluded = _why_excluded(policy_view, to, cluster, node_addresses)
        if excluded:
            return f"{head}: selects this pod, but not for {to}: {excluded}", False
    if applied is not None:
        return f"{head}: selects this pod, but {applied.name} comes first", False
    suffix = f" for {to}" if to is not None else ""
    if policy_view.drops_selected:
        return (f"{head}: selects this pod -> DROPS its traffic{suffix}: "
                f"{policy_view.reason}: {policy_view.message}", True)
    return f"{head}: selects this pod -> APPLIES{suffix}", True


def _verdict(model: EgressModel, applied: PolicyView | None,
             holders: Mapping[Any, SlotHolder], to: ipaddress.IPv4Address | None) -> list[str]:
    target = f"to {to}" if to is not None else "to outside the cluster"
    if applied is None or applied.policy is None:
        return [f"verdict: traffic {target} is not steered: it leaves through its node "
                "and is masqueraded to the node's address"]
    if applied.drops_selected:
        return [f"verdict: traffic {target} is dropped (fail closed) until EgressGateway "
                f"{applied.policy.gateway} exists and is valid"]
    gateway = model.gateways[applied.policy.gateway]
    assert gateway.gateway is not None
    lines = [f"verdict: through EgressGateway {gateway.name} "
             f"({gateway.gateway.failure_policy.value})"]
    if gateway.on_last_valid_generation:
        lines.append(f"  EgressGateway {gateway.name} runs on generation "
                     f"{gateway.gateway.generation}, its last valid one: generation "
                     f"{gateway.current_generation} is invalid: {gateway.error}")
    if to is None:
        cidrs = ranges_to_cidrs(applied.destinations)
        shown = ", ".join(map(str, cidrs[:6])) + (" …" if len(cidrs) > 6 else "")
        lines.append(f"  for destinations {shown}")
    for slot, ip in gateway.slots:
        holder = holders.get(slot)
        who = f"held by {holder.holder} on {holder.node}" if holder else "NOT HELD"
        lines.append(f"  slot {slot.index}: egress IP {ip}, {who}")
    for disabled_ip, why in sorted(gateway.disabled_ips.items()):
        lines.append(f"  egress IP {disabled_ip} is not served: {why}")
    held = [str(ip) for slot, ip in gateway.slots if slot in holders]
    if held:
        lines.append(f"  each flow is pinned to one slot by a hash of its addresses and ports "
                     f"(kept in conntrack): the source outside sees is one of "
                     f"{', '.join(held)}")
    else:
        fate = ("dropped" if gateway.gateway.failure_policy.value == "FailClosed"
                else "sent out through its node (FailOpen)")
        lines.append(f"  no slot is held: this traffic is {fate}")
    return lines


def collect_and_explain(store: Datastore, cluster: ClusterConfig, target: str,
                        to: str | None) -> list[str]:
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name:
        raise ExplainError(f"explain: give the pod as NAMESPACE/NAME, not {target!r}")
    to_ip: ipaddress.IPv4Address | None = None
    if to is not None:
        try:
            parsed = ipaddress.ip_address(to)
        except ValueError:
            raise ExplainError(f"explain: --to {to!r} is not an IP address") from None
        if not isinstance(parsed, ipaddress.IPv4Address):
            raise ExplainError("explain: only IPv4 destinations are steered")
        to_ip = parsed
    listed = {kind: store.list(kind) for kind in (Kind.POD, Kind.NAMESPACE, Kind.NODE,
                                                  Kind.EGRESS_GATEWAY, Kind.EGRESS_POLICY,
                                                  Kind.LEASE)}
    pods = listed[Kind.POD].items
    pod = next((p for p in pods if p["metadata"].get("namespace") == namespace
                and p["metadata"]["name"] == name), None)
    if pod is None:
        raise ExplainError(f"explain: no pod {namespace}/{name}")
    namespaces = namespace_labels(listed[Kind.NAMESPACE].items)
    nodes = [parse_node(n) for n in listed[Kind.NODE].items]
    addresses = [n.internal_ip for n in nodes if n.internal_ip is not None]
    model = compute_egress(gateways=listed[Kind.EGRESS_GATEWAY].items,
                           policies=listed[Kind.EGRESS_POLICY].items,
                           namespaces=namespaces, pods=[pod_view(p) for p in pods],
                           node_addresses=addresses, cluster=cluster)
    now = time.time()
    holders = {h.slot: h for h in (parse_slot_holder(o, now)
                                   for o in listed[Kind.LEASE].items) if h}
    return explain_pod(model=model, pod=pod, namespace_labels_=namespaces.get(namespace, {}),
                       holders=holders, cluster=cluster,
                       node_addresses={str(a) for a in addresses}, to=to_ip,
                       rejected=[r for result in listed.values() for r in result.rejected])
