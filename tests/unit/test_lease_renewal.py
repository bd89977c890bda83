"""What counts as a mere lease renewal: same holder, duration and annotations, only the
renew time (and bookkeeping metadata) moved on, of a lease that had not expired."""

from __future__ import annotations

import copy

from meshgress.datastore import is_lease_renewal

LEASE = {
    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
    "metadata": {"name": "egress-egress-0", "namespace": "meshgress-system",
                 "resourceVersion": "10", "annotations": {"meshgress.io/public-key": "k"}},
    "spec": {"holderIdentity": "gw1/1", "leaseDurationSeconds": 3,
             "acquireTime": "2026-01-01T00:00:00.000000Z",
             "renewTime": "2026-01-01T00:00:10.000000Z", "leaseTransitions": 0},
}
RENEWED_AT = 1767225610.0  # 2026-01-01T00:00:10Z


def renewed(**changes: object) -> dict:
    after = copy.deepcopy(LEASE)
    after["metadata"]["resourceVersion"] = "11"
    after["metadata"]["managedFields"] = [{"manager": "gateway"}]
    after["spec"]["renewTime"] = "2026-01-01T00:00:11.000000Z"
    after["spec"].update(changes)
    return after


def test_a_renewal_of_a_valid_lease_is_only_a_renewal():
    assert is_lease_renewal(LEASE, renewed(), RENEWED_AT + 1)


def test_a_renewal_of_an_expired_lease_is_news():
    assert not is_lease_renewal(LEASE, renewed(), RENEWED_AT + 3)


def test_a_new_holder_or_anything_else_changed_is_news():
    assert not is_lease_renewal(LEASE, renewed(holderIdentity="gw2/1"), RENEWED_AT + 1)
    assert not is_lease_renewal(LEASE, renewed(leaseTransitions=1), RENEWED_AT + 1)
    annotated = renewed()
    annotated["metadata"]["annotations"]["meshgress.io/public-key"] = "other"
    assert not is_lease_renewal(LEASE, annotated, RENEWED_AT + 1)


def test_a_released_or_unreadable_lease_is_news():
    released = copy.deepcopy(LEASE)
    del released["spec"]["holderIdentity"]
    assert not is_lease_renewal(released, released, RENEWED_AT + 1)
    broken = copy.deepcopy(LEASE)
    broken["spec"]["renewTime"] = "yesterday"
    assert not is_lease_renewal(broken, broken, RENEWED_AT + 1)
