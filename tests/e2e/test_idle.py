"""An idle lab costs next to nothing: no agent or gateway spends more than 2 % of a core.

Idle: no pod sends anything and nothing in the cluster changes, but every egress slot is
held, so the gateways renew their leases every second and every node probes every slot
through its tunnel every 100 ms (the health checking failover depends on, which runs
whenever a slot has a holder). Everything else must sleep: the datastore watches until a
write (inotify on the file datastore, the open HTTP stream on kube), the metrics servers,
the probe responder, the uplink watcher and the CNI server until something arrives, the
reconcile loop until a change that matters (a lease renewal does not) or its resync.

The window starts once the lab has been quiet for a while (no write but lease renewals,
seen through the datastore's own watch), so the start-up's tail (handshakes, first status
writes) is not counted, and the test checks that the lab stayed quiet through the window.
"""

from __future__ import annotations

import threading
import time

import pytest

from meshgress.datastore import Kind, object_key
from meshgress.lab.lab import Lab
from tests.conftest import lab, lab_store
from tests.cpu_usage import Window

pytestmark = pytest.mark.e2e

LIMIT = 0.02
"""Share of one core an idle agent or gateway may use."""
WINDOW = 20.0
QUIET_BEFORE = 5.0
SETTLE_DEADLINE = 90.0


def holder(lease: dict) -> object:
    return (lease.get("spec") or {}).get("holderIdentity")


class ChangeWatch:
    """Follows every kind of the lab's datastore; notes when something other than a lease
    renewal (a Lease modified with the same holder) was last written."""

    def __init__(self, name: str) -> None:
        self.store = lab_store(name)
        self.leases = {object_key(o): o for o in self.store.list(Kind.LEASE).items}
        self.start_version = max(
            self.store.list(kind).resource_version for kind in Kind)
        self.last_change = time.monotonic()
        self.changes: list[str] = []
        self.renewals = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.store.watch(frozenset(Kind), self.start_version, stop=self.stop,
                                          bookmark_interval=1.0):
                if event.type == "BOOKMARK":
                    continue
                key = object_key(event.object)
                if event.kind is Kind.LEASE and event.type == "MODIFIED":
                    before = self.leases.get(key)
                    self.leases[key] = event.object
                    if before is not None and holder(before) == holder(event.object):
                        self.renewals += 1
                        continue
                meta = event.object.get("metadata") or {}
                self.changes.append(f"{event.type} {event.kind} "
                                    f"{meta.get('namespace', '')}/{meta.get('name')}")
                self.last_change = time.monotonic()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.store.close()


def test_an_idle_lab_agent_or_gateway_uses_under_2_percent_of_a_core(lab_name):
    lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "2")
    record = Lab(str(lab_name)).load_record()
    assert record is not None
    processes = {f"{node} agent": pid for node, pid in record.agents.items()}
    processes |= {f"{node} gateway": pid for node, pid in record.gateways.items()}
    assert len(processes) == 6, processes

    watch = ChangeWatch(lab_name)
    try:
        deadline = time.monotonic() + SETTLE_DEADLINE
        while time.monotonic() - watch.last_change < QUIET_BEFORE:
            assert watch.error is None, f"the datastore watch failed: {watch.error!r}"
            assert time.monotonic() < deadline, (
                f"the lab never went {QUIET_BEFORE:.0f}s without a write other than lease "
                f"renewals; the last ones: {watch.changes[-10:]}")
            time.sleep(0.2)
        changes_before, renewals_before = len(watch.changes), watch.renewals
        window = Window(processes).start()
        time.sleep(WINDOW)
        window.stop()
        during = watch.changes[changes_before:]
        renewals = watch.renewals - renewals_before
    finally:
        watch.close()

    assert watch.error is None, f"the datastore watch failed: {watch.error!r}"
    assert not during, f"the lab was not idle during the window: {during}"
    # Both slots held all along: renewed about once a second each.
    assert renewals >= WINDOW, f"only {renewals} lease renewals in {window.seconds:.0f}s"
    report = "\n".join(window.describe())
    gone = [name for name, share in window.shares.items() if share is None]
    assert not gone, f"processes ended during the window: {gone}\n{report}"
    busy = {name: share for name, share in window.shares.items()
            if share is not None and share > LIMIT}
    assert not busy, (f"idle for {window.seconds:.0f}s, these used more than {LIMIT:.0%} of "
                      f"a core: {sorted(busy)}\n{report}")
    print(f"\nidle lab on {lab_name.datastore}, {window.seconds:.0f}s:\n{report}")
