"""EgressGateway and EgressPolicy status, computed from the shared view of the cluster.

Every gateway process writes status, and each computes exactly the same thing from the
same inputs — the objects, `compute_egress`, the slot leases and their annotations — so
whichever writes, the result is identical and a process patches only when what is stored
differs. Conditions keep their lastTransitionTime while their status stays the same, so
two processes never fight over a timestamp (the stored one wins).

Status is for people, with one exception: `acceptedSpec` with `observedGeneration` is the
last valid generation, which every process applies while the current spec is invalid
(`meshgress.api.parse_*_in_effect`). Node agents read leases and that, nothing else.

EgressGateway status:
    conditions: Ready (every servable slot held and published), Degraded (not Ready, an
      egress IP served by an older gateway instead or by nobody, or an invalid spec),
      EgressIPConflict (True naming the gateway that serves an IP this one lists),
      SlotLimitExceeded (True naming the IPs of this one that get no slot: the cluster
      has at most MAX_SLOTS, see `meshgress.egress`), InvalidSpec (True with the parser's
      message while the current generation is invalid); gateways with no valid
      generation get Ready/Degraded with reason Invalid.
    slots: one entry per egress IP, in spec order:
      {ip, index, holder, node, publicKey, endpoint, ready, since}
    observedGeneration: the generation that applies (the current one when none does)
    acceptedSpec: its spec, as written (absent when none applies)
EgressPolicy status:
    conditions: Accepted (reason Accepted/LastValidGeneration/Invalid/GatewayNotFound/
      GatewayInvalid/Conflict), Conflict (True when the reason is Conflict, naming the
      other policies), InvalidSpec (as for gateways)
    selectedPods, observedGeneration, acceptedSpec (as for gateways)

`compute_status_events`: the Warning Events a status change deserves (an invalid spec, an
egress IP conflict, egress IPs over the slot limit, a policy conflict), recorded by the
process that writes the change.

Purely computational: no I/O, no clocks (the caller passes `now`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshgress.api import ACCEPTED_SPEC_FIELD
from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
)
from meshgress.datastore import EventRecord, Kind, Lease, ObjectReference
from meshgress.egress import EgressModel, GatewayView, PolicyView
from meshgress.slots import MAX_SLOTS, SlotId

READY = "Ready"
DEGRADED = "Degraded"
ACCEPTED = "Accepted"
CONFLICT = "Conflict"
EGRESS_IP_CONFLICT = "EgressIPConflict"
SLOT_LIMIT_EXCEEDED = "SlotLimitExceeded"
INVALID_SPEC = "InvalidSpec"
REPORTING_CONTROLLER = "meshgress.io/gateway"


@dataclass(frozen=True)
class SlotRecord:
    """A slot's lease as stored, and the annotations on its Lease object."""

    lease: Lease | None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def format_time(when: float) -> str:
    """Kubernetes metav1.Time: RFC 3339, UTC, whole seconds."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(previous: object, wanted: Sequence[Condition],
                     now: float) -> list[dict[str, str]]:
    """Conditions in Kubernetes shape; lastTransitionTime is kept from `previous` (the
    stored list, any shape) for every condition whose status did not change."""
    before: dict[str, Mapping[str, Any]] = {}
    if isinstance(previous, list):
        for item in previous:
            if isinstance(item, Mapping) and isinstance(item.get("type"), str):
                before[item["type"]] = item
    out: list[dict[str, str]] = []
    for cond in wanted:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old is not None else None
        if old is None or old.get("status") != status or not isinstance(since, str):
            since = format_time(now)
        out.append({"type": cond.type, "status": status, "reason": cond.reason,
                    "message": cond.message, "lastTransitionTime": since})
    return out


def _stored_status(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    status = obj.get("status") if obj else None
    return status if isinstance(status, Mapping) else {}


@dataclass(frozen=True)
class _SlotState:
    entry: dict[str, Any]
    problem: str | None


def _slot_state(slot: SlotId, ip: str, record: SlotRecord | None, now: float) -> _SlotState:
    lease = record.lease if record else None
    annotations = record.annotations if record else {}
    entry: dict[str, Any] = {"ip": ip, "index": slot.index, "holder": None, "node": None,
                             "publicKey": None, "endpoint": None, "ready": False,
                             "since": None}
    if lease is None:
        return _SlotState(entry, "no gateway has claimed it yet")
    if lease.holder is None:
        entry["since"] = format_time(lease.renew_time)
        return _SlotState(entry, "released; no gateway holds it")
    if lease.expired(now):
        expiry = lease.renew_time + lease.duration_seconds
        entry["since"] = format_time(expiry)
        return _SlotState(entry, f"the lease of {lease.holder} expired at {format_time(expiry)}")
    entry.update(holder=lease.holder, since=format_time(lease.acquire_time))
    if annotations.get(HOLDER_ANNOTATION) == lease.holder:  # not a previous holder's
        entry.update(node=annotations.get(HOLDER_NODE_ANNOTATION),
                     publicKey=annotations.get(PUBLIC_KEY_ANNOTATION),
                     endpoint=annotations.get(ENDPOINT_ANNOTATION))
    published = (annotations.get(EGRESS_IP_ANNOTATION) == ip
                 and all(entry[k] for k in ("node", "publicKey", "endpoint")))
    if not published:
        return _SlotState(entry, f"held by {lease.holder}, not published yet")
    entry["ready"] = True
    return _SlotState(entry, None)


def _invalid_spec(rejected: str | None, current: int, applied: int | None) -> Condition:
    if rejected is None:
        return Condition(INVALID_SPEC, False, "Valid", "")
    if applied is None:
        fate = "no earlier valid generation is recorded, so nothing of it applies"
    else:
        fate = f"generation {applied}, the last valid one, still applies"
    return Condition(INVALID_SPEC, True, "Invalid",
                     f"generation {current} is invalid: {rejected}; {fate}")


def _slot_limit(view: GatewayView) -> Condition:
    """One message for all of the gateway's IPs over the limit (up to 126 of them)."""
    over = view.over_slot_limit
    if not over:
        return Condition(SLOT_LIMIT_EXCEEDED, False, "WithinSlotLimit", "")
    return Condition(SLOT_LIMIT_EXCEEDED, True, SLOT_LIMIT_EXCEEDED, (
        f"{len(over)} egress IPs get no slot and are not served ({', '.join(over)}): at "
        f"most {MAX_SLOTS} egress IPs are served across all EgressGateways, given to the "
        "gateways created first (then by name), each in spec order; remove egress IPs "
        "from this gateway or another one"))


def compute_gateway_status(view: GatewayView, obj: Mapping[str, Any] | None,
                           records: Mapping[SlotId, SlotRecord], now: float) -> dict[str, Any]:
    """The status of one EgressGateway. `obj` is the stored object (for its current
    conditions). Purely computational."""
    stored = _stored_status(obj)
    gw = view.gateway
    no_conflict = Condition(EGRESS_IP_CONFLICT, False, "NoConflict", "")
    limit = _slot_limit(view)
    if gw is None:
        message = view.error or "invalid"
        wanted = [Condition(READY, False, "Invalid", message),
                  Condition(DEGRADED, True, "Invalid", message), no_conflict, limit,
                  _invalid_spec(message, view.current_generation, None)]
        return {"conditions": merge_conditions(stored.get("conditions"), wanted, now),
                "slots": [], "observedGeneration": view.current_generation}
    servable = {slot.index: slot for slot, _ in view.slots}
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    ready_count = 0
    for index, ip in enumerate(gw.egress_ips):
        slot = servable.get(index, SlotId(gw.name, index))
        if index not in servable:
            state = _SlotState({"ip": str(ip), "index": index, "holder": None, "node": None,
                                "publicKey": None, "endpoint": None, "ready": False,
                                "since": None}, None)
        else:
            state = _slot_state(slot, str(ip), records.get(slot), now)
            if state.problem is not None and isinstance(ip, ipaddress.IPv6Address) \
                    and state.entry["holder"] is None:
                state = _SlotState(state.entry, "IPv6 egress IPs are not served yet")
        entries.append(state.entry)
        if index in servable:
            if state.problem is None:
                ready_count += 1
            else:
                problems.append(f"{ip} (slot {index}): {state.problem}")
    conflicts = [view.disabled_ips[ip] for ip in sorted(view.ip_conflicts)]
    disabled = conflicts + ([limit.message] if limit.status else [])
    total = len(servable)
    all_ready = total > 0 and ready_count == total
    if all_ready:
        ready = Condition(READY, True, "SlotsReady",
                          f"{total} of {total} egress IPs are held and published")
    elif total == 0:
        ready = Condition(READY, False, "NoServableEgressIPs",
                          "no egress IP can be served: " + "; ".join(disabled))
    else:
        ready = Condition(READY, False, "SlotsNotReady",
                          f"{ready_count} of {total} egress IPs are ready: "
                          + "; ".join(problems))
    invalid = _invalid_spec(view.error, view.current_generation, gw.generation)
    issues = problems + disabled + ([invalid.message] if invalid.status else [])
    conflict = Condition(EGRESS_IP_CONFLICT, True, EGRESS_IP_CONFLICT,
                         "; ".join(conflicts)) if conflicts else no_conflict
    if not issues:
        degraded = Condition(DEGRADED, False, "SlotsReady", "")
    else:
        # Why not Ready, else the first of the other conditions that holds.
        reason = ready.reason if not all_ready else next(
            c.type for c in (conflict, limit, invalid) if c.status)
        degraded = Condition(DEGRADED, True, reason, "; ".join(issues))
    return {"conditions": merge_conditions(stored.get("conditions"),
                                           [ready, degraded, conflict, limit, invalid], now),
            "slots": entries, "observedGeneration": gw.generation,
            ACCEPTED_SPEC_FIELD: dict(view.spec or {})}


def compute_policy_status(view: PolicyView, obj: Mapping[str, Any] | None,
                          now: float) -> dict[str, Any]:
    """The status of one EgressPolicy. Purely computational."""
    stored = _stored_status(obj)
    accepted = Condition(ACCEPTED, view.accepted, view.reason, view.message)
    if view.reason == CONFLICT:
        conflict = Condition(CONFLICT, True, CONFLICT, view.message)
    else:
        conflict = Condition(CONFLICT, False, "NoConflict", "")
    invalid = _invalid_spec(view.rejected, view.current_generation,
                            view.generation if view.policy else None)
    status: dict[str, Any] = {
        "conditions": merge_conditions(stored.get("conditions"), [accepted, conflict, invalid],
                                       now),
        "selectedPods": len(view.selected), "observedGeneration": view.generation}
    if view.policy is not None:
        status[ACCEPTED_SPEC_FIELD] = dict(view.spec or {})
    return status


@dataclass(frozen=True)
class StatusUpdates:
    gateways: Mapping[str, dict[str, Any]]
    policies: Mapping[str, dict[str, Any]]


def compute_status_updates(model: EgressModel, gateway_objects: Mapping[str, Mapping[str, Any]],
                           policy_objects: Mapping[str, Mapping[str, Any]],
                           records: Mapping[SlotId, SlotRecord], now: float) -> StatusUpdates:
    """The statuses that differ from what is stored (only those need a patch).
    Purely computational."""
    gateways: dict[str, dict[str, Any]] = {}
    for name, view in sorted(model.gateways.items()):
        obj = gateway_objects.get(name)
        status = compute_gateway_status(view, obj, records, now)
        if dict(_stored_status(obj)) != status:
            gateways[name] = status
    policies: dict[str, dict[str, Any]] = {}
    for name, pview in sorted(model.policies.items()):
        obj = policy_objects.get(name)
        status = compute_policy_status(pview, obj, now)
        if dict(_stored_status(obj)) != status:
            policies[name] = status
    return StatusUpdates(gateways, policies)


_WARNINGS = {INVALID_SPEC: "Validate", EGRESS_IP_CONFLICT: "AssignEgressIPs",
             SLOT_LIMIT_EXCEEDED: "AssignEgressIPs", CONFLICT: "Validate"}
"""Condition types whose turning True (or changing message while True) is a Warning
Event of the same reason, with the action that failed."""


def compute_status_events(updates: StatusUpdates,
                          gateway_objects: Mapping[str, Mapping[str, Any]],
                          policy_objects: Mapping[str, Mapping[str, Any]], *,
                          reporting_instance: str) -> list[EventRecord]:
    """The Events that `updates` (about to be written over the stored objects) deserve.
    A status written once yields its Events once: the next pass finds it stored.
    Purely computational."""
    events: list[EventRecord] = []
    for kind, statuses, objects in (
            (Kind.EGRESS_GATEWAY, updates.gateways, gateway_objects),
            (Kind.EGRESS_POLICY, updates.policies, policy_objects)):
        for name, status in sorted(statuses.items()):
            obj = objects.get(name) or {"metadata": {"name": name}}
            before = {c.get("type"): c for c in _stored_status(obj).get("conditions") or []
                      if isinstance(c, Mapping)}
            for cond in status["conditions"]:
                action = _WARNINGS.get(cond["type"])
                old = before.get(cond["type"])
                if action is None or cond["status"] != "True" or (
                        old is not None and old.get("status") == "True"
                        and old.get("message") == cond["message"]):
                    continue
                events.append(EventRecord(
                    regarding=ObjectReference.to(kind, obj), reason=cond["type"],
                    note=cond["message"], type="Warning", action=action,
                    reporting_controller=REPORTING_CONTROLLER,
                    reporting_instance=reporting_instance))
    return events
