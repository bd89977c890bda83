"""The claiming policy (`gateway.claims.plan_claims`), decision by decision (pure code)."""

from __future__ import annotations

import pytest

from gateway.claims import ClaimLimits, claim_order, lease_is_free, plan_claims
from meshgress.datastore import Lease
from meshgress.slots import SlotId

ME = "gw1/100"
OTHER = "gw2/200"
A, B, C = SlotId("egw", 0), SlotId("egw", 1), SlotId("other", 0)
NOW = 1000.0


def lease(holder: str | None, renewed: float = NOW - 1, duration: float = 3.0,
          name: str = "x") -> Lease:
    return Lease(name=name, holder=holder, duration_seconds=duration, acquire_time=renewed - 5,
                 renew_time=renewed, transitions=0, resource_version=1)


def plan(*, held=(), leases=None, servable=(A, B), max_slots=1, free_since=None, now=NOW,
         holder=ME, grace=1.0, orphans_allowed=True):
    return plan_claims(holder=holder, held=set(held), leases=leases or {},
                       servable=list(servable), now=now, free_since=free_since or {},
                       limits=ClaimLimits(max_slots=max_slots, orphan_grace=grace,
                                          orphans_allowed=orphans_allowed))


@pytest.mark.parametrize("record, free", [
    (None, True),
    (lease(None), True),
    (lease(OTHER, renewed=NOW - 3), True),
    (lease(OTHER, renewed=NOW - 2.9), False),
    (lease(ME), False),
], ids=["no-lease", "released", "expired-at-the-boundary", "held", "held-by-me"])
def test_lease_is_free(record, free):
    assert lease_is_free(record, NOW) is free


def test_an_empty_gateway_tries_every_free_slot_in_its_own_order():
    p = plan()
    assert p.keep == p.release == p.lost == p.adopt == ()
    assert p.capacity == 1
    assert p.candidates == tuple(sorted((A, B), key=lambda s: claim_order(ME, s)))
    assert p.orphans == ()
    # Everything beyond capacity waits for the grace, measured from now.
    assert p.free_since == {A: NOW, B: NOW}
    assert p.next_check == NOW + 1.0


def test_two_holders_usually_reach_for_different_slots_first():
    slots = [SlotId("egw", i) for i in range(8)]
    firsts = {min(slots, key=lambda s: claim_order(f"gw{n}/1", s)) for n in range(8)}
    assert len(firsts) > 1  # rendezvous order differs by holder, and is stable
    assert claim_order(ME, A) == claim_order(ME, A)


def test_a_full_gateway_keeps_what_it_holds_and_does_not_grab_fresh_slots():
    p = plan(held=[A], leases={A: lease(ME)})
    assert p.keep == (A,)
    assert p.capacity == 0
    assert p.candidates == (B,) and p.orphans == ()
    assert p.next_check == NOW + 1.0


def test_a_full_gateway_takes_over_a_slot_unheld_for_the_grace():
    p = plan(held=[A], leases={A: lease(ME)}, free_since={B: NOW - 1.0})
    assert p.orphans == (B,)
    assert p.free_since == {B: NOW - 1.0}


def test_no_takeover_beyond_capacity_while_starting_up():
    p = plan(held=[A], leases={A: lease(ME)}, free_since={B: NOW - 100},
             orphans_allowed=False)
    assert p.orphans == () and p.candidates == (B,) and p.capacity == 0
    assert p.next_check is None


def test_an_expired_lease_counts_as_free_from_its_expiry():
    expired = lease(OTHER, renewed=NOW - 3.5)
    first = plan(held=[A], leases={A: lease(ME), B: expired})
    assert first.free_since == {B: NOW - 0.5} and first.orphans == ()
    assert first.next_check == NOW + 0.5  # the grace (1 s) ends 1 s after the expiry
    later = plan(held=[A], leases={A: lease(ME), B: expired}, free_since=first.free_since,
                 now=NOW + 0.5)
    assert later.orphans == (B,)


def test_a_pass_that_runs_late_does_not_delay_the_takeover():
    """The full gateway's first look at the slot comes 2 s after the lease expired: the
    grace has passed already, it takes the slot on that pass."""
    expired = lease(OTHER, renewed=NOW - 5)
    p = plan(held=[A], leases={A: lease(ME), B: expired})
    assert p.orphans == (B,)


def test_a_released_lease_counts_as_free_from_when_it_was_first_seen_so():
    released = lease(None, renewed=NOW - 10)
    first = plan(held=[A], leases={A: lease(ME), B: released})
    assert first.free_since == {B: NOW} and first.orphans == ()
    assert plan(held=[A], leases={A: lease(ME), B: released}, free_since=first.free_since,
                now=NOW + 1.0).orphans == (B,)


def test_a_slot_held_by_someone_else_is_left_alone_until_its_lease_would_expire():
    p = plan(leases={A: lease(OTHER, renewed=NOW - 1), B: lease(OTHER, renewed=NOW - 2)})
    assert p.candidates == () and p.capacity == 1
    assert p.free_since == {}
    assert p.next_check == NOW + 1  # B's lease: renewed at NOW-2, 3 s long


def test_a_freed_slot_is_forgotten_once_someone_holds_it():
    p = plan(held=[A], leases={A: lease(ME), B: lease(OTHER)}, free_since={B: NOW - 10})
    assert p.free_since == {} and p.orphans == ()


def test_a_held_slot_claimed_by_another_holder_is_lost():
    p = plan(held=[A], leases={A: lease(OTHER)})
    assert p.lost == (A,) and p.keep == ()
    # ... and it is not a candidate while the other holds it.
    assert A not in p.candidates


def test_a_held_slot_whose_own_lease_expired_is_kept_trying():
    # Nobody took it: the renewal (an acquire by the same holder) still succeeds.
    p = plan(held=[A], leases={A: lease(ME, renewed=NOW - 10)})
    assert p.keep == (A,) and p.lost == ()


def test_a_held_slot_that_is_no_longer_servable_is_released():
    p = plan(held=[A, C], leases={A: lease(ME), C: lease(ME)}, servable=(A, B), max_slots=2)
    assert p.keep == (A,) and p.release == (C,)
    assert p.capacity == 1 and p.candidates == (B,)


def test_a_lease_that_names_this_holder_is_adopted_whatever_the_capacity():
    p = plan(leases={A: lease(ME), B: lease(ME)}, max_slots=1)
    assert p.adopt == (A, B)
    assert p.capacity == 0 and p.candidates == ()


def test_max_slots_above_one_takes_several_at_once():
    p = plan(servable=(A, B, C), max_slots=2)
    assert p.capacity == 2 and len(p.candidates) == 3
    assert p.next_check == NOW + 1.0  # the third waits for the grace


def test_nothing_servable_means_nothing_to_do():
    p = plan(servable=())
    assert p == plan_claims(holder=ME, held=set(), leases={}, servable=[], now=NOW,
                            free_since={}, limits=ClaimLimits(max_slots=1))
    assert p.candidates == () and p.next_check is None


def test_a_starting_gateway_asks_to_look_again_when_orphans_become_allowed():
    """Slots released at once (a drained survivor) are written once and never again: the
    plan itself must ask for the pass that may take the one beyond capacity."""
    limits = ClaimLimits(max_slots=1, orphan_grace=1.0, orphans_allowed=False,
                         orphans_from=NOW + 4.0)
    p = plan_claims(holder=ME, held={A}, leases={A: lease(ME), B: lease(None)},
                    servable=[A, B], now=NOW, free_since={}, limits=limits)
    assert p.orphans == () and p.next_check == NOW + 4.0
    nothing_beyond = plan_claims(holder=ME, held={A}, leases={A: lease(ME)}, servable=[A],
                                 now=NOW, free_since={}, limits=limits)
    assert nothing_beyond.next_check is None
