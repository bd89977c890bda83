"""The mesh's routes: plan them against the main table, then apply.

meshgress owns exactly the routes in the main table that carry its route protocol
(kernel_ids.ROUTE_PROTOCOL) and either leave through the mesh interface or are of type
unreachable (the fail-closed fallback) or blackhole (a new peer's pod CIDRs while its
handshake is pending, see `nodeagent.mesh`). Pod /32 routes, also tagged, belong to the CNI
and are never touched here. Adds are `replace` operations and happen before removals,
so a route that changes (say, a pod CIDR moving between peers) is never absent.

Three layers, as everywhere in meshgress:
- pure: `plan_routes` (the diff), `compute_routes_after` (the table once a plan is
  applied), and the translation between `RouteSpec` and the kernel library's rtnetlink
  codec (`encode_route_request`, `decode_route`, `route_dump_request`), tested without
  root;
- apply: `NetlinkRoutes`, the `RouteAdapter` over one `meshgress.kernel.rtnl.Rtnl` socket
  (and `FakeRoutes`, in memory, for tests). One dump, filtered in the kernel to the main
  table and meshgress's protocol (NETLINK_GET_STRICT_CHK, kernels 4.20+; older ones dump
  everything and the filter below still applies), is read and parsed in about 80 ms at
  5,000 routes, and writes go WRITE_BATCH messages to a send (5,000 routes: 0.1 s);
- `apply_routes`, which reads through a `TrackedDataplane` (see `nodeagent.tracker`):
  the kernel is read at start, on every periodic resync and after any error; passes in
  between plan against the table as last read plus the writes made since.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.rtnetlink import Message, Route
from meshgress.kernel.rtnl import NetlinkError, Rtnl
from meshgress.kernel_ids import ROUTE_PROTOCOL, WIREGUARD_INTERFACE
from nodeagent.mesh import RouteSpec, route_order
from nodeagent.tracker import TrackedDataplane

MAIN_TABLE = rt.RT_TABLE_MAIN
WRITE_BATCH = 64
"""Route requests per send(): a netlink write must fit the socket's send buffer, and the
acknowledgements of one batch its receive buffer."""


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
    add = tuple(sorted((r for r in set(desired) if r not in observed), key=route_order))
    missing = observed.difference(desired)
    if not missing:
        return RoutePlan(add=add, remove=())
    wanted_dsts = {r.dst for r in desired}
    remove = tuple(sorted((r for r in missing if r.dst not in wanted_dsts), key=route_order))
    return RoutePlan(add=add, remove=remove)


def compute_routes_after(observed: frozenset[RouteSpec], plan: RoutePlan) -> frozenset[RouteSpec]:
    """The owned routes once `plan` is carried out: a replace takes the place of any route
    to the same destination (as NLM_F_REPLACE does), removals are gone. Purely
    computational."""
    if plan.empty:
        return observed
    replaced = {r.dst for r in plan.add}
    gone = {r for r in observed if r.dst in replaced} if replaced else set()
    return observed.difference(gone, plan.remove).union(plan.add)


# --- between RouteSpec and the kernel's routes (pure) ---------------------------------------


def route_dump_request(protocol: int = ROUTE_PROTOCOL, table: int = MAIN_TABLE) -> Message:
    """An IPv4 route dump asking for one table and one protocol (honoured by kernels with
    NETLINK_GET_STRICT_CHK on the socket; the reply is filtered anyway)."""
    return rt.route_dump_message(table=table, protocol=protocol)


def encode_route_request(route: RouteSpec, *, delete: bool = False,
                         oif_index: int | None = None) -> Message:
    """RTM_NEWROUTE (create or replace) or RTM_DELROUTE for one owned route. A unicast
    route needs its interface's index. Purely computational."""
    if route.type == "unreachable":
        scope, kind = rt.RT_SCOPE_UNIVERSE, rt.RTN_UNREACHABLE
    elif route.type == "blackhole":
        scope, kind = rt.RT_SCOPE_UNIVERSE, rt.RTN_BLACKHOLE
    elif route.type == "unicast":
        scope, kind = rt.RT_SCOPE_LINK, rt.RTN_UNICAST
    else:
        raise ValueError(f"route {route.dst}: unknown type {route.type!r}")
    if delete:
        # A unicast route is found by destination, protocol and table (the interface would
        # only narrow it), an unreachable or blackhole one also by type; of any scope.
        return rt.route_delete_message(
            route.dst, table=MAIN_TABLE, protocol=route.protocol,
            type=rt.RTN_UNSPEC if kind == rt.RTN_UNICAST else kind)
    if kind == rt.RTN_UNICAST and oif_index is None:
        raise ValueError(f"route {route.dst}: a unicast route needs an interface index")
    return rt.route_message(Route(route.dst, MAIN_TABLE, route.protocol, kind, scope,
                                  oif_index if kind == rt.RTN_UNICAST else None))


def decode_route(body: bytes, *, mesh_index: int | None,
                 mesh_interface: str = WIREGUARD_INTERFACE,
                 protocol: int = ROUTE_PROTOCOL) -> RouteSpec | None:
    """The owned route an RTM_NEWROUTE body describes, or None when it is not one of
    meshgress's (another family, table, protocol, type or interface). Purely
    computational."""
    route = rt.decode_route(body)
    if route is None or route.protocol != protocol or route.table != MAIN_TABLE:
        return None
    if route.type == rt.RTN_UNREACHABLE:
        return RouteSpec(dst=route.dst, type="unreachable", protocol=route.protocol)
    if route.type == rt.RTN_BLACKHOLE:
        return RouteSpec(dst=route.dst, type="blackhole", protocol=route.protocol)
    if route.type == rt.RTN_UNICAST and mesh_index is not None and route.oif == mesh_index:
        return RouteSpec(dst=route.dst, oif=mesh_interface, protocol=route.protocol)
    return None


# --- apply -------------------------------------------------------------------------------


class RouteAdapter(Protocol):
    def read(self) -> frozenset[RouteSpec]: ...
    def replace(self, routes: Sequence[RouteSpec]) -> None: ...
    def delete(self, routes: Sequence[RouteSpec]) -> None: ...


class NetlinkRoutes:
    """RouteAdapter over rtnetlink in the network namespace of the creating thread.

    Writes are batched; when some of a batch fail, the others still happen and the first
    failure is raised after all were answered (the caller's tracked view is then
    invalidated, and the next pass reads the kernel)."""

    def __init__(self, mesh_interface: str = WIREGUARD_INTERFACE) -> None:
        self._rtnl = Rtnl(strict_dumps=True)
        self._mesh_interface = mesh_interface

    def close(self) -> None:
        self._rtnl.close()

    def ifindex(self, name: str) -> int | None:
        link = self._rtnl.get_link(name)
        return None if link is None else link.index

    def read(self) -> frozenset[RouteSpec]:
        mesh_index = self.ifindex(self._mesh_interface)
        owned = set()
        for kind, body in self._rtnl.request(route_dump_request()):
            if kind == rt.RTM_NEWROUTE:
                route = decode_route(body, mesh_index=mesh_index,
                                     mesh_interface=self._mesh_interface)
                if route is not None:
                    owned.add(route)
        return frozenset(owned)

    def replace(self, routes: Sequence[RouteSpec]) -> None:
        indexes: dict[str, int] = {}
        messages = []
        for route in routes:
            index = None
            if route.type == "unicast":
                assert route.oif is not None
                if route.oif not in indexes:
                    found = self.ifindex(route.oif)
                    if found is None:
                        raise NetlinkError(errno.ENODEV, f"route {route.dst}: interface "
                                                         f"{route.oif} does not exist")
                    indexes[route.oif] = found
                index = indexes[route.oif]
            messages.append(encode_route_request(route, oif_index=index))
        self._rtnl.send_all(messages, what=[_label(r) for r in routes], chunk=WRITE_BATCH)

    def delete(self, routes: Sequence[RouteSpec]) -> None:
        # ESRCH: already gone, which is what was wanted.
        self._rtnl.send_all([encode_route_request(r, delete=True) for r in routes],
                            ignore=frozenset({errno.ESRCH}), what=[_label(r) for r in routes],
                            chunk=WRITE_BATCH)


def _label(route: RouteSpec) -> str:
    return f"route {route.type} {route.dst}"


class FakeRoutes:
    """RouteAdapter in memory, for tests: `table` is what the kernel holds; a replace of
    `fail_on` raises as the kernel would."""

    def __init__(self, fail_on: RouteSpec | None = None) -> None:
        self.table: set[RouteSpec] = set()
        self.reads = 0
        self.fail_on = fail_on

    def read(self) -> frozenset[RouteSpec]:
        self.reads += 1
        return frozenset(self.table)

    def replace(self, routes: Sequence[RouteSpec]) -> None:
        for route in routes:
            if route == self.fail_on:
                raise NetlinkError(errno.EINVAL, f"route {route.dst}: refused")
            self.table = {r for r in self.table if r.dst != route.dst} | {route}

    def delete(self, routes: Sequence[RouteSpec]) -> None:
        self.table -= set(routes)


def apply_routes(adapter: RouteAdapter, desired: tuple[RouteSpec, ...],
                 tracked: TrackedDataplane[frozenset[RouteSpec]] | None = None) -> RoutePlan:
    """Plan against the kernel (read now, or as tracked), add (replace) before removing;
    returns the plan. Any error leaves `tracked` invalid, so the next pass reads."""
    if tracked is None:
        tracked = TrackedDataplane("routes", resync_interval=0.0)  # reads every time
    observed = tracked.observed(adapter.read)
    plan = plan_routes(desired, observed)
    if plan.add:
        adapter.replace(plan.add)
    if plan.remove:
        adapter.delete(plan.remove)
    tracked.wrote(compute_routes_after(observed, plan))
    return plan
