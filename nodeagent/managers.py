"""The node agent's managers: each applies one part of the node's desired state.

The agent computes the whole desired state purely (`nodeagent.mesh`, `nodeagent.firewall`,
`nodeagent.steering`) and hands each part to the manager that owns its kernel objects:

- `MeshManager`: the `meshgress0` WireGuard device and the mesh routes, each planned
  against a `TrackedDataplane` (the kernel as last read plus the writes since);
- `FirewallManager`: the node's nftables table, read and planned on every apply;
- `SteeringManager`: the per-slot egress tunnels, tables and rules, read once per pass and
  planned by `plan_steering`, applied in two phases around the nftables step.

Every kernel port is passed in (a real adapter, or a fake in tests), so the order the agent
applies things in — what makes a node fail closed — can be checked without root. The
managers decide nothing about the cluster; they remember only what the kernel cannot tell
them (the tracked views, and each slot tunnel's holder tenure).
"""

from __future__ import annotations

import ipaddress

from meshgress.kernel.nft_model import NftPlan, Ruleset
from meshgress.kernel.nftables import NftablesPort, apply_ruleset
from nodeagent.mesh import RouteSpec
from nodeagent.routes import RouteAdapter, RoutePlan, apply_routes
from nodeagent.steering import SteeringState
from nodeagent.steering_kernel import (
    ObservedSteering,
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
    """The mesh device and the mesh routes, against tracked views of the kernel."""

    def __init__(self, wireguard: WireGuardBackend, routes: RouteAdapter, *,
                 resync_interval: float) -> None:
        self._wireguard = wireguard
        self._routes = routes
        self.device_view: TrackedDataplane[Device | None] = TrackedDataplane(
            "wireguard", resync_interval=resync_interval)
        self.routes_view: TrackedDataplane[frozenset[RouteSpec]] = TrackedDataplane(
            "routes", resync_interval=resync_interval)

    def apply_device(self, device: Device) -> DevicePlan:
        return apply_device_tracked(self._wireguard, device, self.device_view)

    def apply_routes(self, routes: tuple[RouteSpec, ...]) -> RoutePlan:
        return apply_routes(self._routes, routes, self.routes_view)

    def resync_in(self) -> float:
        """Seconds until a view is due for its full read."""
        return min(self.device_view.resync_in(), self.routes_view.resync_in())

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
        done = apply_steering_adds(self._port, self._wireguard, plan, probe_source)
        self._tenures.update(plan.tenures)
        return done

    def apply_removes(self, plan: SteeringPlan) -> list[str]:
        done = apply_steering_removes(self._port, self._wireguard, plan)
        for name in plan.remove_interfaces:
            self._tenures.pop(name, None)
        return done
