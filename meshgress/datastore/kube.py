"""The `kube` datastore: the `Datastore` protocol on a real Kubernetes API server.

In production meshgress runs on Kubernetes: node agents and gateways read and write the
cluster's own Nodes, Pods, Namespaces, Leases and meshgress's custom resources, each under
its own ServiceAccount. This module is that path, behind the same protocol as the `file`
backend, so nothing above the datastore learns which one it talks to. It uses the official
`kubernetes` client for what it is good at (kubeconfig and in-cluster configuration, TLS,
token refresh) and speaks plain JSON through it: every object stays the Kubernetes-shaped
dict the protocol promises, whatever its kind, with no typed models in between.

How the protocol maps onto the API:

- Kinds: `RESOURCES` is the one table from `Kind` to group, version and plural.
  Leases are always in `LEASE_NAMESPACE`; a list or watch of Leases without a namespace
  means that namespace (meshgress has no business with other leases, and its RBAC grants
  only that one).
- Resource versions: the protocol uses ints. Kubernetes calls them opaque strings, but
  every API server on etcd hands out etcd revisions, which are numbers; they are converted
  at this boundary, and an object whose version is not a number is rejected (`RejectedObject`)
  rather than guessed at.
- list: one request; items get their `apiVersion` and `kind` (a list omits them) and lose
  `metadata.managedFields` (bookkeeping for server-side apply that nobody here reads).
  `field_node_name` is the `spec.nodeName` field selector, so an agent receives its own
  node's pods only, from the list and from the watch.
- watch: one HTTP watch per kind, each on a thread of its own feeding one queue, with
  `allowWatchBookmarks`, a server-side `timeoutSeconds` of five to ten minutes (so watches
  of many agents do not all end together) and a client read timeout a little longer, so a
  dead connection cannot hang a watch (kubernetes-client/python#1148). A watch that ends or
  breaks is opened again from the last resource version seen, and events at or below it
  are dropped, so none is delivered twice; only a 410 Gone (as an HTTP status or as an
  ERROR event in the stream: both happen) ends it, with `Expired`, and a reconnect that
  keeps failing for `watch_retry_budget` ends it with `Unavailable`. BOOKMARK events are
  passed on as the protocol's BOOKMARK (their object is never taken for a real one); when
  the server sends none for `bookmark_interval`, one is made with the last version seen.
  `watch(kinds, 0)` lists first and replays the current objects as ADDED.
- Writes: create, replace and apply ask for strict field validation, so a misspelt field
  is refused as the parser refuses it instead of silently dropped. `replace` without a
  resourceVersion reads the current one first (custom resources refuse unconditional
  updates). `create` and `apply` of an object carrying `status` write it through the status
  subresource afterwards (the main resource ignores it). `patch_annotations` is a JSON merge
  patch, forced as such: the client would send a strategic-merge patch for built-in kinds.
  `patch_status` replaces the status through the status subresource (a JSON patch, which
  needs no read and no `get` permission). `delete` removes at once: a Pod with a grace
  period of 0, because meshgress deletes pods only where it plays the kubelet (the lab).
- Leases (coordination.k8s.io/v1): read, decide, write under the read resourceVersion
  (create for a new one), so of two contenders exactly one write lands and the other sees
  `Conflict` and decides again on the new record: two holders can never both win. A
  release is such a write too, annotations it clears included: once another holder took
  the lease, the old holder's release writes nothing.
  Durations are fractional as in the `file` backend (`LEASE_DURATION_ANNOTATION`, with
  `spec.leaseDurationSeconds` rounded up); times are MicroTime from this process's clock,
  and expiry is judged by the reader's clock, so holders' clocks must agree to well within
  a lease duration (NTP does that).
- Events (events.k8s.io/v1): `record_event` creates the Event the protocol's
  `event_object` describes under its `event_name`; when it exists already (an earlier
  occurrence, of this process or another), it reads it and counts this one into its
  `series` (`event_repeated`).
- Errors: 404 NotFound, 409 AlreadyExists or Conflict (by the Status reason), 410 Expired,
  400/422 Invalid with the API server's message (for a person to read), 401/403 Forbidden.
  Transient failures — 429 (after its Retry-After), 5xx, a connection refused, reset or
  timed out — are retried inside the backend with jittered exponential backoff for up to
  `retry_budget` seconds, then raised as `Unavailable`. A request the server may already
  have carried out is retried only when repeating it is harmless (reads and patches), or
  when the server asked for it (429, or a Retry-After header); otherwise `Unavailable` at
  once, so a create or a delete never reports a result it did not have.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from urllib3.connection import HTTPConnection

from meshgress.datastore import (
    API_VERSIONS,
    LEASE_DURATION_ANNOTATION,
    LEASE_NAMESPACE,
    NAMESPACED,
    AlreadyExists,
    Conflict,
    DatastoreError,
    EventRecord,
    Expired,
    Forbidden,
    Invalid,
    Kind,
    Lease,
    LeaseHeld,
    ListResult,
    NotFound,
    Object,
    RejectedObject,
    Unavailable,
    WatchEvent,
    WatchStop,
    event_name,
    event_namespace,
    event_object,
    event_repeated,
    micro_time,
    object_key,
    parse_lease,
    wake_on_stop,
)
from meshgress.datastore.objects import (
    check_annotation_patch,
    check_lease_request,
    checked_annotation_keys,
    checked_kind,
    checked_namespace,
    describe,
    json_copy,
    prepare,
    released_lease,
)
from meshgress.validation import dns1123_subdomain_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API."""

    group: str
    """"" for the core group."""
    version: str
    plural: str
    status_subresource: bool

    def collection(self, namespace: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else \
            f"/apis/{self.group}/{self.version}"
        if namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        return f"{base}/{self.plural}"

    def item(self, name: str, namespace: str = "") -> str:
        return f"{self.collection(namespace)}/{quote(name, safe='')}"


RESOURCES: Final[Mapping[Kind, Resource]] = {
    Kind.NODE: Resource("", "v1", "nodes", status_subresource=True),
    Kind.POD: Resource("", "v1", "pods", status_subresource=True),
    Kind.NAMESPACE: Resource("", "v1", "namespaces", status_subresource=True),
    Kind.EGRESS_GATEWAY: Resource("meshgress.io", "v1alpha1", "egressgateways",
                                  status_subresource=True),
    Kind.EGRESS_POLICY: Resource("meshgress.io", "v1alpha1", "egresspolicies",
                                 status_subresource=True),
    Kind.LEASE: Resource("coordination.k8s.io", "v1", "leases", status_subresource=False),
    Kind.EVENT: Resource("events.k8s.io", "v1", "events", status_subresource=False),
}
EVENTS: Final = RESOURCES[Kind.EVENT]

WATCH_TIMEOUT_RANGE: Final = (300, 600)
"""Server-side watch timeout in seconds, drawn per watch request."""
WATCH_READ_SLACK: Final = 30.0
"""The client read timeout of a watch exceeds its server-side timeout by this much."""
REQUEST_TIMEOUT: Final = (10.0, 30.0)
"""(connect, read) timeout of one ordinary request, in seconds."""
_RETRY_BASE: Final = 0.1
_RETRY_CAP: Final = 2.0
_LEASE_ATTEMPTS: Final = 8

_CONNECT_ERRORS: Final = (urllib3.exceptions.NewConnectionError,
                          urllib3.exceptions.ConnectTimeoutError)
_CONNECTION_ERRORS: Final = (urllib3.exceptions.HTTPError, OSError)
_KEEPALIVE: Final = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, option, value) for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), 30), (getattr(socket, "TCP_KEEPINTVL", None), 10),
        (getattr(socket, "TCP_KEEPCNT", None), 3)) if option is not None]
"""A peer that vanished without closing the connection is noticed within about a minute,
also while a watch is idle."""


def kube_api_client(configuration: kube_client.Configuration) -> kube_client.ApiClient:
    """An ApiClient made for this backend: no retries inside urllib3 (the backend retries,
    knowing what is safe to repeat), enough pooled connections for one watch per informer,
    and TCP keepalive on every connection."""
    configuration.retries = False
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, 16)
    api_client = kube_client.ApiClient(configuration)
    pool_kw = api_client.rest_client.pool_manager.connection_pool_kw
    pool_kw["socket_options"] = [*HTTPConnection.default_socket_options, *_KEEPALIVE]
    return api_client


def load_configuration(kubeconfig: Path | None = None,
                       context: str | None = None) -> kube_client.Configuration:
    """The client configuration: from `kubeconfig` when given; else in-cluster when running
    in a pod (KUBERNETES_SERVICE_HOST is set); else $KUBECONFIG or ~/.kube/config."""
    configuration = kube_client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig is not None else None,
                context=context, client_configuration=configuration)
    except (kube_config.ConfigException, OSError, TypeError, ValueError) as exc:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise Invalid(f"no usable Kubernetes client configuration ({where}): {exc}") from exc
    return configuration


class KubeDatastore:
    """The `Datastore` protocol on a Kubernetes API server. Thread-safe.

    `api_client` is a `kubernetes.client.ApiClient` (`from_kubeconfig` and `in_cluster`
    build one with `kube_api_client`); the store closes it in `close`. `clock` gives the
    wall-clock time written to Leases and Events (tests inject one).
    """

    def __init__(self, api_client: kube_client.ApiClient, *,
                 clock: Callable[[], float] = time.time, retry_budget: float = 10.0,
                 watch_retry_budget: float = 30.0,
                 watch_timeout_range: tuple[int, int] = WATCH_TIMEOUT_RANGE,
                 watch_read_slack: float = WATCH_READ_SLACK) -> None:
        self._api = api_client
        self._clock = clock
        self._retry_budget = retry_budget
        self._watch_retry_budget = watch_retry_budget
        self._watch_timeout_range = watch_timeout_range
        self._watch_read_slack = watch_read_slack
        self._closed = WatchStop()
        self._random = random.Random()  # noqa: S311 - jitter, not secrets
        self.rejected_events = 0
        """Watch events skipped because they could not be decoded into an object."""
        self.watch_reopens = 0
        """Watches opened again after they broke (a failure, not the server's timeout)."""

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path | None = None, *, context: str | None = None,
                        **options: Any) -> KubeDatastore:
        """A store from a kubeconfig file (None: in-cluster when in a pod, else
        $KUBECONFIG or ~/.kube/config)."""
        return cls(kube_api_client(load_configuration(kubeconfig, context)), **options)

    @classmethod
    def in_cluster(cls, **options: Any) -> KubeDatastore:
        """A store with the pod's ServiceAccount token and the cluster's CA."""
        configuration = kube_client.Configuration()
        try:
            kube_config.load_incluster_config(client_configuration=configuration)
        except kube_config.ConfigException as exc:
            raise Invalid(f"not running in a Kubernetes pod: {exc}") from exc
        return cls(kube_api_client(configuration), **options)

    # Reads

    def list(self, kind: Kind, *, namespace: str | None = None,
             field_node_name: str | None = None) -> ListResult:
        kind = checked_kind(kind)
        query: dict[str, str] = {}
        if field_node_name is not None:
            if kind is not Kind.POD:
                raise Invalid(f"the spec.nodeName field selector applies to Pods, not {kind}")
            query["fieldSelector"] = f"spec.nodeName={field_node_name}"
        path = RESOURCES[kind].collection(self._list_namespace(kind, namespace))
        body = self._request("GET", path, query=query)
        items: list[Object] = []
        rejected: list[RejectedObject] = []
        for raw in body.get("items") or []:
            obj, problem = _usable(kind, raw)
            if obj is None:
                namespace, name = _identity_of(raw)
                rejected.append(RejectedObject(kind, namespace, name, path, problem))
                log.warning("list %s: skipping an object: %s", kind, problem)
            else:
                items.append(obj)
        items.sort(key=object_key)
        return ListResult(items=tuple(items), resource_version=_list_version(body, kind),
                          rejected=tuple(rejected))

    def get(self, kind: Kind, name: str, namespace: str = "") -> Object:
        kind = checked_kind(kind)
        path = self._item_path(kind, name, namespace)
        return self._object(kind, self._request("GET", path, what=describe(kind, namespace, name)))

    def watch(self, kinds: frozenset[Kind], resource_version: int, *,
              stop: threading.Event | None = None, bookmark_interval: float = 10.0,
              field_node_name: str | None = None) -> Iterator[WatchEvent]:
        wanted = sorted(frozenset(checked_kind(k) for k in kinds))
        if not wanted:
            raise Invalid("watch needs at least one kind")
        if isinstance(resource_version, bool) or not isinstance(resource_version, int) \
                or resource_version < 0:
            raise Invalid(f"resource_version must be an integer >= 0, got {resource_version!r}")
        if field_node_name is not None and wanted != [Kind.POD]:
            raise Invalid("the spec.nodeName field selector applies to Pods only")
        return self._watch(wanted, resource_version, stop, bookmark_interval, field_node_name)

    def get_lease(self, name: str) -> Lease | None:
        try:
            return parse_lease(self.get(Kind.LEASE, name, LEASE_NAMESPACE))
        except NotFound:
            return None

    # Writes

    def create(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        if new["metadata"].get("resourceVersion") not in (None, ""):
            raise Invalid("metadata.resourceVersion must not be set on create")
        self._check_name(kind, name, namespace)
        created = self._object(kind, self._request(
            "POST", RESOURCES[kind].collection(namespace), body=new, query=_STRICT,
            what=describe(kind, namespace, name)))
        return self._with_status(kind, new, created)

    def replace(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        path = self._item_path(kind, name, namespace)
        what = describe(kind, namespace, name)
        if new["metadata"].get("resourceVersion") not in (None, ""):
            return self._object(kind, self._request("PUT", path, body=new, query=_STRICT,
                                                    what=what))
        for _attempt in range(_LEASE_ATTEMPTS):
            current = self._request("GET", path, what=what)
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                return self._object(kind, self._request("PUT", path, body=new, query=_STRICT,
                                                        what=what))
            except Conflict:
                if new["metadata"].get("uid") not in (None, current["metadata"].get("uid")):
                    raise
        raise Conflict(f"{what} kept changing while it was being replaced")

    def apply(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        new["metadata"].pop("resourceVersion", None)
        new["metadata"].pop("uid", None)
        self._check_name(kind, name, namespace)
        what = describe(kind, namespace, name)
        for _attempt in range(_LEASE_ATTEMPTS):
            try:
                created = self._object(kind, self._request(
                    "POST", RESOURCES[kind].collection(namespace), body=new, query=_STRICT,
                    what=what))
                return self._with_status(kind, new, created)
            except AlreadyExists:
                pass
            try:
                return self.replace(new)
            except NotFound:
                continue  # deleted in between: create it again
        raise Conflict(f"{what} kept being created and deleted while it was being applied")

    def delete(self, kind: Kind, name: str, namespace: str = "") -> None:
        kind = checked_kind(kind)
        options: Object = {"apiVersion": "v1", "kind": "DeleteOptions",
                           "propagationPolicy": "Background"}
        if kind is Kind.POD:
            options["gracePeriodSeconds"] = 0
        self._request("DELETE", self._item_path(kind, name, namespace), body=options,
                      what=describe(kind, namespace, name))

    def patch_annotations(self, kind: Kind, name: str, annotations: Mapping[str, str | None],
                          namespace: str = "") -> Object:
        kind = checked_kind(kind)
        check_annotation_patch(annotations)
        patch = {"metadata": {"annotations": dict(annotations)}}
        return self._object(kind, self._request(
            "PATCH", self._item_path(kind, name, namespace), body=patch,
            content_type="application/merge-patch+json", what=describe(kind, namespace, name)))

    def patch_status(self, kind: Kind, name: str, status: Mapping[str, Any],
                     namespace: str = "") -> Object:
        kind = checked_kind(kind)
        if not isinstance(status, Mapping):
            raise Invalid(f"status must be a mapping, got {type(status).__name__}")
        if not RESOURCES[kind].status_subresource:
            raise Invalid(f"{kind} has no status")
        patch = [{"op": "add", "path": "/status", "value": json_copy(dict(status))}]
        return self._object(kind, self._request(
            "PATCH", self._item_path(kind, name, namespace) + "/status", body=patch,
            content_type="application/json-patch+json", what=describe(kind, namespace, name)))

    def acquire_lease(self, name: str, holder: str, duration_seconds: float) -> Lease:
        duration = check_lease_request(holder, duration_seconds)
        path = self._item_path(Kind.LEASE, name, LEASE_NAMESPACE)
        what = f"lease {name}"
        for _attempt in range(_LEASE_ATTEMPTS):
            now = self._clock()
            try:
                current: Object | None = self._request("GET", path, what=what)
            except NotFound:
                current = None
            if current is None:
                new: Object = {"apiVersion": API_VERSIONS[Kind.LEASE], "kind": Kind.LEASE.value,
                               "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                               "spec": {}}
                acquired, transitions = now, 0
            else:
                lease = parse_lease(current)
                if lease.holder == holder:
                    # A renewal keeps acquireTime and leaseTransitions, as the file store.
                    acquired, transitions = lease.acquire_time, lease.transitions
                elif lease.expired(now):
                    acquired, transitions = now, lease.transitions + 1
                else:
                    until = lease.renew_time + lease.duration_seconds
                    raise LeaseHeld(f"lease {name} is held by {lease.holder} until "
                                    f"{micro_time(until)} ({until - now:.3f}s from now)")
                new = _strip(current)
            new["metadata"].setdefault("annotations", {})[LEASE_DURATION_ANNOTATION] = repr(
                duration)
            new["spec"] = {"holderIdentity": holder, "leaseDurationSeconds": math.ceil(duration),
                           "acquireTime": micro_time(acquired), "renewTime": micro_time(now),
                           "leaseTransitions": transitions}
            try:
                if current is None:
                    written = self._request("POST", RESOURCES[Kind.LEASE].collection(
                        LEASE_NAMESPACE), body=new, what=what)
                else:
                    written = self._request("PUT", path, body=new, what=what)
            except (AlreadyExists, Conflict):
                continue  # another writer was first: decide again on what it wrote
            return parse_lease(self._object(Kind.LEASE, written))
        raise Conflict(f"lease {name} kept changing; {holder} did not get a decision in "
                       f"{_LEASE_ATTEMPTS} attempts")

    def release_lease(self, name: str, holder: str, *,
                      clear_annotations: Collection[str] = ()) -> bool:
        clear = checked_annotation_keys(clear_annotations)
        path = self._item_path(Kind.LEASE, name, LEASE_NAMESPACE)
        for _attempt in range(_LEASE_ATTEMPTS):
            try:
                current = self._request("GET", path, what=f"lease {name}")
            except NotFound:
                return False
            if parse_lease(current).holder != holder:
                return False
            new = _strip(released_lease(current, clear))
            try:
                self._request("PUT", path, body=new, what=f"lease {name}")
                return True
            except Conflict:
                continue
            except NotFound:
                return False
        raise Conflict(f"lease {name} kept changing while {holder} released it")

    def record_event(self, event: EventRecord) -> None:
        now = self._clock()
        body = event_object(event, now)  # Invalid for what the API server would refuse
        namespace, name = event_namespace(event), event_name(event)
        what = f"event {namespace}/{name}"
        try:
            self._request("POST", EVENTS.collection(namespace), body=body, what=what)
            return
        except AlreadyExists:
            pass  # an earlier occurrence (of this process or another): count this one in
        stored = self._request("GET", EVENTS.item(name, namespace), what=what)
        repeated = event_repeated(stored, event, now)
        patch = {"series": repeated["series"]}
        self._request("PATCH", EVENTS.item(name, namespace), body=patch,
                      content_type="application/merge-patch+json", what=what)

    def close(self) -> None:
        """End every watch of this store and release its connections."""
        self._closed.set()
        with contextlib.suppress(Exception):
            self._api.close()

    # Internals: paths and names

    def _list_namespace(self, kind: Kind, namespace: str | None) -> str:
        if kind not in NAMESPACED:
            if namespace:
                raise Invalid(f"{kind} is cluster-scoped; got namespace {namespace!r}")
            return ""
        if kind is Kind.LEASE and not namespace:
            return LEASE_NAMESPACE
        return checked_namespace(namespace) if namespace else ""

    def _check_name(self, kind: Kind, name: object, namespace: str) -> None:
        if not isinstance(name, str):
            raise Invalid(f"metadata.name must be a string, got {name!r}")
        problem = dns1123_subdomain_problem(name)
        if problem is not None:
            raise Invalid(f"{kind} name {name!r} is not valid: {problem}")
        if kind in NAMESPACED:
            checked_namespace(namespace)
        elif namespace:
            raise Invalid(f"{kind} is cluster-scoped; it has no namespace, got {namespace!r}")

    def _item_path(self, kind: Kind, name: str, namespace: str) -> str:
        # Checked before it becomes a URL: "../x" must not reach another resource.
        self._check_name(kind, name, namespace)
        return RESOURCES[kind].item(name, namespace if kind in NAMESPACED else "")

    def _object(self, kind: Kind, raw: Object) -> Object:
        obj, problem = _usable(kind, raw)
        if obj is None:
            raise DatastoreError(f"the API server answered with an unusable {kind}: {problem}")
        return obj

    def _with_status(self, kind: Kind, requested: Object, created: Object) -> Object:
        status = requested.get("status")
        if status is None or not RESOURCES[kind].status_subresource \
                or created.get("status") == status:
            return created
        namespace, name = object_key(created)
        return self.patch_status(kind, name, status, namespace)

    # Internals: requests, retries, errors

    def _request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                 body: Any = None, content_type: str = "application/json",
                 what: str = "") -> Object:
        """One API call with retries; the decoded JSON answer."""
        response = self._call(method, path, query=query, body=body, content_type=content_type,
                              what=what, timeout=REQUEST_TIMEOUT)
        try:
            data = response.data
            decoded = json.loads(data) if data else {}
        except (ValueError, *_CONNECTION_ERRORS) as exc:
            raise Unavailable(f"{method} {path}: unreadable answer: {exc}") from exc
        finally:
            response.release_conn()
        if not isinstance(decoded, dict):
            raise DatastoreError(f"{method} {path}: the answer is not an object")
        return decoded

    def _call(self, method: str, path: str, *, query: Mapping[str, str] | None,
              body: Any, content_type: str, what: str,
              timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        """Send a request, retrying what is safe to retry; the unread response."""
        repeatable = method in ("GET", "PATCH")
        deadline = time.monotonic() + self._retry_budget
        attempt = 0
        while True:
            if self._closed.is_set():
                raise Unavailable(f"{method} {path}: the datastore is closed")
            try:
                response: urllib3.BaseHTTPResponse = self._api.call_api(
                    path, method, query_params=list((query or {}).items()),
                    header_params={"Content-Type": content_type, "Accept": "application/json"},
                    body=body, auth_settings=["BearerToken"], _preload_content=False,
                    _return_http_data_only=True, _request_timeout=timeout)
                return response
            except ApiException as exc:
                status = int(exc.status or 0)
                retry_after = _retry_after(exc.headers)
                transient = status in {0, 429} or status >= 500
                if not transient:
                    raise _api_error(exc, what or path) from None
                if not (repeatable or status in (0, 429) or retry_after is not None):
                    raise _api_error(exc, what or path) from None
                problem: str = f"HTTP {status} {_status_message(exc)}"
            except _CONNECT_ERRORS as exc:
                retry_after, problem = None, f"cannot connect: {exc}"
            except _CONNECTION_ERRORS as exc:
                if not repeatable:
                    raise Unavailable(f"{method} {what or path}: the connection failed, and "
                                      f"it may have been carried out: {exc}") from exc
                retry_after, problem = None, f"connection failed: {exc}"
            attempt += 1
            remaining = deadline - time.monotonic()
            delay = self._random.uniform(0, min(_RETRY_CAP, _RETRY_BASE * 2 ** attempt))
            if retry_after is not None:
                delay = max(delay, retry_after)
            if remaining <= 0 or (retry_after is not None and delay > remaining):
                raise Unavailable(f"{method} {what or path}: {problem} (gave up after "
                                  f"{attempt} attempts)")
            delay = min(delay, remaining)
            log.debug("%s %s: %s; retrying in %.2fs", method, path, problem, delay)
            if self._closed.wait(delay):
                raise Unavailable(f"{method} {path}: the datastore is closed")

    # Internals: watch

    def _watch(self, kinds: Sequence[Kind], resource_version: int, stop: threading.Event | None,
               bookmark_interval: float, field_node_name: str | None) -> Iterator[WatchEvent]:
        initial: Sequence[WatchEvent] = ()
        if resource_version == 0:
            initial, starts = self._current_as_events(kinds, field_node_name)
        else:
            starts = dict.fromkeys(kinds, resource_version)
        events: queue.Queue[WatchEvent | DatastoreError | None] = queue.Queue()
        streams = [_WatchStream(self, kind, starts[kind], field_node_name, events)
                   for kind in kinds]
        for event in initial:
            if self._stopped(stop):
                return
            yield event
        for stream in streams:
            stream.start()
        last_sent = time.monotonic()
        # None in the queue: the stop or the store's close (wakes the wait at once).
        unregister_stop, stop_poll = wake_on_stop(stop, lambda: events.put(None))
        unregister_close = self._closed.on_set(lambda: events.put(None))
        try:
            while not self._stopped(stop):
                timeout = max(0.0, last_sent + bookmark_interval - time.monotonic())
                try:
                    item = events.get(timeout=timeout if stop_poll is None
                                      else min(timeout, stop_poll))
                except queue.Empty:
                    item = None
                if item is None:
                    if time.monotonic() - last_sent >= bookmark_interval:
                        yield WatchEvent("BOOKMARK", kinds[0], {},
                                         min(s.resource_version for s in streams))
                        last_sent = time.monotonic()
                    continue
                if isinstance(item, DatastoreError):
                    raise item
                if self._stopped(stop):
                    return
                yield item
                last_sent = time.monotonic()
        finally:
            unregister_close()
            unregister_stop()
            for stream in streams:
                stream.stop()

    def _current_as_events(self, kinds: Sequence[Kind], field_node_name: str | None
                           ) -> tuple[Sequence[WatchEvent], dict[Kind, int]]:
        """"Everything after 0": the current objects as ADDED events in resource-version
        order, and the resource version each kind's watch continues from."""
        initial = []
        starts: dict[Kind, int] = {}
        for kind in kinds:
            listed = self.list(kind, field_node_name=field_node_name)
            starts[kind] = listed.resource_version
            initial += [WatchEvent("ADDED", kind, obj, int(obj["metadata"]["resourceVersion"]))
                        for obj in listed.items]
        return sorted(initial, key=lambda e: e.resource_version), starts

    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._closed.is_set() or (stop is not None and stop.is_set())


_STRICT: Final = {"fieldValidation": "Strict"}


class _WatchStream:
    """One kind's HTTP watch, kept open from the last resource version seen, on a thread
    that puts events (and, at the end, the error that ended it) into a shared queue."""

    def __init__(self, store: KubeDatastore, kind: Kind, resource_version: int,
                 field_node_name: str | None,
                 out: queue.Queue[WatchEvent | DatastoreError | None]) -> None:
        self._store = store
        self.kind = kind
        self.resource_version = resource_version
        self._field_node_name = field_node_name
        self._out = out
        self._stop = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"kube-watch-{kind}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            # Wakes the thread out of a blocked read at once.
            with contextlib.suppress(Exception):
                response.shutdown()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._store._closed.is_set()

    def _run(self) -> None:
        store = self._store
        failing_since: float | None = None
        attempt = 0
        while not self._stopped():
            try:
                self._stream_once()
                failing_since, attempt = None, 0
                continue  # the server ended the watch (its timeout): open it again
            except _Reopen as exc:
                problem = str(exc)
            except DatastoreError as exc:
                if not self._stopped():
                    self._out.put(exc)
                return
            except _CONNECTION_ERRORS as exc:
                if self._stopped():
                    return
                problem = f"connection failed: {exc}"
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > store._watch_retry_budget:
                self._out.put(Unavailable(f"watch of {self.kind}: {problem} (for "
                                          f"{now - failing_since:.0f}s)"))
                return
            delay = store._random.uniform(0, min(_RETRY_CAP, _RETRY_BASE * 2 ** attempt))
            attempt += 1
            store.watch_reopens += 1
            log.info("watch of %s from %d: %s; again in %.2fs", self.kind,
                     self.resource_version, problem, delay)
            if self._stop.wait(delay):
                return

    def _stream_once(self) -> None:
        timeout_seconds = self._store._random.randint(*self._store._watch_timeout_range)
        query = {"watch": "1", "allowWatchBookmarks": "true",
                 "resourceVersion": str(self.resource_version),
                 "timeoutSeconds": str(timeout_seconds)}
        if self._field_node_name is not None:
            query["fieldSelector"] = f"spec.nodeName={self._field_node_name}"
        path = RESOURCES[self.kind].collection(
            self._store._list_namespace(self.kind, None))
        try:
            response = self._store._call(
                "GET", path, query=query, body=None, content_type="application/json",
                what=f"watch of {self.kind}",
                timeout=(REQUEST_TIMEOUT[0], timeout_seconds + self._store._watch_read_slack))
        except Unavailable as exc:
            raise _Reopen(str(exc)) from exc
        with self._lock:
            self._response = response
        try:
            if self._stopped():
                return
            for line in _lines(response):
                if self._stopped():
                    return
                self._handle(line)
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()

    def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            type_, raw = event["type"], event["object"]
            if not isinstance(raw, dict):
                raise TypeError("the event's object is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            self._store.rejected_events += 1
            log.warning("watch of %s: skipping an undecodable event: %s", self.kind, exc)
            return
        if type_ == "ERROR":
            code = raw.get("code")
            message = raw.get("message") or raw.get("reason") or "unknown error"
            if code == 410:
                raise Expired(f"watch of {self.kind} from {self.resource_version}: {message}")
            if code == 429 or (isinstance(code, int) and code >= 500):
                raise _Reopen(f"the server ended the watch: {code} {message}")
            raise _status_error(int(code or 0), raw.get("reason") or "", message,
                                f"watch of {self.kind}")
        if type_ == "BOOKMARK":
            version = _version_of(raw)
            if version is not None and version > self.resource_version:
                self.resource_version = version
                self._out.put(WatchEvent("BOOKMARK", self.kind, {}, version))
            return
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            self._store.rejected_events += 1
            log.warning("watch of %s: skipping an event of type %r", self.kind, type_)
            return
        obj, problem = _usable(self.kind, raw)
        if obj is None:
            self._store.rejected_events += 1
            log.warning("watch of %s: skipping an event: %s", self.kind, problem)
            return
        version = int(obj["metadata"]["resourceVersion"])
        if version <= self.resource_version:
            return  # seen already (a reopened watch never repeats one, but never twice)
        self.resource_version = version
        self._out.put(WatchEvent(type_, self.kind, obj, version))


class _Reopen(Exception):
    """The watch broke in a way that reopening it from the last version can mend."""


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The response body's lines as they arrive (a watch is a stream of JSON lines)."""
    chunks = response.read_chunked() if getattr(response, "chunked", False) \
        else response.stream(None)
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


# Pure helpers


def _usable(kind: Kind, raw: object) -> tuple[Object | None, str]:
    """The object as the protocol hands it out (kind and apiVersion set, no managedFields),
    or None and why it cannot be used."""
    if not isinstance(raw, dict):
        return None, "not an object"
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        return None, "no metadata"
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None, "no metadata.name"
    namespace = meta.get("namespace")
    if kind in NAMESPACED and (not isinstance(namespace, str) or not namespace):
        return None, f"{kind} {name} has no metadata.namespace"
    if _version_of(raw) is None:
        return None, (f"{describe(kind, namespace or '', name)} has resourceVersion "
                      f"{meta.get('resourceVersion')!r}, not a number")
    obj = {"apiVersion": raw.get("apiVersion") or API_VERSIONS[kind], "kind": kind.value,
           **{k: v for k, v in raw.items() if k not in ("apiVersion", "kind")}}
    if "managedFields" in meta:
        obj["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return obj, ""


def _version_of(raw: Mapping[str, Any]) -> int | None:
    value = (raw.get("metadata") or {}).get("resourceVersion")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _list_version(body: Mapping[str, Any], kind: Kind) -> int:
    value = (body.get("metadata") or {}).get("resourceVersion")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise DatastoreError(f"list of {kind}: resourceVersion {value!r} is not a number")


def _identity_of(raw: object) -> tuple[str, str]:
    """(namespace, name) as far as an unusable object tells them ("" where it does not)."""
    if isinstance(raw, dict) and isinstance(raw.get("metadata"), dict):
        return object_key(raw)
    return "", ""


def _strip(obj: Object) -> Object:
    """A copy fit to write back: without managedFields."""
    new = copy.deepcopy(obj)
    new["metadata"].pop("managedFields", None)
    return new


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _decode_status(exc: ApiException) -> tuple[str, str]:
    """(reason, message) of the Status object in an error answer."""
    body = exc.body
    try:
        status = json.loads(body) if body else {}
    except (ValueError, TypeError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    message = status.get("message") or exc.reason or text.strip()[:500] or "no message"
    return str(status.get("reason") or ""), str(message)


def _status_message(exc: ApiException) -> str:
    return _decode_status(exc)[1]


def _api_error(exc: ApiException, what: str) -> DatastoreError:
    reason, message = _decode_status(exc)
    return _status_error(int(exc.status or 0), reason, message, what)


def _status_error(code: int, reason: str, message: str, what: str) -> DatastoreError:
    """The datastore error for an API Status (code, reason, message)."""
    if code == 404:
        return NotFound(f"{what} not found: {message}")
    if code == 409:
        if reason == "AlreadyExists":
            return AlreadyExists(message)
        return Conflict(message)
    if code == 410:
        return Expired(message)
    if code in (400, 413, 415, 422):
        return Invalid(message)
    if code in (401, 403):
        return Forbidden(message)
    if code == 429 or code >= 500 or code == 0:
        return Unavailable(f"{what}: {message}")
    return DatastoreError(f"{what}: HTTP {code} {reason}: {message}")
