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
  once it has expired.

This module is the interface and its value types only: no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
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


API_VERSIONS: Mapping[Kind, str] = {
    Kind.NODE: "v1",
    Kind.POD: "v1",
    Kind.NAMESPACE: "v1",
    Kind.EGRESS_GATEWAY: "meshgress.io/v1alpha1",
    Kind.EGRESS_POLICY: "meshgress.io/v1alpha1",
    Kind.LEASE: "coordination.k8s.io/v1",
}

NAMESPACED: frozenset[Kind] = frozenset({Kind.POD, Kind.LEASE})
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


@dataclass(frozen=True)
class WatchEvent:
    """One change. For DELETED the object is its last state; BOOKMARK carries no object
    change, only a resource version the watcher has caught up to."""

    type: EventType
    kind: Kind
    object: Object
    resource_version: int


@dataclass(frozen=True)
class Rejected:
    """An object the backend could not turn into a usable dict (say, one without a name):
    skipped, and reported so that one bad object never hides all the others."""

    kind: Kind
    name: str
    """What is known of its identity ("" when nothing is)."""
    reason: str


@dataclass(frozen=True)
class ListResult:
    items: tuple[Object, ...]
    resource_version: int
    rejected: tuple[Rejected, ...] = ()


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
        set. Emits a BOOKMARK at least every `bookmark_interval` seconds while idle.
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

    def release_lease(self, name: str, holder: str) -> None:
        """Give a lease up so a standby can take it at once; a no-op unless `holder`
        holds it."""
        ...

    def get_lease(self, name: str) -> Lease | None:
        """The lease's current record, or None when it was never taken."""
        ...

    def close(self) -> None:
        ...
