"""A node's egress steering in the kernel: plan it against what is there, then apply it.

meshgress owns, for steering: interfaces named `mge` + 8 hex digits (the gateway's own
`mgeg…` interfaces are never touched), `ip rule`s at RULE_PRIORITY_EGRESS with the
meshgress fwmark mask, and default routes tagged with its route protocol in tables
ROUTING_TABLE_BASE..+255 (a blackhole in the drop table; in each slot table, one through
its slot interface and a blackhole behind it at FALLBACK_METRIC). Each slot interface
carries the node's probe address and loose
reverse-path filtering (replies from the outside arrive on the tunnel while the main
table routes their source elsewhere).

Three layers, as everywhere in meshgress:
- pure: `plan_steering(desired, observed, tenures)` diffs `SteeringState` (from
  `nodeagent.steering`) against an `ObservedSteering` read from the kernel;
- apply: a `SteeringPort` (the kernel: `NetlinkSteering`, or `FakeSteering` in tests)
  and the WireGuard backend;
- `apply_steering_adds` and `apply_steering_removes`, the two phases of one pass: a
  reconcile adds everything new (tunnels, tables, rules) before the nftables marks point
  at it, and removes what is obsolete only after the marks stopped pointing at it.

Every pass reads what it plans against, so the reads must be cheap even on a node with
thousands of mesh routes in its main table: routes come from small dumps the kernel
filters (NETLINK_GET_STRICT_CHK) — one per slot interface and one for blackholes, both
of meshgress's protocol — rather than one dump of every table; rules from one rule dump.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.rtnetlink import Message, Route, Rule
from meshgress.kernel.rtnl import Rtnl
from meshgress.kernel_ids import (
    FWMARK_MASK,
    ROUTE_PROTOCOL,
    ROUTING_TABLE_BASE,
    RULE_PRIORITY_EGRESS,
)
from meshgress.runtime import is_permanent
from meshgress.slots import slot_number_of_table
from nodeagent.steering import SteeringState
from wireguard.backend import WireGuardBackend, apply_device
from wireguard.fake import FakeBackend
from wireguard.model import Device

NODE_SLOT_INTERFACE = re.compile(r"^mge[0-9a-f]{8}$")
TABLE_RANGE = range(ROUTING_TABLE_BASE, ROUTING_TABLE_BASE + 256)
RP_FILTER_LOOSE = 2
FALLBACK_METRIC = 0xFFFFFFFF
"""The metric of the blackholes meshgress writes: the lowest priority there is, so in a
slot table the blackhole serves only once the route through the tunnel is gone."""

TableRoute = tuple[int, str | None]
"""(table, interface) of an owned default route; interface None: a blackhole."""
MarkRule = tuple[int, int]
"""(fwmark, table) of an owned rule."""


@dataclass(frozen=True)
class ObservedSteering:
    """What the kernel has of a node's steering now."""

    interfaces: frozenset[str] = frozenset()
    routes: frozenset[TableRoute] = frozenset()
    rules: frozenset[MarkRule] = frozenset()
    probe_addresses: frozenset[str] = frozenset()
    """Slot interfaces that carry the node's probe address."""
    loose_rp_filter: frozenset[str] = frozenset()
    """Slot interfaces whose rp_filter is already loose."""

    def slot_numbers(self) -> dict[str, int]:
        """Slot interface → the number its table says it has (meshgress.slots), so a
        restarted agent keeps every slot's mark and table."""
        numbers: dict[str, int] = {}
        for table, interface in self.routes:
            number = slot_number_of_table(table)
            if interface is not None and number is not None:
                numbers[interface] = number
        return numbers


@dataclass(frozen=True)
class SteeringPlan:
    """One pass's changes. Phase one (adds) runs before the nftables step, phase two
    (removes) after it."""

    devices: tuple[Device, ...] = ()
    """Every slot tunnel, configured (WireGuard plans each against itself)."""
    reset_sessions: tuple[str, ...] = ()
    """Slot tunnels whose peer is dropped first: a new holder tenure needs a fresh
    session even when key and endpoint are unchanged."""
    add_probe_addresses: tuple[str, ...] = ()
    set_rp_filter: tuple[str, ...] = ()
    add_routes: tuple[TableRoute, ...] = ()
    add_rules: tuple[MarkRule, ...] = ()
    remove_rules: tuple[MarkRule, ...] = ()
    remove_routes: tuple[TableRoute, ...] = ()
    remove_interfaces: tuple[str, ...] = ()
    tenures: Mapping[str, str] = field(default_factory=dict)
    """The holder tenure of each slot tunnel once the plan is applied."""

    def without_interfaces(self, names: Collection[str]) -> SteeringPlan:
        """This plan less what needs one of the slot tunnels `names` (which could not be
        configured): their probe addresses, rp_filter and routes, and the rules into the
        tables of those routes, so no mark leads to a table without its route."""
        if not names:
            return self
        lost_tables = {table for table, interface in self.add_routes if interface in names}
        return dataclasses.replace(
            self,
            add_probe_addresses=tuple(n for n in self.add_probe_addresses if n not in names),
            set_rp_filter=tuple(n for n in self.set_rp_filter if n not in names),
            add_routes=tuple(r for r in self.add_routes if r[1] not in names),
            add_rules=tuple(r for r in self.add_rules if r[1] not in lost_tables))

    def describe(self) -> list[str]:
        def route(r: TableRoute) -> str:
            return f"default table {r[0]} {r[1] or 'blackhole'}"
        return ([f"{name}: reset session" for name in self.reset_sessions]
                + [f"+route {route(r)}" for r in self.add_routes]
                + [f"+rule fwmark {m:#x} table {t}" for m, t in self.add_rules]
                + [f"-rule fwmark {m:#x} table {t}" for m, t in self.remove_rules]
                + [f"-route {route(r)}" for r in self.remove_routes]
                + [f"-interface {name}" for name in self.remove_interfaces])


def plan_steering(desired: SteeringState, observed: ObservedSteering,
                  tenures: Mapping[str, str]) -> SteeringPlan:
    """What to change so the kernel steers as `desired` says. `tenures` is the holder
    tenure each slot tunnel was last configured for (empty after a restart: what is
    found is adopted). A kept table whose tunnel route changes has it replaced in place
    (the kernel replaces the route of the same metric), never emptied first. Purely
    computational."""
    wanted = {device.name for device in desired.devices}
    wanted_tables = {table for table, _ in desired.routes}
    routes, rules = set(desired.routes), set(desired.rules)
    return SteeringPlan(
        devices=desired.devices,
        reset_sessions=tuple(sorted(
            name for name in wanted
            if tenures.get(name) not in (None, desired.tenures.get(name, "")))),
        add_probe_addresses=tuple(sorted(wanted - observed.probe_addresses)),
        set_rp_filter=tuple(sorted(wanted - observed.loose_rp_filter)),
        add_routes=tuple(sorted(routes - observed.routes, key=_route_key)),
        add_rules=tuple(sorted(rules - observed.rules)),
        remove_rules=tuple(sorted(observed.rules - rules)),
        remove_routes=tuple(sorted((r for r in observed.routes - routes
                                    if r[0] not in wanted_tables), key=_route_key)),
        remove_interfaces=tuple(sorted(observed.interfaces - wanted)),
        tenures={name: desired.tenures.get(name, "") for name in sorted(wanted)},
    )


def _route_key(route: TableRoute) -> tuple[int, str]:
    return (route[0], route[1] or "")


# --- the kernel port --------------------------------------------------------------------------


class SteeringPort(Protocol):
    """What steering needs of rtnetlink, in the node's network namespace."""

    def read(self, probe_source: ipaddress.IPv4Address) -> ObservedSteering: ...

    def configure(self, plan: SteeringPlan, probe_source: ipaddress.IPv4Address) -> None:
        """Probe addresses and rp_filter on slot tunnels, then the routes, then the rules
        that point at them (all of `plan`'s adds)."""
        ...

    def remove(self, plan: SteeringPlan) -> None:
        """The plan's rule and route removals; what is already gone is no error."""
        ...


def _rule(mark: int, table: int) -> Rule:
    return Rule(priority=RULE_PRIORITY_EGRESS, fwmark=mark, fwmask=FWMARK_MASK, table=table,
                protocol=ROUTE_PROTOCOL)


def _is_owned_rule(rule: Rule) -> bool:
    return rule.priority == RULE_PRIORITY_EGRESS and rule.fwmask == FWMARK_MASK


class NetlinkSteering:
    """SteeringPort over rtnetlink, in the network namespace of the creating thread."""

    def __init__(self) -> None:
        self._rtnl = Rtnl(strict_dumps=True)

    def close(self) -> None:
        self._rtnl.close()

    def _slot_links(self) -> dict[str, int]:
        return {link.name: link.index for link in self._rtnl.links()
                if NODE_SLOT_INTERFACE.match(link.name)}

    def _routes(self, links: Mapping[str, int]) -> set[TableRoute]:
        names = {index: name for name, index in links.items()}
        if self._rtnl.strict_dumps_on:
            dumps = [self._rtnl.routes(protocol=ROUTE_PROTOCOL, type=rt.RTN_BLACKHOLE)]
            dumps += [self._rtnl.routes(protocol=ROUTE_PROTOCOL, type=rt.RTN_UNICAST, oif=index)
                      for index in sorted(names)]
        else:  # the kernel ignores the filters: one dump of everything
            dumps = [self._rtnl.routes(protocol=ROUTE_PROTOCOL)]
        found: set[TableRoute] = set()
        for route in (r for dump in dumps for r in dump):
            if route.dst.prefixlen or route.table not in TABLE_RANGE:
                continue
            if route.type == rt.RTN_BLACKHOLE:
                found.add((route.table, None))
            elif route.type == rt.RTN_UNICAST and route.oif in names:
                found.add((route.table, names[route.oif]))
        return found

    def read(self, probe_source: ipaddress.IPv4Address) -> ObservedSteering:
        links = self._slot_links()
        names = {index: name for name, index in links.items()}
        probe = frozenset(names[a.index] for a in self._rtnl.addresses()
                          if a.index in names and a.address == probe_source
                          and a.prefixlen == 32)
        loose = frozenset(name for name, index in links.items()
                          if (conf := self._rtnl.ipv4_conf(index)) is not None
                          and conf.rp_filter == RP_FILTER_LOOSE)
        return ObservedSteering(
            interfaces=frozenset(links), routes=frozenset(self._routes(links)),
            rules=frozenset((r.fwmark, r.table) for r in self._rtnl.rules()
                            if _is_owned_rule(r)),
            probe_addresses=probe, loose_rp_filter=loose)

    def configure(self, plan: SteeringPlan, probe_source: ipaddress.IPv4Address) -> None:
        links = self._slot_links()
        messages: list[Message] = []
        for name in plan.add_probe_addresses:
            messages.append(rt.address_message(links[name], probe_source, 32))
        for name in plan.set_rp_filter:
            messages.append(rt.set_ipv4_conf_message(
                links[name], {rt.IPV4_DEVCONF_RP_FILTER: RP_FILTER_LOOSE}))
        for table, interface in plan.add_routes:
            default = ipaddress.IPv4Network("0.0.0.0/0")
            if interface is None:
                route = Route(default, table, ROUTE_PROTOCOL, rt.RTN_BLACKHOLE,
                              metric=FALLBACK_METRIC)
            else:
                route = Route(default, table, ROUTE_PROTOCOL, rt.RTN_UNICAST,
                              rt.RT_SCOPE_LINK, links[interface])
            messages.append(rt.route_message(route))
        messages += [rt.rule_message(_rule(mark, table)) for mark, table in plan.add_rules]
        # The kernel applies one batch in order: addresses, routes, then the rules.
        self._rtnl.batch(messages)

    def remove(self, plan: SteeringPlan) -> None:
        messages = [rt.rule_message(_rule(mark, table), delete=True)
                    for mark, table in plan.remove_rules]
        messages += [rt.route_delete_message(
                         ipaddress.IPv4Network("0.0.0.0/0"), table=table, protocol=ROUTE_PROTOCOL,
                         type=rt.RTN_BLACKHOLE if interface is None else rt.RTN_UNICAST)
                     for table, interface in plan.remove_routes]
        self._rtnl.send_all(messages, ignore=frozenset({errno.ESRCH, errno.ENOENT}))


class FakeSteering:
    """SteeringPort in memory, for tests: the slot interfaces are the devices of the fake
    WireGuard backend it is given (as in the kernel, where WireGuard creates them),
    everything else is state. `calls` records what was done, in order."""

    def __init__(self, wireguard: FakeBackend | None = None) -> None:
        self.wireguard = wireguard or FakeBackend()
        self.routes: set[TableRoute] = set()
        self.rules: set[MarkRule] = set()
        self.probe: set[str] = set()
        self.loose: set[str] = set()
        self.calls: list[str] = []

    @property
    def interfaces(self) -> set[str]:
        return {n for n in self.wireguard.devices if NODE_SLOT_INTERFACE.match(n)}

    def read(self, probe_source: ipaddress.IPv4Address) -> ObservedSteering:
        self.calls.append("read")
        return ObservedSteering(frozenset(self.interfaces), frozenset(self.routes),
                                frozenset(self.rules), frozenset(self.probe & self.interfaces),
                                frozenset(self.loose & self.interfaces))

    def configure(self, plan: SteeringPlan, probe_source: ipaddress.IPv4Address) -> None:
        self.calls.append("configure")
        for name in (*plan.add_probe_addresses, *plan.set_rp_filter,
                     *(i for _, i in plan.add_routes if i is not None)):
            if name not in self.interfaces:
                raise OSError(errno.ENODEV, f"{name}: no such interface")
        self.probe.update(plan.add_probe_addresses)
        self.loose.update(plan.set_rp_filter)
        # A route replaces the one of its kind in its table (same metric), as in the kernel.
        replaced = {(t, i is None) for t, i in plan.add_routes}
        self.routes = {r for r in self.routes
                       if (r[0], r[1] is None) not in replaced} | set(plan.add_routes)
        self.rules |= set(plan.add_rules)

    def remove(self, plan: SteeringPlan) -> None:
        self.calls.append("remove")
        self.rules -= set(plan.remove_rules)
        self.routes -= set(plan.remove_routes)


# --- the two phases -------------------------------------------------------------------------


class SlotTunnelsFailed(Exception):
    """Some slot tunnels could not be configured; everything else of the pass was."""

    def __init__(self, failed: Mapping[str, Exception]) -> None:
        super().__init__("; ".join(f"{name}: {exc}" for name, exc in sorted(failed.items())))
        self.failed = dict(failed)
        self.temporary = not all(is_permanent(exc) for exc in failed.values())


def apply_steering_adds(port: SteeringPort, wireguard: WireGuardBackend, plan: SteeringPlan,
                        probe_source: ipaddress.IPv4Address) -> list[str]:
    """Phase one: slot tunnels (sessions reset first where the holder changed), then
    their addresses, tables and rules.

    A tunnel that fails does not hold the others back: every other slot still gets its
    table and rule before the nftables step marks packets for it (a healthy slot whose
    rule is missing would send its marked packets by the main table, out with the node's
    address). Raises SlotTunnelsFailed naming the ones that failed."""
    done: list[str] = []
    reset = set(plan.reset_sessions)
    failed: dict[str, Exception] = {}
    for device in plan.devices:
        try:
            if device.name in reset:
                apply_device(wireguard, dataclasses.replace(device, peers=()))
            lines = apply_device(wireguard, device).describe()
        except Exception as exc:  # reported, with the others, once every slot is done
            failed[device.name] = exc
            continue
        done += [f"{device.name}: {line}" for line in lines]
    port.configure(plan.without_interfaces(failed), probe_source)
    if failed:
        raise SlotTunnelsFailed(failed)
    return [f"{name}: reset session for a new holder" for name in plan.reset_sessions] + done \
        + [line for line in plan.describe() if line.startswith("+")]


def apply_steering_removes(port: SteeringPort, wireguard: WireGuardBackend,
                           plan: SteeringPlan) -> list[str]:
    """Phase two, once no mark points at them: obsolete rules, tables and tunnels."""
    port.remove(plan)
    for name in plan.remove_interfaces:
        wireguard.delete(name)
    return [line for line in plan.describe() if line.startswith("-")]
