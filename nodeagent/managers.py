"""The node agent's managers: each applies one part of the node's desired state.

The agent computes the whole desired state purely (`nodeagent.mesh`, `nodeagent.firewall`,
`nodeagent.steering`) and hands each part to the manager that owns its kernel objects:

- `MeshManager`: the `meshgress0` WireGuard device and the mesh routes, each planned
  against a `TrackedDataplane` (the kernel as last read plus the writes since), and the
  handshake of every new pair started from one side only (see `nodeagent.mesh`);
- `FirewallManager`: the node's nftables table, read and planned on every apply;
- `SteeringManager`: the per-slot egress tunnels, tables and rules, read once per pass and
  planned by `plan_steering`, applied in two phases around the nftables step.

Every kernel port is passed in (a real adapter, or a fake in tests), so the order the agent
applies things in — what makes a node fail closed — can be checked without root. The
managers decide nothing about the cluster; they remember only what the kernel cannot tell
them (the tracked views, new peers' handshake timers, and each slot tunnel's holder
tenure).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from meshgress.kernel.nft_model import NftPlan, Ruleset
from meshgress.kernel.nftables import NftablesPort, apply_ruleset
from nodeagent.mesh import (
    MeshState,
    RouteSpec,
    compute_routes_while_pending,
    handshake_grace,
    is_initiator,
)
from nodeagent.routes import RouteAdapter, RoutePlan, apply_routes
from nodeagent.steering import SteeringState
from nodeagent.steering_kernel import (
    ObservedSteering,
    SlotTunnelsFailed,
    SteeringPlan,
    SteeringPort,
    apply_steering_adds,
    apply_steering_removes,
    plan_steering,
)
from nodeagent.tracker import TrackedDataplane, apply_device_tracked
from wireguard.backend import WireGuardBackend
from wireguard.model import Device
from wireguard.plan import DevicePlan


class MeshManager:
    """The mesh device and the mesh routes, against tracked views of the kernel, and the
    handshakes of new pairs.

    A peer added to the device (a new node, or every peer of a recreated device) is either
    this side's to start — a kick is owed until one succeeds — or the other side's: then
    it is *pending* until its grace has passed, its routes are blackholes meanwhile, and
    at the end of the grace this side kicks once and routes into the mesh. Peers found on
    the device (after a restart) are established: routed, never kicked."""

    def __init__(self, wireguard: WireGuardBackend, routes: RouteAdapter, *,
                 resync_interval: float, own_public_key: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._wireguard = wireguard
        self._routes = routes
        self._own_key = own_public_key
        self._clock = clock
        self.device_view: TrackedDataplane[Device | None] = TrackedDataplane(
            "wireguard", resync_interval=resync_interval)
        self.routes_view: TrackedDataplane[frozenset[RouteSpec]] = TrackedDataplane(
            "routes", resync_interval=resync_interval)
        self.pending: dict[str, float] = {}
        """Peers whose handshake the other side starts: key → when this side takes over."""
        self.owed: set[str] = set()
        """Peers whose handshake this side starts and has not kicked yet."""
        self._graces_checked_at = float("-inf")
        """When the last kick step looked for graces that had ended."""

    def apply_device(self, device: Device) -> DevicePlan:
        return apply_device_tracked(self._wireguard, device, self.device_view,
                                    before_apply=self._note_handshakes)

    def _note_handshakes(self, plan: DevicePlan) -> None:
        """Before the apply: one that fails after adding some peers must not leave them
        without their handshake (a kick of a peer not on the device does nothing)."""
        now = self._clock()
        for key in plan.remove_peers:
            self.pending.pop(key, None)
            self.owed.discard(key)
        for peer in plan.add_peers:
            key = peer.public_key
            if is_initiator(self._own_key, key):
                self.owed.add(key)
            elif key not in self.pending:
                self.pending[key] = now + handshake_grace(self._own_key, key)

    def kick_handshakes(self, interface: str) -> list[str]:
        """Kick what is owed, and the pending peers whose grace has passed (they then leave
        `pending`, so their routes go into the mesh in the same pass)."""
        now = self._clock()
        self._graces_checked_at = now
        due = sorted(key for key, at in self.pending.items() if at <= now)
        keys = sorted(self.owed) + due
        if not keys:
            return []
        self._wireguard.kick(interface, keys)
        self.owed.clear()
        for key in due:
            del self.pending[key]
        return [f"kicked a handshake with {key[:8]} ({'grace passed' if key in due else 'new'})"
                for key in keys]

    def routes(self, mesh: MeshState) -> tuple[RouteSpec, ...]:
        """The routes to apply: the mesh's, with pending peers' held back."""
        return compute_routes_while_pending(mesh, frozenset(self.pending))

    def apply_routes(self, routes: tuple[RouteSpec, ...]) -> RoutePlan:
        return apply_routes(self._routes, routes, self.routes_view)

    def resync_in(self) -> float:
        """Seconds until this manager needs a pass: a view's full read, or the end of a
        pending peer's grace."""
        wake = min(self.device_view.resync_in(), self.routes_view.resync_in())
        now = self._clock()
        # A grace that had ended when the kick step looked was that step's to act on; if
        # its kick failed, the failed step brings the retry (asking for a pass now would
        # spin while it keeps failing). One that ended since, while the rest of the pass
        # ran, is not: it needs a pass now, or its peer waits for the next resync.
        coming = [max(at - now, 0.0) for at in self.pending.values()
                  if at > self._graces_checked_at]
        return min([wake, *coming])

    def full_reads(self) -> dict[str, int]:
        return {view.name: view.full_reads for view in (self.device_view, self.routes_view)}


class FirewallManager:
    """The node's nftables table: read, planned and applied in one transaction."""

    def __init__(self, nft: NftablesPort) -> None:
        self.nft = nft

    def apply(self, ruleset: Ruleset) -> NftPlan:
        return apply_ruleset(self.nft, ruleset)

    def counters(self) -> dict[str, tuple[int, int]]:
        return self.nft.counters()


class SteeringManager:
    """The slot tunnels, their routing tables and fwmark rules."""

    def __init__(self, port: SteeringPort, wireguard: WireGuardBackend) -> None:
        self._port = port
        self._wireguard = wireguard
        self._tenures: dict[str, str] = {}
        self.observed = ObservedSteering()
        """As read at the start of the current pass."""

    def read(self, probe_source: ipaddress.IPv4Address) -> ObservedSteering:
        self.observed = self._port.read(probe_source)
        return self.observed

    def plan(self, desired: SteeringState) -> SteeringPlan:
        return plan_steering(desired, self.observed, self._tenures)

    def apply_adds(self, plan: SteeringPlan, probe_source: ipaddress.IPv4Address) -> list[str]:
        try:
            done = apply_steering_adds(self._port, self._wireguard, plan, probe_source)
        except SlotTunnelsFailed as exc:
            # A failed tunnel's session reset is retried with it on the next pass.
            self._tenures.update({name: tenure for name, tenure in plan.tenures.items()
                                  if name not in exc.failed})
            raise
        self._tenures.update(plan.tenures)
        return done

    def apply_removes(self, plan: SteeringPlan) -> list[str]:
        done = apply_steering_removes(self._port, self._wireguard, plan)
        for name in plan.remove_interfaces:
            self._tenures.pop(name, None)
        return done
