"""The gateway's kernel objects outside nftables and WireGuard: plan them, and apply them.

Per held slot the gateway needs, besides its nftables table and the slot's WireGuard
interface: PROBE_ADDRESS/32 on the slot interface, rp_filter loose (2) there, a routing
table `gateway_table(number)` holding `default dev <slot interface>`, an `ip rule
fwmark gateway_mark(number)/FWMARK_MASK lookup gateway_table(number)`, and the egress
IP as a /32 on the external interface.

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

`plan_dataplane` is pure; `NetlinkKernel` is the adapter (pyroute2, the caller's network
namespace); `FakeKernel` keeps the same state in memory for tests.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gateway.compute import SlotDataplane
from meshgress.kernel_ids import FWMARK_MASK, ROUTE_PROTOCOL, RULE_PRIORITY_GATEWAY
from meshgress.slots import GATEWAY_TABLE_BASE, MAX_SLOTS, PROBE_ADDRESS

GATEWAY_RULE_PRIORITY = RULE_PRIORITY_GATEWAY
"""ip rule priority of the gateways' reply rules: next to the agent's steering rules (which
use other marks), before the main table."""
RP_FILTER_LOOSE = 2
SLOT_INTERFACE_RE = re.compile(r"^mgeg[0-9a-f]{8}$")
IFA_F_PERMANENT = 0x80
MAIN_TABLE = 254
RT_SCOPE_LINK = 253
SYSCTL_CONF = Path("/proc/sys/net/ipv4/conf")


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
    probe_addresses: frozenset[str] = frozenset()
    """Slot interfaces that carry PROBE_ADDRESS/32."""
    routes: frozenset[RouteEntry] = frozenset()
    rules: frozenset[RuleEntry] = frozenset()
    rp_filter: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DataplanePlan:
    """In the order apply runs them: fencing first, then adds, then removes."""

    remove_addresses: tuple[EgressAddress, ...] = ()
    add_probe_addresses: tuple[str, ...] = ()
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
        out += [f"+address {PROBE_ADDRESS}/32 dev {i}" for i in self.add_probe_addresses]
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
        add_probe_addresses=tuple(sorted(interfaces - observed.probe_addresses)),
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

    def default_route_interface(self) -> str | None: ...

    def link_mtu(self, name: str) -> int | None: ...

    def link_mac(self, name: str) -> bytes | None: ...

    def link_index(self, name: str) -> int | None: ...

    def add_probe_address(self, interface: str) -> None: ...

    def set_rp_filter(self, interface: str, value: int) -> None: ...

    def replace_route(self, route: RouteEntry) -> None: ...

    def delete_route(self, route: RouteEntry) -> None: ...

    def add_rule(self, rule: RuleEntry) -> None: ...

    def delete_rule(self, rule: RuleEntry) -> None: ...

    def replace_egress_address(self, address: EgressAddress, lifetime: int) -> None: ...

    def delete_egress_address(self, address: EgressAddress) -> None: ...

    def delete_link(self, name: str) -> None: ...


class KernelError(Exception):
    """A kernel operation failed; temporary for the loop (logged, counted, retried)."""

    temporary = True


def _gateway_table(table: int) -> bool:
    return GATEWAY_TABLE_BASE <= table < GATEWAY_TABLE_BASE + MAX_SLOTS


class NetlinkKernel:
    """KernelPort over pyroute2 in the caller's network namespace. Thread-safe."""

    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._ipr.close()

    def _call(self, what: str, fn: Any, *args: Any, ok: Collection[int] = (),
              **kwargs: Any) -> Any:
        with self._lock:
            try:
                return fn(*args, **kwargs)
            except NetlinkError as exc:
                if exc.code in ok:
                    return None
                raise KernelError(f"{what}: {exc}") from exc

    def _names(self) -> dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME")
                for link in self._call("list links", self._ipr.get_links)}

    def read(self, known_egress_ips: Collection[ipaddress.IPv4Address]) -> ObservedDataplane:
        names = self._names()
        slot_interfaces = frozenset(n for n in names.values() if SLOT_INTERFACE_RE.match(n))
        known = {str(ip) for ip in known_egress_ips}
        egress: set[EgressAddress] = set()
        probe: set[str] = set()
        for msg in self._call("list addresses", self._ipr.get_addr, family=socket.AF_INET):
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            name = names.get(msg["index"])
            if name is None or msg["prefixlen"] != 32:
                continue
            flags = msg.get_attr("IFA_FLAGS")
            flags = msg["flags"] if flags is None else flags
            if address == str(PROBE_ADDRESS) and name in slot_interfaces:
                probe.add(name)
            elif address in known and not flags & IFA_F_PERMANENT:
                egress.add(EgressAddress(name, ipaddress.IPv4Address(address)))
        routes: set[RouteEntry] = set()
        for msg in self._call("list routes", self._ipr.route, "dump", family=socket.AF_INET):
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            if not _gateway_table(table) or msg["dst_len"] != 0:
                continue
            name = names.get(msg.get_attr("RTA_OIF"))
            if name is not None:
                routes.add(RouteEntry(table, name))
        rules: set[RuleEntry] = set()
        for msg in self._call("list rules", self._ipr.get_rules, family=socket.AF_INET):
            if msg.get_attr("FRA_PRIORITY") != GATEWAY_RULE_PRIORITY \
                    or msg.get_attr("FRA_FWMASK") != FWMARK_MASK:
                continue
            table = msg.get_attr("FRA_TABLE") or msg["table"]
            mark = msg.get_attr("FRA_FWMARK")
            if mark is not None:
                rules.add(RuleEntry(int(mark), int(table)))
        rp_filter: dict[str, int] = {}
        for name in slot_interfaces:
            try:
                rp_filter[name] = int((SYSCTL_CONF / name / "rp_filter").read_text())
            except (OSError, ValueError):
                continue
        return ObservedDataplane(frozenset(egress), slot_interfaces, frozenset(probe),
                                 frozenset(routes), frozenset(rules), rp_filter)

    def default_route_interface(self) -> str | None:
        names = self._names()
        best: tuple[int, str] | None = None
        for msg in self._call("list routes", self._ipr.get_routes, family=socket.AF_INET,
                              table=MAIN_TABLE):
            if msg["dst_len"] != 0 or msg["type"] != 1:
                continue
            oif = msg.get_attr("RTA_OIF")
            if oif is None:
                multipath = msg.get_attr("RTA_MULTIPATH") or []
                oif = multipath[0]["oif"] if multipath else None
            metric = msg.get_attr("RTA_PRIORITY") or 0
            if oif in names and (best is None or metric < best[0]):
                best = (metric, names[oif])
        return best[1] if best else None

    def _link(self, name: str) -> Any:
        index = self.link_index(name)
        if index is None:
            return None
        found = self._call(f"get link {name}", self._ipr.get_links, index, ok=(errno.ENODEV,))
        return found[0] if found else None

    def link_index(self, name: str) -> int | None:
        found = self._call(f"look up {name}", self._ipr.link_lookup, ifname=name)
        return int(found[0]) if found else None

    def link_mtu(self, name: str) -> int | None:
        link = self._link(name)
        return int(link.get_attr("IFLA_MTU")) if link is not None else None

    def link_mac(self, name: str) -> bytes | None:
        link = self._link(name)
        text = link.get_attr("IFLA_ADDRESS") if link is not None else None
        return bytes.fromhex(text.replace(":", "")) if text else None

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise KernelError(f"interface {name} does not exist")
        return index

    def add_probe_address(self, interface: str) -> None:
        self._call(f"add {PROBE_ADDRESS}/32 to {interface}", self._ipr.addr, "replace",
                   index=self._index(interface), address=str(PROBE_ADDRESS), prefixlen=32)

    def set_rp_filter(self, interface: str, value: int) -> None:
        try:
            (SYSCTL_CONF / interface / "rp_filter").write_text(f"{value}\n")
        except OSError as exc:
            raise KernelError(f"rp_filter on {interface}: {exc}") from exc

    def replace_route(self, route: RouteEntry) -> None:
        self._call(f"route default dev {route.interface} table {route.table}", self._ipr.route,
                   "replace", dst="0.0.0.0/0", oif=self._index(route.interface),
                   table=route.table, proto=ROUTE_PROTOCOL, scope=RT_SCOPE_LINK)

    def delete_route(self, route: RouteEntry) -> None:
        self._call(f"delete route table {route.table}", self._ipr.route, "del",
                   dst="0.0.0.0/0", table=route.table, ok=(errno.ESRCH, errno.ENOENT))

    def add_rule(self, rule: RuleEntry) -> None:
        self._call(f"rule fwmark {rule.mark:#x} lookup {rule.table}", self._ipr.rule, "add",
                   priority=GATEWAY_RULE_PRIORITY, fwmark=rule.mark, fwmask=FWMARK_MASK,
                   table=rule.table, protocol=ROUTE_PROTOCOL, ok=(errno.EEXIST,))

    def delete_rule(self, rule: RuleEntry) -> None:
        self._call(f"delete rule fwmark {rule.mark:#x}", self._ipr.rule, "del",
                   priority=GATEWAY_RULE_PRIORITY, fwmark=rule.mark, fwmask=FWMARK_MASK,
                   table=rule.table, ok=(errno.ENOENT, errno.ESRCH))

    def replace_egress_address(self, address: EgressAddress, lifetime: int) -> None:
        self._call(f"add {address.ip}/32 to {address.interface}", self._ipr.addr, "replace",
                   index=self._index(address.interface), address=str(address.ip),
                   prefixlen=32, IFA_CACHEINFO={"ifa_preferred": lifetime,
                                                "ifa_valid": lifetime, "cstamp": 0,
                                                "tstamp": 0})

    def delete_egress_address(self, address: EgressAddress) -> None:
        index = self.link_index(address.interface)
        if index is None:
            return
        self._call(f"remove {address.ip}/32 from {address.interface}", self._ipr.addr, "del",
                   index=index, address=str(address.ip), prefixlen=32,
                   ok=(errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV))

    def delete_link(self, name: str) -> None:
        index = self.link_index(name)
        if index is not None:
            self._call(f"delete link {name}", self._ipr.link, "del", index=index,
                       ok=(errno.ENODEV,))


class FakeKernel:
    """KernelPort in memory: links are declared by the test; everything else is state."""

    def __init__(self, links: Mapping[str, tuple[int, bytes]] | None = None,
                 default_interface: str | None = "eth0") -> None:
        self.links: dict[str, tuple[int, bytes]] = dict(
            links or {"eth0": (1500, b"\x02\x00\x00\x00\x00\x01")})
        self.default_interface = default_interface
        self.egress: dict[EgressAddress, int] = {}
        self.probe: set[str] = set()
        self.rp: dict[str, int] = {}
        self.routes: set[RouteEntry] = set()
        self.rules: set[RuleEntry] = set()
        self.log: list[str] = []

    def read(self, known_egress_ips: Collection[ipaddress.IPv4Address]) -> ObservedDataplane:
        slots = frozenset(n for n in self.links if SLOT_INTERFACE_RE.match(n))
        return ObservedDataplane(
            frozenset(a for a in self.egress if a.ip in set(known_egress_ips)), slots,
            frozenset(self.probe & slots), frozenset(self.routes), frozenset(self.rules),
            {n: self.rp.get(n, 0) for n in slots})

    def default_route_interface(self) -> str | None:
        return self.default_interface

    def link_mtu(self, name: str) -> int | None:
        return self.links[name][0] if name in self.links else None

    def link_mac(self, name: str) -> bytes | None:
        return self.links[name][1] if name in self.links else None

    def link_index(self, name: str) -> int | None:
        return sorted(self.links).index(name) + 1 if name in self.links else None

    def _need(self, name: str) -> None:
        if name not in self.links:
            raise KernelError(f"interface {name} does not exist")

    def add_probe_address(self, interface: str) -> None:
        self._need(interface)
        self.probe.add(interface)
        self.log.append(f"+probe {interface}")

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
        self.probe.discard(name)
        self.routes = {r for r in self.routes if r.interface != name}
        self.log.append(f"-link {name}")

    def remove_link(self, name: str) -> None:
        self.links.pop(name, None)
        self.probe.discard(name)
        self.routes = {r for r in self.routes if r.interface != name}
