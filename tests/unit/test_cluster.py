"""How node agents read a slot's holder off its Lease (`meshgress.cluster.parse_slot_holder`):
only what the current holder published counts (pure code)."""

from datetime import UTC, datetime

import pytest

from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    SlotHolder,
    parse_slot_holder,
)
from meshgress.slots import SlotId
from wireguard.keys import generate_private_key, public_key

NOW = 1_800_000_000.0
KEY = public_key(generate_private_key())
SLOT = SlotId("egress", 1)


def lease(*, holder="gw2/11", published_by="gw2/11", renewed=NOW - 1, name=SLOT.lease_name,
          **notes):
    stamp = datetime.fromtimestamp(renewed, UTC).isoformat()
    annotations = {PUBLIC_KEY_ANNOTATION: KEY, ENDPOINT_ANNOTATION: "192.0.2.102:51901",
                   EGRESS_IP_ANNOTATION: "192.0.2.202", HOLDER_NODE_ANNOTATION: "gw2",
                   HOLDER_ANNOTATION: published_by, **notes}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-system",
                         "annotations": {k: v for k, v in annotations.items() if v is not None}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3,
                     "acquireTime": stamp, "renewTime": stamp}}


def test_the_holder_with_what_it_published():
    assert parse_slot_holder(lease(), NOW) == SlotHolder(
        slot=SLOT, holder="gw2/11", public_key=KEY, endpoint="192.0.2.102:51901",
        egress_ip="192.0.2.202", node="gw2", acquired=NOW - 1)


def test_a_new_holder_is_not_paired_with_the_previous_holders_key_and_endpoint():
    """Between taking the lease over and clearing the old annotations (two writes), the
    lease names the new holder next to the old holder's key: nobody may use them."""
    assert parse_slot_holder(lease(holder="gw3/12", published_by="gw2/11"), NOW) is None
    assert parse_slot_holder(lease(published_by=None), NOW) is None


@pytest.mark.parametrize("changes", [
    {"holder": None},
    {"renewed": NOW - 3},
    {"name": "kube-scheduler"},
    {PUBLIC_KEY_ANNOTATION: "not-a-key"},
    {PUBLIC_KEY_ANNOTATION: None},
    {ENDPOINT_ANNOTATION: "nowhere"},
], ids=["released", "expired", "not-a-slot", "bad-key", "no-key", "bad-endpoint"])
def test_no_usable_holder(changes):
    assert parse_slot_holder(lease(**changes), NOW) is None
