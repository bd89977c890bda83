"""Which egress IP slots this gateway process should hold: the claiming policy.

A slot is served by whoever holds its Lease (`meshgress.slots`). Gateway processes never
talk to each other; they share only the leases, which are atomic. The policy each one
follows, so that N gateways spread the slots and one survivor serves them all:

- keep (renew) every slot it holds that it may still serve; give up the others;
- while it holds fewer than `max_slots`, take free slots (no lease, a released lease or an
  expired one) at once, trying them in an order that depends on its own identity
  (rendezvous hashing), so gateways that start together mostly reach for different
  slots; the loser of a race simply tries the next slot on its next pass;
- beyond `max_slots`, take over a slot only once nobody has held it for `orphan_grace`
  seconds (as this process saw it), so a gateway with spare capacity always wins the
  slot first, yet a lone survivor ends up serving every IP; and not at all while the
  process is starting up (`orphans_allowed` False), so gateways of one Deployment that
  start a few seconds apart spread the slots instead of the first one taking them all;
- a lease that names this holder (a restart with a stable identity) is adopted, whatever
  the capacity.

Fencing — dropping the IP when a renewal fails — is not decided here: it follows from
the lease outcomes at the apply layer.

Purely computational: no I/O, no clocks (the caller passes `now`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from meshgress.datastore import Lease
from meshgress.slots import LEASE_RENEW_SECONDS, SlotId

ORPHAN_GRACE_SECONDS = LEASE_RENEW_SECONDS / 2
"""How long a slot must have been unheld before a gateway that is already full takes it.

A gateway with room reacts within one pass of the lease expiring or being released (its
loop wakes up then; well under 0.1 s), so half a renewal interval lets it win reliably,
while a lone survivor takes a dead gateway's slot LEASE_DURATION_SECONDS + 0.5 s after
that gateway's last renewal: an expired lease counts as unheld from the moment it expired,
so a pass that runs late on a busy node does not push the takeover further out."""


@dataclass(frozen=True)
class ClaimLimits:
    """How much a gateway process may take: its capacity and when it may go beyond it."""

    max_slots: int
    orphan_grace: float = ORPHAN_GRACE_SECONDS
    orphans_allowed: bool = True
    """False while the process is starting up: no slots beyond `max_slots` yet."""
    orphans_from: float | None = None
    """When orphans become allowed (wall clock), if they are not yet: a plan that leaves
    free slots beyond capacity asks to be checked again then (nothing else may come: a
    released lease is not written again)."""


@dataclass(frozen=True)
class ClaimPlan:
    """What to do with the leases on this pass."""

    keep: tuple[SlotId, ...]
    """Held and still servable: renew."""
    release: tuple[SlotId, ...]
    """Held but no longer servable (gateway gone, node no longer selected): tear down,
    then release."""
    lost: tuple[SlotId, ...]
    """Held as far as this process knew, but the lease names another holder: fence now."""
    adopt: tuple[SlotId, ...]
    """Not held here, but the lease names this holder: acquire (a renewal)."""
    candidates: tuple[SlotId, ...]
    """Free slots to try, best first, until `capacity` of them succeeded."""
    capacity: int
    orphans: tuple[SlotId, ...]
    """Slots unheld for longer than the grace: acquire even beyond capacity."""
    free_since: Mapping[SlotId, float]
    """When each currently unheld servable slot was first seen unheld (carry it over)."""
    next_check: float | None
    """Wall-clock time at which the plan may change without any event (a lease expiring,
    a grace ending); None: only events change it."""


def lease_is_free(lease: Lease | None, now: float) -> bool:
    """Nobody holds the slot: no lease yet, released, or expired. Purely computational."""
    return lease is None or lease.expired(now)


def freed_at(lease: Lease | None, now: float) -> float:
    """When a free slot became free, as far as its lease tells: the expiry of an expired
    lease; `now` for a released or missing one (their moment is not recorded). Purely
    computational."""
    if lease is None or lease.holder is None:
        return now
    return min(now, lease.renew_time + lease.duration_seconds)


def claim_order(holder: str, slot: SlotId) -> str:
    """Rendezvous rank: each holder orders slots differently, every time the same way."""
    return hashlib.sha256(f"{holder}\0{slot.gateway}\0{slot.index}".encode()).hexdigest()


def _sort_held(holder: str, held: Collection[SlotId], leases: Mapping[SlotId, Lease | None],
               servable: Collection[SlotId], now: float
               ) -> tuple[list[SlotId], list[SlotId], list[SlotId]]:
    """The held slots as (keep, release, lost): see ClaimPlan."""
    keep: list[SlotId] = []
    release: list[SlotId] = []
    lost: list[SlotId] = []
    for slot in sorted(held):
        lease = leases.get(slot)
        if lease is not None and lease.holder is not None and lease.holder != holder \
                and not lease.expired(now):
            lost.append(slot)
        elif slot not in servable:
            release.append(slot)
        else:
            keep.append(slot)
    return keep, release, lost


def plan_claims(*, holder: str, held: Collection[SlotId],
                leases: Mapping[SlotId, Lease | None], servable: Sequence[SlotId],
                now: float, free_since: Mapping[SlotId, float],
                limits: ClaimLimits) -> ClaimPlan:
    """Decide renewals, releases, fencing and new claims. Purely computational.

    `held`: slots this process holds (its last acquire or renew succeeded and has not
    been fenced). `leases`: the current record of every servable slot's lease (missing
    key or None: no lease). `free_since`: the previous plan's map.
    """
    keep, release, lost = _sort_held(holder, held, leases, set(servable), now)

    adopt: list[SlotId] = []
    free: list[SlotId] = []
    new_free_since: dict[SlotId, float] = {}
    next_check: float | None = None

    def wake_at(when: float) -> None:
        nonlocal next_check
        if next_check is None or when < next_check:
            next_check = when

    for slot in servable:
        if slot in held:
            continue
        lease = leases.get(slot)
        if lease is not None and lease.holder == holder:
            adopt.append(slot)
        elif lease_is_free(lease, now):
            free.append(slot)
            new_free_since[slot] = free_since.get(slot, freed_at(lease, now))
        else:
            assert lease is not None
            wake_at(lease.renew_time + lease.duration_seconds)

    capacity = max(0, limits.max_slots - len(keep) - len(adopt))
    candidates = sorted(free, key=lambda s: claim_order(holder, s))
    # Slots beyond capacity wait for the grace, measured from when they were first seen
    # free; the first `capacity` candidates are tried anyway, the rest may become orphans.
    orphans: list[SlotId] = []
    for slot in candidates[capacity:] if limits.orphans_allowed else ():
        since = new_free_since[slot]
        if now - since >= limits.orphan_grace:
            orphans.append(slot)
        else:
            wake_at(since + limits.orphan_grace)
    if not limits.orphans_allowed and candidates[capacity:] and limits.orphans_from is not None:
        wake_at(limits.orphans_from)
    return ClaimPlan(keep=tuple(keep), release=tuple(release), lost=tuple(lost),
                     adopt=tuple(adopt), candidates=tuple(candidates), capacity=capacity,
                     orphans=tuple(orphans), free_since=new_free_since, next_check=next_check)
