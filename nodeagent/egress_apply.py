"""Apply a node's egress steering to the kernel: slot tunnels, rules, per-slot tables.

Plans against the kernel as it is now. meshgress owns: interfaces named `mge` + 8 hex
digits (the gateway's own `mgeg…` interfaces are never touched), `ip rule`s at
RULE_PRIORITY_EGRESS with the meshgress fwmark mask, and default routes tagged with its
route protocol in tables ROUTING_TABLE_BASE..+255 (a blackhole in the drop table, one
through each slot interface in its table). Work is split in two phases so that a
reconcile adds everything new (interfaces, tables, rules) before the nftables marks
point at it, and removes what is obsolete only after the marks stopped pointing at it.

Every pass reads what it plans against, so the reads must be cheap even on a node with
thousands of mesh routes in its main table: routes are read by small dumps the kernel
filters (NETLINK_GET_STRICT_CHK) — one per slot interface (routes through it) and one for
blackholes, both of meshgress's protocol — rather than one dump of every table; rules by
one rule dump. Plain rtnetlink (`cni.netlink.Rtnl`), no pyroute2: its synchronous calls
cost about a millisecond each, which made this step most of a pass's time. The message
codec is pure and tested without root.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from cni.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RT_SCOPE_LINK,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    Message,
    Rtnl,
    add_address_message,
    add_route_message,
    attr,
    parse_attrs,
)
from meshgress.kernel_ids import (
    FWMARK_MASK,
    ROUTE_PROTOCOL,
    ROUTING_TABLE_BASE,
    RULE_PRIORITY_EGRESS,
)
from meshgress.slots import slot_number_of_table
from nodeagent.steering import SteeringState
from wireguard.backend import WireGuardBackend, apply_device

log = logging.getLogger("meshgress.egress")

NODE_SLOT_INTERFACE = re.compile(r"^mge[0-9a-f]{8}$")
TABLE_RANGE = range(ROUTING_TABLE_BASE, ROUTING_TABLE_BASE + 256)

RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
FR_ACT_TO_TBL = 1
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RTA_OIF, RTA_TABLE = 4, 15
RT_TABLE_UNSPEC = 0
RT_SCOPE_NOWHERE = 255
_RTMSG = struct.Struct("=BBBBBBBBI")
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
_U32 = struct.Struct("=I")

Observed = tuple[int, str | None]
"""(table, interface) of an owned default route; interface None: a blackhole."""


# --- the rtnetlink codec (pure) ----------------------------------------------------------


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind)
    return _U32.unpack(raw)[0] if raw is not None and len(raw) == 4 else None


def route_dump_message(route_type: int, oif: int | None = None) -> Message:
    """A dump of IPv4 routes of meshgress's protocol and `route_type` in every table
    (through `oif` when given): filtered by the kernel when strict checking is on."""
    body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_UNSPEC, ROUTE_PROTOCOL, 0,
                       route_type, 0)
    if oif is not None:
        body += attr(RTA_OIF, _U32.pack(oif))
    return (RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body)


def decode_table_route(body: bytes, names: dict[int, str]) -> Observed | None:
    """(table, interface) when `body` is an owned default route in a steering table."""
    if len(body) < _RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, proto, _scope, kind, _ = _RTMSG.unpack_from(body)
    if family != socket.AF_INET or proto != ROUTE_PROTOCOL or dst_len != 0:
        return None
    attrs = parse_attrs(body, _RTMSG.size)
    table = _u32(attrs, RTA_TABLE) or table
    if table not in TABLE_RANGE:
        return None
    if kind == RTN_BLACKHOLE:
        return (table, None)
    oif = _u32(attrs, RTA_OIF)
    if kind == RTN_UNICAST and oif is not None and oif in names:
        return (table, names[oif])
    return None


def blackhole_route_message(table: int) -> Message:
    body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_UNSPEC, ROUTE_PROTOCOL, 0,
                        RTN_BLACKHOLE, 0) + attr(RTA_TABLE, _U32.pack(table)))
    return (RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body)


def delete_default_route_message(table: int) -> Message:
    """Delete the owned default route of `table`, whatever its type and scope (scope
    "nowhere" matches every scope)."""
    body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_UNSPEC, ROUTE_PROTOCOL,
                        RT_SCOPE_NOWHERE, 0, 0)
            + attr(RTA_TABLE, _U32.pack(table)))
    return (RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body)


def rule_dump_message() -> Message:
    return (RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP,
            _FIB_RULE_HDR.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0))


def decode_rule(body: bytes) -> tuple[int, int] | None:
    """(fwmark, table) when `body` is one of meshgress's egress rules."""
    if len(body) < _FIB_RULE_HDR.size:
        return None
    family, _dst, _src, _tos, table, _r1, _r2, _action, _flags = _FIB_RULE_HDR.unpack_from(body)
    attrs = parse_attrs(body, _FIB_RULE_HDR.size)
    mark, mask = _u32(attrs, FRA_FWMARK), _u32(attrs, FRA_FWMASK)
    if family != socket.AF_INET or _u32(attrs, FRA_PRIORITY) != RULE_PRIORITY_EGRESS \
            or mask != FWMARK_MASK or mark is None:
        return None
    return (mark, _u32(attrs, FRA_TABLE) or table)


def rule_message(mark: int, table: int, *, delete: bool = False) -> Message:
    """`ip rule add|del priority RULE_PRIORITY_EGRESS fwmark MARK/MASK lookup TABLE`."""
    body = (_FIB_RULE_HDR.pack(socket.AF_INET, 0, 0, 0,
                               table if table < 256 else RT_TABLE_UNSPEC, 0, 0,
                               FR_ACT_TO_TBL, 0)
            + attr(FRA_PRIORITY, _U32.pack(RULE_PRIORITY_EGRESS))
            + attr(FRA_FWMARK, _U32.pack(mark)) + attr(FRA_FWMASK, _U32.pack(FWMARK_MASK))
            + attr(FRA_TABLE, _U32.pack(table)))
    if delete:
        return (RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, body)
    return (RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)


# --- apply -------------------------------------------------------------------------------


@dataclass
class EgressKernel:
    """Side effects for steering, in the network namespace of the creating thread."""

    wireguard: WireGuardBackend
    probe_source: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        self._rtnl = Rtnl(strict_dumps=True)
        # Tenure each slot interface was last configured for. Not a memory of the kernel
        # (that is always re-read) but of the cluster: it only decides when a session
        # must be reset. After a restart it starts empty and adopts what it finds.
        self._tenures: dict[str, str] = {}

    def close(self) -> None:
        self._rtnl.close()

    # -- observed ----------------------------------------------------------------------

    def _slot_links(self) -> dict[str, int]:
        return {link.name: link.index for link in self._rtnl.links()
                if NODE_SLOT_INTERFACE.match(link.name)}

    def slot_interfaces(self) -> set[str]:
        return set(self._slot_links())

    def rules(self) -> set[tuple[int, int]]:
        replies = self._rtnl.batch([rule_dump_message()])[0]
        return {rule for kind, body in replies if kind == RTM_NEWRULE
                and (rule := decode_rule(body)) is not None}

    def routes(self, links: dict[str, int] | None = None) -> set[Observed]:
        links = self._slot_links() if links is None else links
        names = {index: name for name, index in links.items()}
        dumps = [route_dump_message(RTN_BLACKHOLE)]
        if self._rtnl.strict_dumps_on:
            dumps += [route_dump_message(RTN_UNICAST, index) for index in sorted(names)]
        else:  # the kernel ignores the filters: one dump of everything
            dumps = [route_dump_message(0)]
        found: set[Observed] = set()
        for dump in dumps:  # one at a time: the kernel runs one dump per socket
            for kind, body in self._rtnl.batch([dump])[0]:
                if kind == RTM_NEWROUTE and (route := decode_table_route(body, names)):
                    found.add(route)
        return found

    def slot_numbers(self) -> dict[str, int]:
        """Slot interface → the number its table says it has (meshgress.slots.slot_table),
        so a restarted agent keeps every slot's mark and table."""
        numbers: dict[str, int] = {}
        for table, ifname in self.routes():
            number = slot_number_of_table(table)
            if ifname is not None and number is not None:
                numbers[ifname] = number
        return numbers

    # -- phases ------------------------------------------------------------------------

    def apply_adds(self, desired: SteeringState) -> list[str]:
        done: list[str] = []
        for device in desired.devices:
            tenure = desired.tenures.get(device.name, "")
            known = self._tenures.get(device.name)
            if known is not None and known != tenure:
                # A new holder tenure: drop the peer so the next packet handshakes afresh.
                apply_device(self.wireguard, dataclasses.replace(device, peers=()))
                done.append(f"{device.name}: reset session for holder {tenure}")
            self._tenures[device.name] = tenure
            plan = apply_device(self.wireguard, device)
            done += [f"{device.name}: {line}" for line in plan.describe()]
        links = self._slot_links()
        messages: list[Message] = []
        for device in desired.devices:
            messages.append(add_address_message(links[device.name], self.probe_source, 32))
            _loose_rp_filter(device.name)
        have_routes = self.routes(links)
        for table, ifname in desired.routes:
            if (table, ifname) in have_routes:
                continue
            messages.append(blackhole_route_message(table) if ifname is None else
                            add_route_message(ipaddress.IPv4Address(0), 0, oif=links[ifname],
                                              scope=RT_SCOPE_LINK, protocol=ROUTE_PROTOCOL,
                                              table=table))
            done.append(f"+route default table {table} {ifname or 'blackhole'}")
        have_rules = self.rules()
        for mark, table in desired.rules:
            if (mark, table) not in have_rules:
                messages.append(rule_message(mark, table))
                done.append(f"+rule fwmark {mark:#x} table {table}")
        # Addresses, then routes, then the rules that point at them: the kernel applies
        # one batch in order.
        self._rtnl.batch(messages)
        return done

    def apply_removes(self, desired: SteeringState) -> list[str]:
        done: list[str] = []
        messages: list[Message] = []
        for mark, table in sorted(self.rules() - set(desired.rules)):
            messages.append(rule_message(mark, table, delete=True))
            done.append(f"-rule fwmark {mark:#x} table {table}")
        wanted_tables = {table for table, _ in desired.routes}
        # A table whose route changed was replaced in place by apply_adds: deleting by
        # table would remove the new route.
        stale = {r for r in self.routes() - set(desired.routes) if r[0] not in wanted_tables}
        for table, ifname in sorted(stale, key=lambda r: r[0]):
            messages.append(delete_default_route_message(table))
            done.append(f"-route default table {table} {ifname or 'blackhole'}")
        _, errors = self._rtnl.batch_results(messages)
        for error in errors.values():
            if error.errno not in (errno.ESRCH, errno.ENOENT):  # already gone: fine
                raise error
        wanted_devices = {d.name for d in desired.devices}
        for name in sorted(self.slot_interfaces() - wanted_devices):
            self.wireguard.delete(name)
            self._tenures.pop(name, None)
            done.append(f"-interface {name}")
        return done


def _loose_rp_filter(ifname: str) -> None:
    """Replies from the outside arrive on the slot tunnel while the main table routes
    their source elsewhere: strict reverse-path filtering would drop them."""
    path = Path(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter")
    if path.read_text().strip() != "2":
        path.write_text("2\n")
