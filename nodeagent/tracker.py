"""The apply layer's view of the dataplane: as last read from the kernel, plus its own writes.

Why it exists: the design says a plan diffs against the kernel as it is now, and at 5,000
nodes reading it is what an event-triggered pass cannot afford. Measured on this
project's 2-core machines (tests/bench/scale_bench.py, 5,000 nodes): wireguard-go answers
a UAPI get in 50-80 ms before a byte of it is parsed, parsing it takes 85 ms (300 ms with
cold memos), and dumping the routes 80 ms more — against a budget of 100 ms from a
datastore write to the kernel programmed. A full read (the resync) costs 0.3-0.6 s; a
tracked pass after one change, 35-45 ms of reconcile.

So, as Calico Felix does with its deltatracker (desired and dataplane side by side, the
dataplane side refreshed by periodic full resyncs), each subsystem keeps a
`TrackedDataplane`: the state it last read from the kernel, updated by every write that
succeeded. The rules, which are the whole of the trade-off:

- a full kernel read happens at start, whenever the last one is `resync_interval` old
  (the agent's periodic resync, 10 s by default), and in the pass after any error;
- between them, an event-triggered pass plans against the tracked state;
- only a pass that completes (`wrote`) leaves a trusted state; `observed` hands the
  state out and forgets it, so an exception anywhere between the two, or an explicit
  `invalidate`, makes the next pass read the kernel.

What this gives up: a change made behind the agent's back (a route deleted by hand,
wireguard-go restarted empty) is repaired by the next resync — up to `resync_interval`
later — instead of by the next event. Drift was only ever repaired on a pass anyway; with
no events, that pass was the resync.

`apply_device_tracked` is `wireguard.backend.apply_device` with this view; the routes'
counterpart is `nodeagent.routes.apply_routes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from wireguard.backend import WireGuardBackend
from wireguard.model import Device
from wireguard.plan import DevicePlan, compute_device_after, plan_device

S = TypeVar("S")


class TrackedDataplane(Generic[S]):
    """One subsystem's dataplane as last read plus the writes made since.

    `clock` is injectable for tests (monotonic seconds). Not thread-safe: the agent's
    passes are serialised by its reconcile lock."""

    def __init__(self, name: str, *, resync_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.resync_interval = resync_interval
        self._clock = clock
        self._tracked: tuple[S] | None = None  # boxed: S may itself include None
        self._read_at: float | None = None
        self.full_reads = 0
        self.tracked_passes = 0
        self.last_pass_read = False

    @property
    def trusted(self) -> bool:
        """True when the next pass may plan without reading the kernel (if not due)."""
        return self._tracked is not None and not self._resync_due()

    def resync_in(self) -> float:
        """Seconds until the next full read is due by the clock (0 or less: now). A view
        a failed write left invalid asks for no pass of its own: the failure brings one
        after the loop's backoff, and that pass reads (asking for one at once would spin
        on an error that persists)."""
        if self._read_at is None:
            return 0.0
        return self._read_at + self.resync_interval - self._clock()

    def _resync_due(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= self.resync_interval

    def observed(self, read: Callable[[], S]) -> S:
        """The state to plan against: `read()` from the kernel, or the tracked state when
        it is trusted and no resync is due. The state is handed out, not kept: until
        `wrote` is called the view is invalid."""
        tracked = self._tracked if self.trusted else None
        self.invalidate()
        if tracked is not None:
            self.tracked_passes += 1
            self.last_pass_read = False
            return tracked[0]
        state = read()
        self._read_at = self._clock()
        self.full_reads += 1
        self.last_pass_read = True
        return state

    def wrote(self, state: S) -> None:
        """Every write of this pass succeeded: the dataplane is now `state`."""
        self._tracked = (state,)

    def invalidate(self) -> None:
        """Forget the tracked state: the next pass reads the kernel."""
        self._tracked = None


def apply_device_tracked(backend: WireGuardBackend, desired: Device,
                         tracked: TrackedDataplane[Device | None],
                         before_apply: Callable[[DevicePlan], None] = lambda plan: None
                         ) -> DevicePlan:
    """Plan the device against the kernel (read now, or as tracked), apply the plan,
    return it. Any error leaves `tracked` invalid, so the next pass reads. `before_apply`
    sees the plan first: an apply that fails part-way may have done some of it, which the
    next pass's plan no longer shows."""
    observed = tracked.observed(lambda: backend.read(desired.name))
    plan = plan_device(desired, observed)
    before_apply(plan)
    if not plan.empty:
        backend.apply(plan)
    tracked.wrote(compute_device_after(desired, observed))
    return plan
