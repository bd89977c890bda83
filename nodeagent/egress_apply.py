"""Apply a node's egress steering to the kernel: slot tunnels, rules, per-slot tables.

Plans against the kernel as it is now. meshgress owns: interfaces named `mge` + 8 hex
digits (the gateway's own `mgeg…` interfaces are never touched), `ip rule`s at
RULE_PRIORITY_EGRESS with the meshgress fwmark mask, and routes tagged with its route
protocol in tables ROUTING_TABLE_BASE..+255. Work is split in two phases so that a
reconcile adds everything new (interfaces, tables, rules) before the nftables marks
point at it, and removes what is obsolete only after the marks stopped pointing at it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
ESRCH, ENOENT, EEXIST = 3, 2, 17


@dataclass
class EgressKernel:
    """Side effects for steering, in the current network namespace."""

    wireguard: WireGuardBackend
    probe_source: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        self._ipr = IPRoute()
        # Tenure each slot interface was last configured for. Not a memory of the kernel
        # (that is always re-read) but of the cluster: it only decides when a session
        # must be reset. After a restart it starts empty and adopts what it finds.
        self._tenures: dict[str, str] = {}

    def close(self) -> None:
        self._ipr.close()

    # -- observed ----------------------------------------------------------------------

    def slot_interfaces(self) -> set[str]:
        names = {link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        return {n for n in names if n and NODE_SLOT_INTERFACE.match(n)}

    def rules(self) -> set[tuple[int, int]]:
        found = set()
        for rule in self._ipr.get_rules(family=socket.AF_INET):
            if rule.get_attr("FRA_PRIORITY") != RULE_PRIORITY_EGRESS:
                continue
            mark, mask = rule.get_attr("FRA_FWMARK"), rule.get_attr("FRA_FWMASK")
            table = rule.get_attr("FRA_TABLE") or rule["table"]
            if mask == FWMARK_MASK and mark is not None:
                found.add((int(mark), int(table)))
        return found

    def routes(self) -> set[tuple[int, str | None]]:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        found: set[tuple[int, str | None]] = set()
        for route in self._ipr.get_routes(family=socket.AF_INET):  # every table
            table = route.get_attr("RTA_TABLE") or route["table"]
            if table not in TABLE_RANGE or route["proto"] != ROUTE_PROTOCOL \
                    or route["dst_len"] != 0:
                continue
            if route["type"] == 6:  # RTN_BLACKHOLE
                found.add((table, None))
            else:
                found.add((table, names.get(route.get_attr("RTA_OIF"))))
        return found

    def slot_numbers(self) -> dict[str, int]:
        """Slot interface → the number its table says it has (meshgress.slots.slot_table),
        so a restarted agent keeps every slot's mark and table."""
        numbers: dict[str, int] = {}
        for table, ifname in self.routes():
            number = slot_number_of_table(table)
            if ifname is not None and number is not None and NODE_SLOT_INTERFACE.match(ifname):
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
            self._ensure_probe_address(device.name)
            _loose_rp_filter(device.name)
        have_routes = self.routes()
        for table, ifname in desired.routes:
            if (table, ifname) in have_routes:
                continue
            if ifname is None:
                self._ipr.route("replace", dst="0.0.0.0/0", table=table, type="blackhole",
                                proto=ROUTE_PROTOCOL)
            else:
                index = self._ipr.link_lookup(ifname=ifname)[0]
                self._ipr.route("replace", dst="0.0.0.0/0", table=table, oif=index,
                                proto=ROUTE_PROTOCOL, scope=253)
            done.append(f"+route default table {table} {ifname or 'blackhole'}")
        have_rules = self.rules()
        for mark, table in desired.rules:
            if (mark, table) not in have_rules:
                self._ipr.rule("add", fwmark=mark, fwmask=FWMARK_MASK, table=table,
                               priority=RULE_PRIORITY_EGRESS, family=socket.AF_INET)
                done.append(f"+rule fwmark {mark:#x} table {table}")
        return done

    def apply_removes(self, desired: SteeringState) -> list[str]:
        done: list[str] = []
        wanted_rules = set(desired.rules)
        for mark, table in sorted(self.rules() - wanted_rules):
            self._ignore_missing(lambda m=mark, t=table: self._ipr.rule(
                "del", fwmark=m, fwmask=FWMARK_MASK, table=t, priority=RULE_PRIORITY_EGRESS,
                family=socket.AF_INET))
            done.append(f"-rule fwmark {mark:#x} table {table}")
        wanted_routes = set(desired.routes)
        wanted_tables = {table for table, _ in desired.routes}
        # A table whose route changed was replaced in place by apply_adds: deleting by
        # table would remove the new route.
        stale = {r for r in self.routes() - wanted_routes if r[0] not in wanted_tables}
        for table, ifname in sorted(stale, key=lambda r: r[0]):
            self._ignore_missing(lambda t=table: self._ipr.route(
                "del", dst="0.0.0.0/0", table=t, proto=ROUTE_PROTOCOL))
            done.append(f"-route default table {table} {ifname or 'blackhole'}")
        wanted_devices = {d.name for d in desired.devices}
        for name in sorted(self.slot_interfaces() - wanted_devices):
            self.wireguard.delete(name)
            self._tenures.pop(name, None)
            done.append(f"-interface {name}")
        return done

    def _ensure_probe_address(self, ifname: str) -> None:
        index = self._ipr.link_lookup(ifname=ifname)[0]
        try:
            self._ipr.addr("add", index=index, address=str(self.probe_source), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    @staticmethod
    def _ignore_missing(action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except NetlinkError as exc:
            if exc.code not in (ESRCH, ENOENT):
                raise


def _loose_rp_filter(ifname: str) -> None:
    """Replies from the outside arrive on the slot tunnel while the main table routes
    their source elsewhere: strict reverse-path filtering would drop them."""
    path = Path(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter")
    if path.read_text().strip() != "2":
        path.write_text("2\n")
