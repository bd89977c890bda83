"""The datastore interface: how every meshgress process reads and writes cluster objects.

meshgress runs on two stores that behave alike: Kubernetes itself (production) and a
directory of YAML files (the embedded default the lab and single-machine users run on).
Both hand out Kubernetes-shaped dicts, so the rest of the code is written once against
the small `Datastore` protocol defined here and never learns which store it talks to.

Semantics follow the Kubernetes API on purpose, because that is what the production
backend gives and what informers are built for:

- every write bumps one store-wide, monotonically increasing resource version;
- `list` returns a consistent snapshot plus the resource version it was taken at;
- `watch` resumes after a resource version and delivers every later change of the
  requested kinds, in order; when that history has been compacted away it raises
  `Expired` (the HTTP 410 Gone of Kubernetes) and the caller must list again;
- `replace` with a stale resourceVersion raises `Conflict` (HTTP 409), so a lost
  update is impossible; the `patch_*` calls are read-modify-write inside the store;
- leases carry a holder, a duration and a renew time; a lease can be taken over only
  once it has expired; its holder's release is one guarded write that may also remove
  what the holder published in the lease's annotations, so a late release never touches
  what the next holder published;
- one bad object never stops a process: an object the backend cannot decode (a file that
  is not YAML, a document that is not an object) is left out of `list` and named in
  `ListResult.rejected` instead, so callers sync everything else and report the rest
  (informers keep what they skipped; agents and gateways render it as the
  `*datastore_rejected_objects{kind}` gauge; `meshgress status` lists it). `watch` never
  delivers such an object: a backend that meets one raises `Expired`, so the caller lists
  again and the list names it;
- Events are recorded as `events.k8s.io/v1` objects: `record_event` turns an
  `EventRecord` into one (`event_object`), under a name derived from what makes two
  occurrences "the same" (`event_name`), so a repeat bumps `series.count` of the existing
  Event instead of adding another, as Kubernetes' event recorders do.

This module is the interface, its value types and the pure helpers both backends share:
no I/O.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

Object = dict[str, Any]
"""A Kubernetes-shaped object: apiVersion, kind, metadata, spec, status."""


class Kind(StrEnum):
    """The object kinds meshgress reads and writes."""

    NODE = "Node"
    POD = "Pod"
    NAMESPACE = "Namespace"
    EGRESS_GATEWAY = "EgressGateway"
    EGRESS_POLICY = "EgressPolicy"
    LEASE = "Lease"
    EVENT = "Event"


API_VERSIONS: Mapping[Kind, str] = {
    Kind.NODE: "v1",
    Kind.POD: "v1",
    Kind.NAMESPACE: "v1",
    Kind.EGRESS_GATEWAY: "meshgress.io/v1alpha1",
    Kind.EGRESS_POLICY: "meshgress.io/v1alpha1",
    Kind.LEASE: "coordination.k8s.io/v1",
    Kind.EVENT: "events.k8s.io/v1",
}

NAMESPACED: frozenset[Kind] = frozenset({Kind.POD, Kind.LEASE, Kind.EVENT})
"""Kinds that live in a namespace; all others are cluster-scoped."""

LEASE_NAMESPACE = "meshgress-system"
"""The namespace that holds meshgress's leases (one per egress IP slot)."""


class DatastoreError(Exception):
    """Base of every error a datastore raises."""


class NotFound(DatastoreError):
    """The object does not exist (HTTP 404)."""


class AlreadyExists(DatastoreError):
    """`create` of an object that exists (HTTP 409 AlreadyExists)."""


class Conflict(DatastoreError):
    """`replace` with a resourceVersion that is no longer current (HTTP 409 Conflict)."""


class Expired(DatastoreError):
    """The watch's resource version is older than the kept history (HTTP 410 Gone).

    The caller lists again and watches from the list's resource version.
    """


class LeaseHeld(DatastoreError):
    """The lease is held, unexpired, by another holder."""


class Invalid(DatastoreError):
    """The object is malformed for the store (no name, wrong kind, bad namespace), or the
    store refused it (HTTP 400 and 422: the message is the API server's, for a person)."""


class Forbidden(DatastoreError):
    """The store refused the caller (HTTP 401, 403): a credential or permission problem
    that retrying does not fix."""


class Unavailable(DatastoreError):
    """The store did not answer, or asked to be asked later (HTTP 429, 5xx, a connection
    refused, reset or timed out), and retrying inside the backend did not help in time."""


EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]


class WatchStop(threading.Event):
    """A stop flag for `watch` that wakes the watch at once when set.

    A watch waits for data (a journal change, an HTTP stream), not for its stop flag, so
    a plain Event could only be noticed by waking up now and then to look at it. This one
    also calls what each watch registered with `on_set` (which wakes its wait), so an idle
    watch sleeps until data or the stop comes. A plain Event still works: a watch then
    looks at it every `STOP_POLL` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks_lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0

    def set(self) -> None:
        super().set()
        with self._callbacks_lock:
            callbacks = list(self._callbacks.values())
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when set (now, if it is); returns what unregisters it."""
        with self._callbacks_lock:
            token = self._next
            self._next += 1
            self._callbacks[token] = callback
        if self.is_set():
            callback()

        def unregister() -> None:
            with self._callbacks_lock:
                self._callbacks.pop(token, None)

        return unregister


STOP_POLL = 0.05
"""Seconds between looks at a `stop` flag that is a plain Event (see WatchStop)."""


def wake_on_stop(stop: threading.Event | None, wake: Callable[[], None]
                 ) -> tuple[Callable[[], None], float | None]:
    """Have `wake` called when `stop` is set, if it can tell (a WatchStop). Returns what
    unregisters it, and the longest a watch may wait before looking at `stop` itself:
    None (as long as it likes) or STOP_POLL for a plain Event."""
    if stop is None:
        return (lambda: None), None
    if isinstance(stop, WatchStop):
        return stop.on_set(wake), None
    return (lambda: None), STOP_POLL


@dataclass(frozen=True)
class WatchEvent:
    """One change. For DELETED the object is its last state; BOOKMARK carries no object
    change, only a resource version the watcher has caught up to."""

    type: EventType
    kind: Kind
    object: Object
    resource_version: int


@dataclass(frozen=True)
class RejectedObject:
    """An object the backend could not decode, left out of a list.

    Reported (logged, counted, shown by `meshgress status`) rather than fatal: one bad
    object must not keep a process from syncing everything else."""

    kind: Kind
    namespace: str
    """"" for cluster-scoped kinds (or when the backend cannot tell)."""
    name: str
    """The object's name as far as the backend can tell (a file's stem, a key's last
    segment); "" when it cannot."""
    source: str
    """Where it lives, for a person: a file path, an API path."""
    reason: str
    """Why it was rejected (the decoder's message)."""

    def describe(self) -> str:
        key = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {key or '?'} ({self.source}): {self.reason}"


@dataclass(frozen=True)
class ListResult:
    items: tuple[Object, ...]
    resource_version: int
    rejected: tuple[RejectedObject, ...] = ()
    """Objects of the listed kind that could not be decoded and are not in `items`."""


@dataclass(frozen=True)
class Lease:
    """A coordination.k8s.io Lease reduced to what slot ownership needs.

    Times are wall-clock seconds (time.time()): leases are shared between processes,
    so a monotonic clock cannot be used.
    """

    name: str
    holder: str | None
    duration_seconds: float
    acquire_time: float
    renew_time: float
    transitions: int
    resource_version: int

    def expired(self, now: float) -> bool:
        return self.holder is None or now >= self.renew_time + self.duration_seconds


LEASE_DURATION_ANNOTATION = "meshgress.io/lease-duration-seconds"
"""The exact (fractional) lease duration; spec.leaseDurationSeconds is an integer in
Kubernetes, so it holds the duration rounded up."""


def _parse_time(value: object, field: str) -> float:
    if value in (None, ""):
        return 0.0
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise Invalid(f"lease {field} {value!r} is not an RFC 3339 time") from None


def parse_lease(obj: Object) -> Lease:
    """A Lease object (coordination.k8s.io shape) as the Lease value; raises Invalid."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    annotations = meta.get("annotations") or {}
    try:
        duration = float(annotations.get(LEASE_DURATION_ANNOTATION)
                          or spec.get("leaseDurationSeconds") or 0)
        transitions = int(spec.get("leaseTransitions") or 0)
        resource_version = int(meta.get("resourceVersion") or 0)
    except (TypeError, ValueError) as e:
        raise Invalid(f"lease {meta.get('name')!r} is malformed: {e}") from None
    return Lease(
        name=str(meta.get("name")),
        holder=spec.get("holderIdentity") or None,
        duration_seconds=duration,
        acquire_time=_parse_time(spec.get("acquireTime"), "acquireTime"),
        renew_time=_parse_time(spec.get("renewTime"), "renewTime"),
        transitions=transitions,
        resource_version=resource_version,
    )


def is_lease_renewal(before: Object, after: Object, now: float) -> bool:
    """Whether `after` is `before` renewed and nothing else (same holder, duration,
    annotations; only renewTime and the bookkeeping metadata moved on), while `before`
    had not expired at `now`: a reader of who holds what learns nothing from it. Renewals
    are most of an idle cluster's writes (every held slot's, every second). Purely
    computational; anything it cannot read counts as more than a renewal."""
    def without_renewal(obj: Object) -> Object:
        meta = {k: v for k, v in (obj.get("metadata") or {}).items()
                if k not in ("resourceVersion", "managedFields")}
        spec = {k: v for k, v in (obj.get("spec") or {}).items() if k != "renewTime"}
        return {**obj, "metadata": meta, "spec": spec}

    try:
        if without_renewal(before) != without_renewal(after):
            return False
        lease = parse_lease(before)
    except (Invalid, KeyError, TypeError, AttributeError):
        return False
    return lease.holder is not None and not lease.expired(now)


EventSeverity = Literal["Normal", "Warning"]
"""An Event's `type`: Warning for what a person should act on."""

EVENT_NAMESPACE = "default"
"""Where Events about cluster-scoped objects go (Kubernetes does the same)."""
EVENT_NOTE_LIMIT = 1024
"""Bytes; the API server rejects longer notes (events.k8s.io/v1 validation)."""
EVENT_FIELD_LIMIT = 128
"""Characters the API server accepts in `reason`, `action`, `reportingController` and
`reportingInstance`."""


@dataclass(frozen=True)
class ObjectReference:
    """The object an Event is about (`regarding` in events.k8s.io/v1)."""

    kind: Kind
    name: str
    namespace: str = ""
    uid: str = ""

    @classmethod
    def to(cls, kind: Kind, obj: Mapping[str, Any]) -> ObjectReference:
        """A reference to a stored object (its uid included, when it has one)."""
        meta = obj.get("metadata") or {}
        return cls(kind, str(meta.get("name") or ""), str(meta.get("namespace") or ""),
                   str(meta.get("uid") or ""))


@dataclass(frozen=True)
class EventRecord:
    """One occurrence of something a person should learn about an object.

    Occurrences with the same regarding object, reason, action, type, note and reporting
    controller are one Event whose `series.count` grows (the reporting instance is not
    part of that identity, so several gateways noticing the same thing count up one
    Event)."""

    regarding: ObjectReference
    reason: str
    """UpperCamelCase, machine-readable: `InvalidSpec`, `SlotTakenOver`."""
    note: str
    """For a person; cut to EVENT_NOTE_LIMIT bytes."""
    type: EventSeverity
    action: str
    """What was done or failed: `Validate`, `TakeOver`."""
    reporting_controller: str
    """`meshgress.io/gateway`, `meshgress.io/agent`."""
    reporting_instance: str
    """Which process: the gateway's holder identity, the agent's node."""


def event_namespace(event: EventRecord) -> str:
    return event.regarding.namespace or EVENT_NAMESPACE


def event_name(event: EventRecord) -> str:
    """The Event's object name: the regarding object's name and a digest of the Event's
    identity, so every process (and every backend) finds an earlier occurrence by name."""
    identity = json.dumps([event.regarding.kind.value, event.regarding.namespace,
                           event.regarding.name, event.regarding.uid, event.reason,
                           event.action, event.type, _cut_note(event.note),
                           event.reporting_controller])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    # An object name is at most 253 characters; a cut must not end a label on '-' or '.'.
    stem = event.regarding.name[:200].rstrip("-.") or "object"
    return f"{stem}.{digest}"


def _cut_note(note: str) -> str:
    data = note.encode()
    if len(data) <= EVENT_NOTE_LIMIT:
        return note
    return data[:EVENT_NOTE_LIMIT - 3].decode(errors="ignore") + "..."


def micro_time(when: float) -> str:
    """Kubernetes MicroTime: RFC 3339 in UTC with microseconds."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_object(event: EventRecord, now: float) -> Object:
    """The first occurrence of `event` as an events.k8s.io/v1 Event object.

    Raises Invalid when the API server would refuse it (empty or over-long reason or
    action, an unknown type), so both backends refuse the same Events."""
    for field, value in (("reason", event.reason), ("action", event.action),
                         ("reportingController", event.reporting_controller),
                         ("reportingInstance", event.reporting_instance)):
        if not value or len(value) > EVENT_FIELD_LIMIT:
            raise Invalid(f"Event {field} must be 1 to {EVENT_FIELD_LIMIT} characters, "
                          f"got {value!r}")
    if event.type not in ("Normal", "Warning"):
        raise Invalid(f"Event type must be Normal or Warning, got {event.type!r}")
    regarding: dict[str, str] = {"apiVersion": API_VERSIONS[event.regarding.kind],
                                 "kind": event.regarding.kind.value,
                                 "name": event.regarding.name}
    if event.regarding.namespace:
        regarding["namespace"] = event.regarding.namespace
    if event.regarding.uid:
        regarding["uid"] = event.regarding.uid
    return {
        "apiVersion": API_VERSIONS[Kind.EVENT],
        "kind": Kind.EVENT.value,
        "metadata": {"name": event_name(event), "namespace": event_namespace(event)},
        "eventTime": micro_time(now),
        "reportingController": event.reporting_controller,
        "reportingInstance": event.reporting_instance,
        "action": event.action,
        "reason": event.reason,
        "regarding": regarding,
        "note": _cut_note(event.note),
        "type": event.type,
    }


def event_repeated(stored: Object, event: EventRecord, now: float) -> Object:
    """`stored` (the Event of an earlier occurrence) after one more occurrence: the
    series count goes up and its last observation is now. The reporting instance stays
    the first one's (the API server keeps it immutable). Pure: returns a new object."""
    series = stored.get("series") if isinstance(stored.get("series"), Mapping) else None
    count = series.get("count") if series else None
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 \
        else 1
    return {**stored, "series": {"count": count + 1, "lastObservedTime": micro_time(now)}}


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of an object; namespace is "" for cluster-scoped kinds."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Datastore(Protocol):
    """What every meshgress process needs from the cluster.

    Objects in and out are plain dicts in Kubernetes shape; callers own the copies
    they receive.
    """

    def list(self, kind: Kind, *, namespace: str | None = None,
             field_node_name: str | None = None) -> ListResult:
        """A consistent snapshot of one kind. `field_node_name` keeps only pods
        scheduled to that node (the `spec.nodeName` field selector)."""
        ...

    def get(self, kind: Kind, name: str, namespace: str = "") -> Object:
        """One object; raises NotFound."""
        ...

    def watch(self, kinds: frozenset[Kind], resource_version: int, *,
              stop: threading.Event | None = None,
              bookmark_interval: float = 10.0,
              field_node_name: str | None = None) -> Iterator[WatchEvent]:
        """Every change to `kinds` after `resource_version`, in order, until `stop` is
        set (a `WatchStop` ends it at once, a plain Event within STOP_POLL). Emits a
        BOOKMARK at least every `bookmark_interval` seconds while idle.
        Raises Expired when that history is no longer kept. `field_node_name` (Pods only)
        keeps the changes of pods scheduled to that node, as `list` does."""
        ...

    def create(self, obj: Object) -> Object:
        """Store a new object; raises AlreadyExists. Returns it with its
        resourceVersion, uid, generation and creationTimestamp set."""
        ...

    def replace(self, obj: Object) -> Object:
        """Overwrite an object. With metadata.resourceVersion set, raises Conflict
        unless it is the current one. A spec change bumps metadata.generation; status
        is kept as stored (use patch_status)."""
        ...

    def apply(self, obj: Object) -> Object:
        """Create or overwrite, ignoring resourceVersion (what `kubectl apply` is to a
        person). Status in `obj` is kept only on create."""
        ...

    def delete(self, kind: Kind, name: str, namespace: str = "") -> None:
        """Remove an object; raises NotFound."""
        ...

    def patch_annotations(self, kind: Kind, name: str, annotations: Mapping[str, str | None],
                          namespace: str = "") -> Object:
        """Merge annotations; a None value removes the key. Atomic in the store."""
        ...

    def patch_status(self, kind: Kind, name: str, status: Mapping[str, Any],
                     namespace: str = "") -> Object:
        """Replace the status subresource. Does not bump generation."""
        ...

    def acquire_lease(self, name: str, holder: str, duration_seconds: float) -> Lease:
        """Take or renew a lease: succeeds when it is free, expired, or already held by
        `holder`; otherwise raises LeaseHeld. Atomic between processes."""
        ...

    def release_lease(self, name: str, holder: str, *,
                      clear_annotations: Collection[str] = ()) -> bool:
        """Give a lease up so a standby can take it at once, removing the annotations
        `clear_annotations` names in the same write; a no-op unless `holder` holds it
        (atomic between processes: once another holder took it, nothing is written).
        True when this call released it, False when `holder` did not hold it."""
        ...

    def get_lease(self, name: str) -> Lease | None:
        """The lease's current record, or None when it was never taken."""
        ...

    def record_event(self, event: EventRecord) -> None:
        """Record one occurrence of `event`: create its Event (`event_object`, named by
        `event_name`, in `event_namespace`) or, when an earlier occurrence's Event
        exists, count this one into it (`event_repeated`). Best effort for the caller:
        raises DatastoreError on failure, which it logs and counts but never retries
        for long. The backend keeps Events from growing without bound."""
        ...

    def close(self) -> None:
        ...
