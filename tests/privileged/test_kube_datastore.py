"""The `kube` datastore against a real kube-apiserver and etcd (tests/privileged/
kube_fixtures.py): the Datastore contract every backend keeps (tests/datastore_contract.py),
and what only a Kubernetes API server brings: its own validation messages, Events,
watches across an API server restart and a forced 410, and leases raced through it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3

from meshgress.datastore import (
    AlreadyExists,
    Conflict,
    Datastore,
    Expired,
    Forbidden,
    Invalid,
    Kind,
    NotFound,
    Unavailable,
)
from meshgress.datastore.kube import KubeDatastore
from tests.datastore_contract import (
    DatastoreContract,
    FakeClock,
    Watcher,
    race_for_leases,
    rv,
    wait_for,
)
from tests.privileged.kube_fixtures import KubeCluster, kube, store_factory

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

__all__ = ["kube"]  # the module-scoped control plane fixture


class TestKubeDatastoreContract(DatastoreContract):
    def ensure_namespace(self, store: Datastore, name: str) -> None:
        # No controller manager runs here to give the namespace its default ServiceAccount,
        # which admission wants before it takes a pod.
        super().ensure_namespace(store, name)
        assert isinstance(store, KubeDatastore)
        with contextlib.suppress(AlreadyExists):
            store._request("POST", f"/api/v1/namespaces/{name}/serviceaccounts", body={
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def store(self, kube: KubeCluster, clock: FakeClock) -> Iterator[KubeDatastore]:
        s = kube.store(clock=clock)
        yield s
        s.close()

    @pytest.fixture
    def other(self, kube: KubeCluster, clock: FakeClock) -> Iterator[Callable[[], Datastore]]:
        open_another, opened = store_factory(kube, clock=clock)
        yield open_another
        for s in opened:
            s.close()


@pytest.fixture
def store(kube: KubeCluster) -> Iterator[KubeDatastore]:
    s = kube.store()
    yield s
    s.close()


def test_fifty_lease_races_through_the_api_server_never_two_holders(
        kube: KubeCluster, store: KubeDatastore) -> None:
    open_another, opened = store_factory(kube)
    try:
        race_for_leases(store, open_another, "race50", rounds=50)
    finally:
        for s in opened:
            s.close()


def test_the_api_server_s_message_comes_back_as_invalid(store: KubeDatastore) -> None:
    bad = {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
           "metadata": {"name": "too-high"},
           "spec": {"gateway": "gw", "namespaceSelector": {}, "priority": 70000}}
    with pytest.raises(Invalid, match=r'EgressPolicy.meshgress.io "too-high" is invalid: '
                                      r"spec.priority: Invalid value: 70000"):
        store.create(bad)
    with pytest.raises(Invalid, match=r'unknown field "spec\.bogus"'):
        store.create({**bad, "metadata": {"name": "unknown-field"},
                      "spec": {"gateway": "gw", "namespaceSelector": {}, "bogus": 1}})


def test_events_are_recorded_once_and_counted_in_a_series(store: KubeDatastore,
                                                           kube: KubeCluster) -> None:
    gw = store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                       "metadata": {"name": "evented"}, "spec": {"egressIPs": ["203.0.113.50"]}})
    first = store.record_event(gw, reason="SlotTaken", note="203.0.113.50 is up",
                               action="Claim")
    again = store.record_event(gw, reason="SlotTaken", note="203.0.113.50 is up",
                               action="Claim")
    warning = store.record_event(gw, reason="SlotLost", note="lease lost", action="Fence",
                                 type="Warning")
    assert again["metadata"]["name"] == first["metadata"]["name"]
    assert again["series"]["count"] == 2
    assert warning["metadata"]["name"] != first["metadata"]["name"]
    out = kube.kubectl("get", "events.events.k8s.io", "-n", "default", "-o",
                       "jsonpath={range .items[?(@.regarding.name==\"evented\")]}"
                       "{.reason}/{.type}/{.regarding.uid}/{.series.count};{end}").stdout
    uid = gw["metadata"]["uid"]
    assert sorted(filter(None, out.split(";"))) == [f"SlotLost/Warning/{uid}/",
                                                     f"SlotTaken/Normal/{uid}/2"]
    with pytest.raises(Invalid):
        store.record_event(gw, reason="x", note="y", action="z", type="Fatal")


def test_list_rejects_what_it_cannot_use_and_keeps_the_rest(store: KubeDatastore,
                                                            kube: KubeCluster) -> None:
    # An object the API server itself serves without a usable resourceVersion cannot be
    # made; an answer is rewritten on its way in instead, by the one seam the store has.
    store.create({"kind": "Node", "metadata": {"name": "kept"}, "spec": {}})
    real_request = store._request

    def tampered(method: str, path: str, **kw: Any) -> Any:
        answer = real_request(method, path, **kw)
        if method == "GET" and path == "/api/v1/nodes":
            answer["items"].append({"metadata": {"resourceVersion": "12"}})
            answer["items"].append({"metadata": {"name": "odd", "resourceVersion": "x1"}})
        return answer

    store._request = tampered  # type: ignore[method-assign]
    listed = store.list(Kind.NODE)
    assert "kept" in [n["metadata"]["name"] for n in listed.items]
    assert [(r.name, r.reason) for r in listed.rejected] == [
        ("", "no metadata.name"), ("odd", "Node odd has resourceVersion 'x1', not a number")]


# Transient failures and how each answer maps onto the datastore's errors. The faults are
# injected in the client's transport, in front of the real API server: a request either
# gets the injected answer or goes through.


class Faults:
    """Answers injected into the next requests of a method, in order; `sent` lists the
    methods of the requests that reached the API server."""

    def __init__(self, store: KubeDatastore) -> None:
        pool_manager = store._api.rest_client.pool_manager
        self._real = pool_manager.request
        self.plan: list[tuple[str, Callable[[], Any]]] = []
        self.sent: list[str] = []
        pool_manager.request = self._request

    def inject(self, method: str, *faults: Callable[[], Any]) -> None:
        self.plan += [(method, fault) for fault in faults]

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        for i, (wanted, fault) in enumerate(self.plan):
            if wanted == method:
                del self.plan[i]
                return fault()
        self.sent.append(method)
        return self._real(method, url, **kwargs)


def answer(code: int, reason: str, retry_after: float | None = None) -> Callable[[], Any]:
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": f"injected {code}", "reason": reason, "code": code})
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return lambda: urllib3.HTTPResponse(body=body.encode(), status=code, headers=headers,
                                        preload_content=False)


def reset() -> Any:
    raise urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))


def refused() -> Any:
    raise urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]


@pytest.fixture
def faulty(kube: KubeCluster) -> Iterator[tuple[KubeDatastore, Faults]]:
    s = kube.store(retry_budget=5.0)
    yield s, Faults(s)
    s.close()


def test_reads_are_retried_through_429_5xx_and_resets(
        faulty: tuple[KubeDatastore, Faults]) -> None:
    store, faults = faulty
    store.apply({"kind": "Node", "metadata": {"name": "flaky"}, "spec": {}})
    faults.sent.clear()
    faults.inject("GET", answer(429, "TooManyRequests", retry_after=1), answer(500, "Internal"),
                  reset, answer(503, "ServiceUnavailable"), refused)
    started = time.monotonic()
    assert store.get(Kind.NODE, "flaky")["metadata"]["name"] == "flaky"
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert faults.sent == ["GET"] and faults.plan == []


def test_writes_are_repeated_only_when_that_is_safe(
        faulty: tuple[KubeDatastore, Faults]) -> None:
    store, faults = faulty
    obj = {"kind": "Node", "metadata": {"name": "written-once"}, "spec": {}}
    # Not sent (refused, 429, a Retry-After): repeated, and it lands once.
    faults.inject("POST", refused, answer(429, "TooManyRequests"),
                  answer(503, "ServiceUnavailable", retry_after=0))
    store.create(obj)
    assert faults.sent == ["POST"]
    # Perhaps carried out (a reset after sending, a 500): not repeated.
    for fault in (reset, answer(500, "InternalError")):
        faults.sent.clear()
        faults.inject("DELETE", fault)
        with pytest.raises(Unavailable):
            store.delete(Kind.NODE, "written-once")
        assert faults.sent == []
    assert store.get(Kind.NODE, "written-once")
    # A merge patch is the same however often it is applied: repeated.
    faults.inject("PATCH", reset, answer(502, "BadGateway"))
    assert store.patch_annotations(Kind.NODE, "written-once", {"a": "1"})[
        "metadata"]["annotations"] == {"a": "1"}


def test_each_answer_maps_onto_a_datastore_error(faulty: tuple[KubeDatastore, Faults]) -> None:
    store, faults = faulty
    for code, reason, error in [(401, "Unauthorized", Forbidden), (403, "Forbidden", Forbidden),
                                (404, "NotFound", NotFound), (409, "AlreadyExists", AlreadyExists),
                                (409, "Conflict", Conflict), (410, "Gone", Expired),
                                (422, "Invalid", Invalid), (400, "BadRequest", Invalid)]:
        faults.inject("GET", answer(code, reason))
        with pytest.raises(error, match=f"injected {code}"):
            store.get(Kind.NODE, "anything")
    assert faults.sent == []


def test_a_server_that_stays_down_is_unavailable_after_the_budget(
        kube: KubeCluster) -> None:
    store = kube.store(retry_budget=1.0)
    store._api.configuration.host = "https://127.0.0.1:1"  # nothing listens there
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"cannot connect.*gave up after \d+ attempts"):
            store.list(Kind.NODE)
        assert 0.9 < time.monotonic() - started < 5
    finally:
        store.close()


def test_a_watch_reopens_after_a_reset_and_ends_on_an_http_410(
        faulty: tuple[KubeDatastore, Faults]) -> None:
    store, faults = faulty
    start = store.list(Kind.NODE).resource_version
    faults.inject("GET", reset)  # the watch request itself
    watcher = Watcher(store, {Kind.NODE}, start)
    try:
        created = store.create({"kind": "Node", "metadata": {"name": "after-reset"},
                                "spec": {}})
        assert wait_for(lambda: any(e.resource_version == rv(created)
                                    for e in watcher.changes()))
    finally:
        watcher.close()
    assert watcher.error is None
    faults.inject("GET", answer(410, "Expired"))
    with pytest.raises(Expired):
        next(iter(store.watch(frozenset({Kind.NODE}), start)))
