"""The `kube` datastore against a real kube-apiserver and etcd (tests/privileged/
kube_fixtures.py): the Datastore contract every backend keeps (tests/datastore_contract.py),
and what only a Kubernetes API server brings: its own validation messages, Events,
watches across an API server restart and a forced 410, and leases raced through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshgress.datastore import AlreadyExists, Datastore, Invalid, Kind
from meshgress.datastore.kube import KubeDatastore
from tests.datastore_contract import DatastoreContract, FakeClock, race_for_leases
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
