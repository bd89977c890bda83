"""The gateway's lease keeping: which slots this process holds, and fencing.

An egress IP is up only while this process holds its slot's lease. `LeaseKeeper` owns that
promise, with its own lock and its own thread:

- it takes leases (`acquire`), gives them up on purpose (`release`: IP first, then the
  lease, so a standby can take it at once; the slot's annotations are cleared in that same
  write, which lands only while this process still holds the lease, so a late release
  never clears what the next holder published), and renews held ones every
  `renew_interval` on its thread;
- when a renewal is refused (another holder) or keeps failing until shortly before the
  lease would expire, it *fences* the slot: the IP goes at once, and the reconcile loop
  (poked) tears the rest of the slot down;
- the IP is added with a kernel lifetime shorter than the lease (`bring_up`) and refreshed
  after every renewal, so if this process dies, hangs or loses the datastore, the kernel
  removes the IP before anybody else can take the lease;
- adding the IP and fencing it take the same lock, so a stale decision never re-adds it.

What this process holds is runtime state (`HeldSlot`), never spec: the reconcile loop
decides *which* slots to claim (`gateway.claims`), this module only keeps them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.dataplane import EgressAddress, KernelError, KernelPort
from meshgress.cluster import SLOT_LEASE_ANNOTATIONS
from meshgress.datastore import Datastore, DatastoreError, Lease, LeaseHeld
from meshgress.slots import SlotId

log = logging.getLogger("meshgress.gateway")

FENCE_MARGIN = 0.5
"""Seconds before the lease could expire (by our clock) at which a slot whose renewals
keep failing is fenced."""
KERNEL_SLACK = 0.35
"""How late the kernel may remove an address after its lifetime ends (measured: ~20 ms;
the worst case of its timer rounding is 250 ms)."""


def slot_name(slot: SlotId) -> str:
    return f"{slot.gateway}/{slot.index}"


@dataclass
class HeldSlot:
    """A slot whose lease this process holds (runtime state, never spec)."""

    slot: SlotId
    valid_until: float
    """Wall clock; the lease is ours at least until then (renewal start + duration)."""
    address: EgressAddress | None = None
    """The egress IP as this process brought it up (None: not up)."""
    ready: bool = False


@dataclass
class LeaseMetrics:
    acquisitions: int = 0
    releases: int = 0
    fenced: int = 0
    renew_failures: int = 0


class LeaseKeeper:
    """The slots this process holds, their renewals and their fencing."""

    def __init__(self, store: Datastore, kernel: KernelPort, *, identity: str,
                 lease_duration: float, renew_interval: float,
                 clock: Callable[[], float] = time.time,
                 count_error: Callable[[str], None] = lambda op: None,
                 on_lost: Callable[[], None] = lambda: None) -> None:
        """`count_error` counts what fails in the keeper's own work (renewals, refreshing
        and fencing the IP); `release` and `bring_up` report their failures to their
        caller, whose pass they belong to."""
        self.store = store
        self.kernel = kernel
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self.clock = clock
        self.metrics = LeaseMetrics()
        self._count_error = count_error
        self._on_lost = on_lost
        self._lock = threading.RLock()
        self._held: dict[SlotId, HeldSlot] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what is held ---------------------------------------------------------------

    def held(self) -> dict[SlotId, HeldSlot]:
        with self._lock:
            return dict(self._held)

    def lifetime(self, held: HeldSlot) -> int:
        """Seconds the IP may stay up: it must be gone before the lease can expire."""
        return int(held.valid_until - self.clock() - KERNEL_SLACK)

    # -- taking and giving up -------------------------------------------------------

    def acquire(self, slot: SlotId) -> Lease | None:
        """Take the slot's lease: the lease when taken, None when someone else holds it.
        Other datastore errors are raised."""
        started = self.clock()
        try:
            lease = self.store.acquire_lease(slot.lease_name, self.identity,
                                             self.lease_duration)
        except LeaseHeld as exc:
            log.debug("slot=%s not taken: %s", slot_name(slot), exc)
            return None
        with self._lock:
            self._held[slot] = HeldSlot(slot, valid_until=started + self.lease_duration)
        self.metrics.acquisitions += 1
        return lease

    def fence(self, slot: SlotId, reason: str) -> None:
        """The lease is lost (or about to be): the IP goes now, the rest on the next pass."""
        with self._lock:
            held = self._held.pop(slot, None)
            if held is None:
                return
            if held.address is not None:
                try:
                    self.kernel.delete_egress_address(held.address)
                except KernelError as exc:
                    # It still expires on its own, before the lease can be taken.
                    self._count_error("fence")
                    log.error("slot=%s cannot remove %s: %s", slot_name(slot),
                              held.address.ip, exc)
        self.metrics.fenced += 1
        log.warning("slot fenced slot=%s reason=%s ip_removed=%s", slot_name(slot), reason,
                    held.address.ip if held.address else None)
        self._on_lost()

    def release(self, slot: SlotId, reason: str) -> bool:
        """Give a held slot up on purpose: IP first, then the lease and its annotations.
        False when it could not be released (logged, for the caller to count: the slot is
        given up either way, its lease then expires)."""
        with self._lock:
            held = self._held.get(slot)
            if held is None:
                return True
            if held.address is not None:
                try:
                    self.kernel.delete_egress_address(held.address)
                except KernelError as exc:
                    # Not released: the lease then expires after the IP's lifetime ended.
                    self._held.pop(slot, None)
                    log.error("slot=%s cannot remove %s; letting the lease expire: %s",
                              slot_name(slot), held.address.ip, exc)
                    return False
            self._held.pop(slot, None)
        try:
            released = self._release_lease(slot)
        except DatastoreError as exc:
            log.warning("slot=%s release failed (it expires instead): %s", slot_name(slot), exc)
            return False
        if not released:
            # Its lease expired and was taken before this release: nothing of ours was
            # left to give up (the IP's lifetime had ended before the lease did).
            log.warning("slot given up slot=%s reason=%s: its lease had already passed to "
                        "another holder", slot_name(slot), reason)
            return True
        self.metrics.releases += 1
        log.info("slot released slot=%s reason=%s", slot_name(slot), reason)
        return True

    # -- the egress IP ----------------------------------------------------------------

    def bring_up(self, slot: SlotId, address: EgressAddress, present: bool) -> bool | None:
        """Add the egress IP of a held slot, under the fencing lock. True: added now;
        None: nothing to do (up already, or the slot was fenced meanwhile); False: it
        could not be added (the reason is logged, for the caller to count)."""
        with self._lock:
            held = self._held.get(slot)
            if held is None:
                return None
            if present:
                # Up already; its lifetime is the renewals' business (setting it here, from
                # an older renewal, would only shorten it).
                held.address = address
                return None
            lifetime = self.lifetime(held)
            if lifetime < 1:
                log.warning("slot=%s lease too close to expiry to bring %s up",
                            slot_name(slot), address.ip)
                return False
            try:
                self.kernel.replace_egress_address(address, lifetime)
            except KernelError as exc:
                log.warning("slot=%s cannot add %s: %s", slot_name(slot), address.ip, exc)
                return False
            held.address = address
        log.info("egress ip up slot=%s ip=%s interface=%s lifetime=%ds", slot_name(slot),
                 address.ip, address.interface, lifetime)
        return True

    def forget_address(self, address: EgressAddress) -> None:
        """The dataplane removed `address`: no held slot has it up any more."""
        with self._lock:
            for held in self._held.values():
                if held.address == address:
                    held.address = None

    def addresses(self) -> set[EgressAddress]:
        with self._lock:
            return {h.address for h in self._held.values() if h.address is not None}

    def set_ready(self, slots: Iterable[SlotId], ok: bool) -> None:
        with self._lock:
            for slot in slots:
                held = self._held.get(slot)
                if held is not None:
                    held.ready = ok and held.address is not None

    # -- renewals (own thread) --------------------------------------------------------

    def start(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._keep, name="leases", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _keep(self) -> None:
        while not self._stop.is_set():
            wait = self.renew_interval
            for held in self.held().values():
                if self._stop.is_set():
                    return
                try:
                    renewed = self.renew(held.slot)
                except Exception:
                    # Never let this thread die: the IPs would expire and flap.
                    self._count_error("renew")
                    log.exception("slot=%s renewal failed", slot_name(held.slot))
                    renewed = False
                if not renewed:
                    wait = min(wait, 0.2)
            self._stop.wait(wait)

    def renew(self, slot: SlotId) -> bool:
        """Renew one held slot's lease and refresh its IP's lifetime. False when the
        renewal failed and should be retried soon."""
        started = self.clock()
        try:
            self.store.acquire_lease(slot.lease_name, self.identity, self.lease_duration)
        except LeaseHeld as exc:
            self.metrics.renew_failures += 1
            self.fence(slot, f"renewal refused: {exc}")
            return True
        except (DatastoreError, OSError) as exc:
            self.metrics.renew_failures += 1
            with self._lock:
                held = self._held.get(slot)
                deadline = held.valid_until - FENCE_MARGIN if held else 0.0
            if self.clock() >= deadline:
                self.fence(slot, f"cannot renew before the lease expires: {exc}")
            else:
                log.warning("slot=%s renewal failed, retrying: %s", slot_name(slot), exc)
            return False
        with self._lock:
            held = self._held.get(slot)
            if held is not None:
                held.valid_until = started + self.lease_duration
                self._refresh_address(held)
                return True
        # Given up (released or fenced) while this renewal was in flight: undo the
        # renewal, so a standby need not wait for the lease to expire.
        with contextlib.suppress(DatastoreError):
            self._release_lease(slot)
        return True

    def _release_lease(self, slot: SlotId) -> bool:
        """One write, which lands only while the lease is still ours: no holder, and none
        of what this process published on it. False: it was not ours, nothing written."""
        return self.store.release_lease(slot.lease_name, self.identity,
                                        clear_annotations=SLOT_LEASE_ANNOTATIONS)

    def _refresh_address(self, held: HeldSlot) -> None:
        if held.address is None:
            return
        lifetime = self.lifetime(held)
        if lifetime < 1:
            return
        try:
            self.kernel.replace_egress_address(held.address, lifetime)
        except KernelError as exc:
            self._count_error("refresh-ip")
            log.warning("slot=%s cannot refresh %s: %s", slot_name(held.slot), held.address.ip,
                        exc)
