"""The gateway's kernel objects outside nftables and WireGuard: plan them, and apply them.

Per held slot the gateway needs, besides its nftables table and the slot's WireGuard
interface: rp_filter loose (2) on the slot interface and SLOT_INTERFACE_ADDRESS/32 on it
(the kernel's loose reverse-path check fails every packet arriving on an interface
without an IPv4 address whose source is routed elsewhere), a routing table
`gateway_table(number)` holding `default dev <slot interface>`, an `ip rule fwmark
gateway_mark(number)/FWMARK_MASK lookup gateway_table(number)`, and the egress IP as a
/32 on the external interface.

How the gateway finds its own objects after a restart, without memory (kernel_ids style):
- slot interfaces: named `mgeg` + 8 hex digits (meshgress.slots);
- routes: in the gateway tables GATEWAY_TABLE_BASE .. + MAX_SLOTS (the agent only looks
  at the main table), tagged with ROUTE_PROTOCOL;
- rules: priority GATEWAY_RULE_PRIORITY with the FWMARK_MASK mask, tagged with
  ROUTE_PROTOCOL;
- egress IPs: /32 addresses of a known egress IP that are not permanent. The gateway
  always adds them with a finite lifetime, refreshed on every lease renewal, so the
  kernel itself removes the IP shortly before the lease could expire if the process dies,
  hangs or is partitioned from the datastore: fencing does not depend on this process
  being alive. An egress IP a person added by hand (permanent) is left alone.

It also reads what the gateway's slots depend on outside itself — its links' state, the
default routes and the node's addresses (`read_uplinks`, judged by `gateway.uplink`).

`plan_dataplane` is pure; `NetlinkKernel` is the adapter (the kernel library's rtnetlink
socket, in the creating thread's network namespace); `FakeKernel` keeps the same state in
memory for tests.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from gateway.compute import SlotDataplane
from gateway.uplink import LinkState, UplinkView
from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.rtnetlink import Link, Message, Route, Rule
from meshgress.kernel.rtnl import NetlinkError, Rtnl
from meshgress.kernel_ids import (
    FWMARK_MASK,
    GATEWAY_INTERFACE_PREFIX,
    ROUTE_PROTOCOL,
    RULE_PRIORITY_GATEWAY,
)
from meshgress.slots import GATEWAY_TABLE_BASE, MAX_SLOTS, SLOT_INTERFACE_ADDRESS

T = TypeVar("T")
DEFAULT = ipaddress.IPv4Network("0.0.0.0/0")

GATEWAY_RULE_PRIORITY = RULE_PRIORITY_GATEWAY
"""ip rule priority of the gateways' reply rules: next to the agent's steering rules (which
use other marks), before the main table."""
RP_FILTER_LOOSE = 2
SLOT_INTERFACE_RE = re.compile(rf"^{GATEWAY_INTERFACE_PREFIX}[0-9a-f]{{8}}$")


@dataclass(frozen=True, order=True)
class EgressAddress:
    interface: str
    ip: ipaddress.IPv4Address


@dataclass(frozen=True, order=True)
class RouteEntry:
    """`default dev <interface>` in table `table`."""

    table: int
    interface: str


@dataclass(frozen=True, order=True)
class RuleEntry:
    """`fwmark <mark>/FWMARK_MASK lookup <table>` at GATEWAY_RULE_PRIORITY."""

    mark: int
    table: int


@dataclass(frozen=True)
class ObservedDataplane:
    egress_addresses: frozenset[EgressAddress] = frozenset()
    slot_interfaces: frozenset[str] = frozenset()
    interface_addresses: frozenset[str] = frozenset()
    """Slot interfaces that carry SLOT_INTERFACE_ADDRESS/32."""
    routes: frozenset[RouteEntry] = frozenset()
    rules: frozenset[RuleEntry] = frozenset()
    rp_filter: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DataplanePlan:
    """In the order apply runs them: fencing first, then adds, then removes."""

    remove_addresses: tuple[EgressAddress, ...] = ()
    add_interface_addresses: tuple[str, ...] = ()
    set_rp_filter: tuple[str, ...] = ()
    add_routes: tuple[RouteEntry, ...] = ()
    add_rules: tuple[RuleEntry, ...] = ()
    add_addresses: tuple[EgressAddress, ...] = ()
    remove_rules: tuple[RuleEntry, ...] = ()
    remove_routes: tuple[RouteEntry, ...] = ()
    remove_interfaces: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__dataclass_fields__)

    def describe(self) -> list[str]:
        out = [f"-address {a.ip}/32 dev {a.interface}" for a in self.remove_addresses]
        out += [f"+address {SLOT_INTERFACE_ADDRESS}/32 dev {i}"
                for i in self.add_interface_addresses]
        out += [f"rp_filter {RP_FILTER_LOOSE} on {i}" for i in self.set_rp_filter]
        out += [f"+route default dev {r.interface} table {r.table}" for r in self.add_routes]
        out += [f"+rule fwmark {r.mark:#x}/{FWMARK_MASK:#x} lookup {r.table}"
                for r in self.add_rules]
        out += [f"+address {a.ip}/32 dev {a.interface}" for a in self.add_addresses]
        out += [f"-rule fwmark {r.mark:#x}/{FWMARK_MASK:#x} lookup {r.table}"
                for r in self.remove_rules]
        out += [f"-route default dev {r.interface} table {r.table}" for r in self.remove_routes]
        out += [f"-interface {i}" for i in self.remove_interfaces]
        return out


def desired_addresses(slots: Iterable[SlotDataplane]) -> frozenset[EgressAddress]:
    return frozenset(EgressAddress(s.external_interface, s.egress_ip) for s in slots)


def plan_dataplane(desired: Sequence[SlotDataplane], observed: ObservedDataplane, *,
                   keep_interfaces: Collection[str] = ()) -> DataplanePlan:
    """What to change so that the kernel serves exactly `desired` (the held slots).

    An egress IP that is not desired is removed first of all: that is fencing, and it
    comes before every add. Rules and routes of slots not held are removed after the
    adds. Slot interfaces of slots not held are removed too, unless listed in
    `keep_interfaces` (the caller keeps them for a grace period after it starts, so a
    quick restart that regains its slot keeps the nodes' WireGuard sessions; meanwhile
    the table drops whatever arrives on them). Purely computational.
    """
    addresses = desired_addresses(desired)
    routes = frozenset(RouteEntry(s.table, s.interface) for s in desired)
    rules = frozenset(RuleEntry(s.mark, s.table) for s in desired)
    interfaces = {s.interface for s in desired}
    tables = {s.table for s in desired}
    return DataplanePlan(
        remove_addresses=tuple(sorted(observed.egress_addresses - addresses)),
        add_interface_addresses=tuple(sorted(interfaces - observed.interface_addresses)),
        set_rp_filter=tuple(sorted(i for i in interfaces
                                   if observed.rp_filter.get(i) != RP_FILTER_LOOSE)),
        # A route is replaced in place; one in a table that is no longer used is removed.
        add_routes=tuple(sorted(routes - observed.routes)),
        add_rules=tuple(sorted(rules - observed.rules)),
        add_addresses=tuple(sorted(addresses - observed.egress_addresses)),
        remove_rules=tuple(sorted(observed.rules - rules)),
        remove_routes=tuple(sorted(r for r in observed.routes - routes
                                   if r.table not in tables)),
        remove_interfaces=tuple(sorted(
            name for name in observed.slot_interfaces
            if name not in interfaces and name not in keep_interfaces)),
    )


class KernelPort(Protocol):
    """What the gateway needs of rtnetlink and sysctl, in its own network namespace."""

    def read(self, known_egress_ips: Collection[ipaddress.IPv4Address]) -> ObservedDataplane:
        ...

    def read_uplinks(self) -> UplinkView:
        """Links (admin and operational state), the main table's default routes and the
        local IPv4 addresses."""
        ...

    def link_mtu(self, name: str) -> int | None: ...

    def link_mac(self, name: str) -> bytes | None: ...

    def link_index(self, name: str) -> int | None: ...

    def add_interface_address(self, interface: str) -> None: ...

    def set_rp_filter(self, interface: str, value: int) -> None: ...

    def replace_route(self, route: RouteEntry) -> None: ...

    def delete_route(self, route: RouteEntry) -> None: ...

    def add_rule(self, rule: RuleEntry) -> None: ...

    def delete_rule(self, rule: RuleEntry) -> None: ...

    def replace_egress_address(self, address: EgressAddress, lifetime: int) -> None: ...

    def delete_egress_address(self, address: EgressAddress) -> None: ...

    def delete_link(self, name: str) -> None: ...


class KernelError(Exception):
    """A kernel operation failed; transient for the loop (logged, counted, retried)."""


def _gateway_table(table: int) -> bool:
    return GATEWAY_TABLE_BASE <= table < GATEWAY_TABLE_BASE + MAX_SLOTS


def _gateway_rule(rule: Rule) -> Rule:
    return Rule(priority=GATEWAY_RULE_PRIORITY, fwmark=rule.fwmark, fwmask=FWMARK_MASK,
                table=rule.table, protocol=ROUTE_PROTOCOL)


class NetlinkKernel:
    """KernelPort over rtnetlink (`meshgress.kernel.rtnl`) in the network namespace of the
    creating thread. Thread-safe (the socket serialises requests)."""

    def __init__(self) -> None:
        self._rtnl = Rtnl(strict_dumps=True)

    def close(self) -> None:
        self._rtnl.close()

    def _call(self, what: str, message: Message, *, ok: Collection[int] = ()) -> None:
        try:
            self._rtnl.request(message)
        except NetlinkError as exc:
            if exc.errno in ok:
                return
            raise KernelError(f"{what}: {exc.strerror}") from exc

    def _read(self, what: str, read: Callable[[], list[T]]) -> list[T]:
        try:
            return read()
        except NetlinkError as exc:
            raise KernelError(f"{what}: {exc.strerror}") from exc

    def read(self, known_egress_ips: Collection[ipaddress.IPv4Address]) -> ObservedDataplane:
        names = {link.index: link.name for link in self._read("list links", self._rtnl.links)}
        slot_interfaces = frozenset(n for n in names.values() if SLOT_INTERFACE_RE.match(n))
        known = set(known_egress_ips)
        egress: set[EgressAddress] = set()
        addressed: set[str] = set()
        for address in self._read("list addresses", self._rtnl.addresses):
            name = names.get(address.index)
            if name is None or address.prefixlen != 32:
                continue
            if address.address == SLOT_INTERFACE_ADDRESS and name in slot_interfaces:
                addressed.add(name)
            elif address.address in known and not address.permanent:
                egress.add(EgressAddress(name, ipaddress.IPv4Address(address.address)))
        routes: set[RouteEntry] = set()
        for route in self._read("list routes", lambda: self._rtnl.routes(
                protocol=ROUTE_PROTOCOL, type=rt.RTN_UNICAST)):
            name = names.get(route.oif) if route.oif is not None else None
            if _gateway_table(route.table) and route.dst.prefixlen == 0 and name is not None:
                routes.add(RouteEntry(route.table, name))
        rules = {RuleEntry(rule.fwmark, rule.table)
                 for rule in self._read("list rules", self._rtnl.rules)
                 if rule.priority == GATEWAY_RULE_PRIORITY and rule.fwmask == FWMARK_MASK}
        rp_filter: dict[str, int] = {}
        for index, name in names.items():
            if name in slot_interfaces:
                conf = self._rtnl.ipv4_conf(index)
                if conf is not None and conf.rp_filter is not None:
                    rp_filter[name] = conf.rp_filter
        return ObservedDataplane(frozenset(egress), slot_interfaces, frozenset(addressed),
                                 frozenset(routes), frozenset(rules), rp_filter)

    def read_uplinks(self) -> UplinkView:
        links = self._read("list links", self._rtnl.links)
        names = {link.index: link.name for link in links}
        defaults: list[tuple[int, str]] = []
        for route in self._read("list routes", lambda: self._rtnl.routes(
                table=rt.RT_TABLE_MAIN, type=rt.RTN_UNICAST)):
            if route.dst.prefixlen == 0 and route.oif in names:
                defaults.append((route.metric or 0, names[route.oif]))
        addresses: dict[ipaddress.IPv4Address, str] = {}
        for address in self._read("list addresses", self._rtnl.addresses):
            name = names.get(address.index)
            if name is not None and isinstance(address.address, ipaddress.IPv4Address):
                addresses.setdefault(address.address, name)
        return UplinkView(
            links={link.name: LinkState(link.up, link.running) for link in links},
            default_routes=tuple(dict.fromkeys(name for _, name in sorted(defaults))),
            addresses=addresses)

    def _link(self, name: str) -> Link | None:
        try:
            return self._rtnl.get_link(name)
        except NetlinkError as exc:
            raise KernelError(f"look up {name}: {exc.strerror}") from exc

    def link_index(self, name: str) -> int | None:
        link = self._link(name)
        return link.index if link is not None else None

    def link_mtu(self, name: str) -> int | None:
        link = self._link(name)
        return link.mtu if link is not None else None

    def link_mac(self, name: str) -> bytes | None:
        link = self._link(name)
        return bytes.fromhex(link.mac.replace(":", "")) if link is not None and link.mac \
            else None

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise KernelError(f"interface {name} does not exist")
        return index

    def add_interface_address(self, interface: str) -> None:
        self._call(f"add {SLOT_INTERFACE_ADDRESS}/32 to {interface}",
                   rt.address_message(self._index(interface), SLOT_INTERFACE_ADDRESS, 32))

    def set_rp_filter(self, interface: str, value: int) -> None:
        self._call(f"rp_filter on {interface}", rt.set_ipv4_conf_message(
            self._index(interface), {rt.IPV4_DEVCONF_RP_FILTER: value}))

    def replace_route(self, route: RouteEntry) -> None:
        self._call(f"route default dev {route.interface} table {route.table}",
                   rt.route_message(Route(DEFAULT, route.table, ROUTE_PROTOCOL, rt.RTN_UNICAST,
                                          rt.RT_SCOPE_LINK, self._index(route.interface))))

    def delete_route(self, route: RouteEntry) -> None:
        self._call(f"delete route table {route.table}",
                   rt.route_delete_message(DEFAULT, table=route.table, protocol=ROUTE_PROTOCOL),
                   ok=(errno.ESRCH, errno.ENOENT))

    def add_rule(self, rule: RuleEntry) -> None:
        self._call(f"rule fwmark {rule.mark:#x} lookup {rule.table}",
                   rt.rule_message(_gateway_rule(Rule(0, rule.mark, 0, rule.table))),
                   ok=(errno.EEXIST,))

    def delete_rule(self, rule: RuleEntry) -> None:
        self._call(f"delete rule fwmark {rule.mark:#x}",
                   rt.rule_message(_gateway_rule(Rule(0, rule.mark, 0, rule.table)), delete=True),
                   ok=(errno.ENOENT, errno.ESRCH))

    def replace_egress_address(self, address: EgressAddress, lifetime: int) -> None:
        self._call(f"add {address.ip}/32 to {address.interface}",
                   rt.address_message(self._index(address.interface), address.ip, 32,
                                      lifetime=lifetime))

    def delete_egress_address(self, address: EgressAddress) -> None:
        index = self.link_index(address.interface)
        if index is None:
            return
        self._call(f"remove {address.ip}/32 from {address.interface}",
                   rt.address_delete_message(index, address.ip, 32),
                   ok=(errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV))

    def delete_link(self, name: str) -> None:
        try:
            self._rtnl.delete_link(name)
        except NetlinkError as exc:
            raise KernelError(f"delete link {name}: {exc.strerror}") from exc


class FakeKernel:
    """KernelPort in memory: links are declared by the test; everything else is state.

    Links are up and running unless the test says otherwise (`set_link`); setting one
    down removes the default routes through it, as the kernel does."""

    def __init__(self, links: Mapping[str, tuple[int, bytes]] | None = None,
                 default_interface: str | None = "eth0") -> None:
        self.links: dict[str, tuple[int, bytes]] = dict(
            links or {"eth0": (1500, b"\x02\x00\x00\x00\x00\x01")})
        self.default_routes: list[str] = [default_interface] if default_interface else []
        self.link_states: dict[str, LinkState] = {}
        self.addresses: dict[ipaddress.IPv4Address, str] = {}
        self.fail_uplinks = False
        self.egress: dict[EgressAddress, int] = {}
        self.addressed: set[str] = set()
        self.rp: dict[str, int] = {}
        self.routes: set[RouteEntry] = set()
        self.rules: set[RuleEntry] = set()
        self.log: list[str] = []

    def read(self, known_egress_ips: Collection[ipaddress.IPv4Address]) -> ObservedDataplane:
        slots = frozenset(n for n in self.links if SLOT_INTERFACE_RE.match(n))
        return ObservedDataplane(
            frozenset(a for a in self.egress if a.ip in set(known_egress_ips)), slots,
            frozenset(self.addressed & slots), frozenset(self.routes), frozenset(self.rules),
            {n: self.rp.get(n, 0) for n in slots})

    def set_link(self, name: str, *, up: bool = True, running: bool = True) -> None:
        self.link_states[name] = LinkState(up, running and up)
        if not up:
            self.default_routes = [n for n in self.default_routes if n != name]

    def read_uplinks(self) -> UplinkView:
        if self.fail_uplinks:
            raise KernelError("list links: Resource temporarily unavailable")
        return UplinkView(
            links={name: self.link_states.get(name, LinkState(True, True))
                   for name in self.links},
            default_routes=tuple(n for n in self.default_routes if n in self.links),
            addresses=dict(self.addresses))

    def link_mtu(self, name: str) -> int | None:
        return self.links[name][0] if name in self.links else None

    def link_mac(self, name: str) -> bytes | None:
        return self.links[name][1] if name in self.links else None

    def link_index(self, name: str) -> int | None:
        return sorted(self.links).index(name) + 1 if name in self.links else None

    def _need(self, name: str) -> None:
        if name not in self.links:
            raise KernelError(f"interface {name} does not exist")

    def add_interface_address(self, interface: str) -> None:
        self._need(interface)
        self.addressed.add(interface)
        self.log.append(f"+address {interface}")

    def set_rp_filter(self, interface: str, value: int) -> None:
        self._need(interface)
        self.rp[interface] = value

    def replace_route(self, route: RouteEntry) -> None:
        self._need(route.interface)
        self.routes = {r for r in self.routes if r.table != route.table} | {route}
        self.log.append(f"+route {route.table} {route.interface}")

    def delete_route(self, route: RouteEntry) -> None:
        self.routes.discard(route)
        self.log.append(f"-route {route.table}")

    def add_rule(self, rule: RuleEntry) -> None:
        self.rules.add(rule)
        self.log.append(f"+rule {rule.mark:#x}")

    def delete_rule(self, rule: RuleEntry) -> None:
        self.rules.discard(rule)
        self.log.append(f"-rule {rule.mark:#x}")

    def replace_egress_address(self, address: EgressAddress, lifetime: int) -> None:
        self._need(address.interface)
        self.egress[address] = lifetime
        self.log.append(f"+ip {address.ip} {lifetime}")

    def delete_egress_address(self, address: EgressAddress) -> None:
        self.egress.pop(address, None)
        self.log.append(f"-ip {address.ip}")

    def delete_link(self, name: str) -> None:
        self.links.pop(name, None)
        self.addressed.discard(name)
        self.routes = {r for r in self.routes if r.interface != name}
        self.log.append(f"-link {name}")
