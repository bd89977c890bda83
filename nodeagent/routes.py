"""The mesh's routes: plan them against the main table as it is now, then apply.

meshgress owns exactly the routes in the main table that carry its route protocol
(kernel_ids.ROUTE_PROTOCOL) and either leave through the mesh interface or are of type
unreachable (the fail-closed fallback). Pod /32 routes, also tagged, belong to the CNI
and are never touched here. Adds are `replace` operations and happen before removals,
so a route that changes (say, a pod CIDR moving between peers) is never absent.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshgress.kernel_ids import ROUTE_PROTOCOL, WIREGUARD_INTERFACE
from nodeagent.mesh import RouteSpec

log = logging.getLogger("meshgress.routes")

MAIN_TABLE = 254
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
RT_SCOPE_LINK = 253
RT_SCOPE_UNIVERSE = 0


@dataclass(frozen=True)
class RoutePlan:
    add: tuple[RouteSpec, ...]
    remove: tuple[RouteSpec, ...]

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove

    def describe(self) -> list[str]:
        def fmt(r: RouteSpec) -> str:
            return f"{r.type} {r.dst}" + (f" dev {r.oif}" if r.oif else "")
        return [f"+route {fmt(r)}" for r in self.add] + [f"-route {fmt(r)}" for r in self.remove]


def plan_routes(desired: tuple[RouteSpec, ...], observed: frozenset[RouteSpec]) -> RoutePlan:
    """Add what is missing or different; remove owned routes to destinations no longer
    wanted. A destination whose route changes is replaced in place, not removed.
    Purely computational."""
    wanted = set(desired)
    wanted_dsts = {r.dst for r in desired}
    add = tuple(sorted(r for r in wanted if r not in observed))
    remove = tuple(sorted(r for r in observed if r.dst not in wanted_dsts))
    return RoutePlan(add=add, remove=remove)


class RouteAdapter(Protocol):
    def read(self) -> frozenset[RouteSpec]: ...
    def replace(self, route: RouteSpec) -> None: ...
    def delete(self, route: RouteSpec) -> None: ...


class NetlinkRoutes:
    """RouteAdapter over rtnetlink in the current network namespace."""

    def __init__(self, mesh_interface: str = WIREGUARD_INTERFACE) -> None:
        self._ipr = IPRoute()
        self._mesh_interface = mesh_interface
        # Interface indexes seen by the last read(): a pass adds thousands of routes
        # through one interface, and each lookup is a dump of every link.
        self._indexes: dict[str, int | None] = {}

    def close(self) -> None:
        self._ipr.close()

    def _ifindex(self, name: str) -> int | None:
        if name not in self._indexes:
            found = self._ipr.link_lookup(ifname=name)
            self._indexes[name] = found[0] if found else None
        return self._indexes[name]

    def read(self) -> frozenset[RouteSpec]:
        self._indexes = {}
        mesh_index = self._ifindex(self._mesh_interface)
        owned: set[RouteSpec] = set()
        for msg in self._ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if msg["proto"] != ROUTE_PROTOCOL:
                continue
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"  # noqa: S104 - a default route
            net = ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}")
            if msg["type"] == RTN_UNREACHABLE:
                owned.add(RouteSpec(dst=net, type="unreachable"))
            elif msg["type"] == RTN_UNICAST and mesh_index is not None \
                    and msg.get_attr("RTA_OIF") == mesh_index:
                owned.add(RouteSpec(dst=net, oif=self._mesh_interface))
        return frozenset(owned)

    def replace(self, route: RouteSpec) -> None:
        if route.type == "unreachable":
            self._ipr.route("replace", dst=str(route.dst), type="unreachable",
                            proto=route.protocol, table=MAIN_TABLE, scope=RT_SCOPE_UNIVERSE)
            return
        assert route.oif is not None
        index = self._ifindex(route.oif)
        if index is None:
            raise NetlinkError(19, f"route {route.dst}: interface {route.oif} does not exist")
        self._ipr.route("replace", dst=str(route.dst), oif=index, proto=route.protocol,
                        table=MAIN_TABLE, scope=RT_SCOPE_LINK)

    def delete(self, route: RouteSpec) -> None:
        kwargs: dict[str, object] = {"dst": str(route.dst), "proto": route.protocol,
                                     "table": MAIN_TABLE}
        if route.type == "unreachable":
            kwargs["type"] = "unreachable"
        try:
            self._ipr.route("del", **kwargs)
        except NetlinkError as exc:
            if exc.code != 3:  # ESRCH: already gone, which is what we wanted
                raise


def apply_routes(adapter: RouteAdapter, desired: tuple[RouteSpec, ...]) -> RoutePlan:
    """Read the kernel, plan, add (replace) before removing; returns the plan."""
    plan = plan_routes(desired, adapter.read())
    for route in plan.add:
        adapter.replace(route)
    for route in plan.remove:
        adapter.delete(route)
    return plan
