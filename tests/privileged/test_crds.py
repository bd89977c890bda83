"""meshgress's CRDs on a real API server: the corpus of tests/crd_corpus.py is judged as
the parser judges it (the parser's side: tests/unit/test_crd_corpus.py), and `kubectl get`
shows the printer columns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshgress.datastore import Invalid, Kind
from meshgress.datastore.kube import KubeDatastore
from tests.crd_corpus import Case, cases
from tests.privileged.kube_fixtures import KubeCluster, kube

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

__all__ = ["kube"]


@pytest.fixture(scope="module")
def store(kube: KubeCluster) -> Iterator[KubeDatastore]:
    s = kube.store()
    yield s
    s.close()


@pytest.mark.parametrize("case", cases())
def test_api_server_judges_the_corpus_as_the_parser(store: KubeDatastore, case: Case) -> None:
    if case.api is None:
        created = store.create(case.doc)
        assert created["spec"] == case.doc["spec"]
        return
    with pytest.raises(Invalid) as caught:
        store.create(case.doc)
    assert case.api in str(caught.value)
    kind = Kind(case.kind)
    assert case.doc["metadata"]["name"] not in [
        o["metadata"]["name"] for o in store.list(kind).items]


def test_kubectl_shows_the_printer_columns(store: KubeDatastore, kube: KubeCluster) -> None:
    store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                  "metadata": {"name": "columns"},
                  "spec": {"egressIPs": ["203.0.113.60", "203.0.113.61"]}})
    store.patch_status(Kind.EGRESS_GATEWAY, "columns", {"conditions": [
        {"type": "Ready", "status": "True", "reason": "SlotsReady", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
                  "metadata": {"name": "columns"},
                  "spec": {"gateway": "columns", "namespaceSelector": {}, "priority": 7}})
    store.patch_status(Kind.EGRESS_POLICY, "columns", {"selectedPods": 3, "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]})

    egw = kube.kubectl("get", "egw", "columns").stdout.splitlines()
    assert egw[0].split() == ["NAME", "EGRESS", "IPS", "READY", "AGE"]
    assert egw[1].split()[:3] == ["columns", '["203.0.113.60","203.0.113.61"]', "True"]
    egp = kube.kubectl("get", "egp", "columns").stdout.splitlines()
    assert egp[0].split() == ["NAME", "GATEWAY", "PRIORITY", "ACCEPTED", "SELECTED", "PODS",
                              "AGE"]
    assert egp[1].split()[:5] == ["columns", "columns", "7", "True", "3"]
    wide = kube.kubectl("get", "egw", "columns", "-o", "wide").stdout.splitlines()
    assert "FAILURE POLICY" in wide[0] and "REASON" in wide[0]
    everything = kube.kubectl("get", "meshgress", "-o", "name").stdout.split()
    assert {"egressgateway.meshgress.io/columns",
            "egresspolicy.meshgress.io/columns"} <= set(everything)
