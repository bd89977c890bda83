"""The kernel's word on a gateway's links, in a throwaway namespace: `LinkWatch` wakes on
the changes that matter to an uplink (admin state, carrier, default routes) and stays
quiet on the ones that do not, and `NetlinkKernel.read_uplinks` reads what they left.

One namespace holds a veth pair: `up0` plays the gateway's external interface (address,
default route), `sw0` the switch port at the other end of its cable.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

import pytest

from gateway.dataplane import NetlinkKernel
from gateway.uplink import LinkState, compute_uplink_fault
from meshgress.kernel.rtnl import LinkWatch
from tests.privileged.conftest import call_in_netns, nsexec

pytestmark = pytest.mark.privileged

ADDRESS = ipaddress.IPv4Address("192.0.2.1")


def test_link_watch_wakes_for_uplink_changes_only(netns_factory: Callable[[str], str]) -> None:
    ns = netns_factory("uplink")

    def ip(*argv: str) -> None:
        nsexec(ns, "ip", *argv)

    ip("link", "add", "up0", "type", "veth", "peer", "name", "sw0")
    ip("address", "add", f"{ADDRESS}/24", "dev", "up0")
    ip("link", "set", "up0", "up")
    ip("link", "set", "sw0", "up")
    ip("route", "add", "default", "via", "192.0.2.254", "dev", "up0")
    watch: LinkWatch = call_in_netns(ns, LinkWatch)
    kernel: NetlinkKernel = call_in_netns(ns, NetlinkKernel)
    try:
        view = kernel.read_uplinks()
        assert view.links["up0"] == LinkState(up=True, running=True)
        assert view.default_routes == ("up0",) and view.addresses[ADDRESS] == "up0"
        assert compute_uplink_fault(view, "up0", ADDRESS) is None
        assert not watch.wait(0.2)

        # Not an uplink change: an MTU, a route in another table, an address.
        ip("link", "set", "up0", "mtu", "1400")
        ip("route", "add", "default", "dev", "up0", "table", "100")
        ip("address", "add", "192.0.2.7/32", "dev", "up0")
        assert not watch.wait(0.3)

        # The switch port goes down: the cable carries nothing, the routes stay.
        ip("link", "set", "sw0", "down")
        assert watch.wait(2)
        view = kernel.read_uplinks()
        assert view.links["up0"] == LinkState(up=True, running=False)
        assert compute_uplink_fault(view, "up0", ADDRESS) == "up0 has no carrier"
        ip("link", "set", "sw0", "up")
        assert watch.wait(2)
        assert compute_uplink_fault(kernel.read_uplinks(), "up0", ADDRESS) is None

        # `ip link set up0 down`: the kernel removes its routes as well.
        ip("link", "set", "up0", "down")
        assert watch.wait(2)
        view = kernel.read_uplinks()
        assert view.links["up0"].up is False and view.default_routes == ()
        assert compute_uplink_fault(view, "up0", ADDRESS) == "up0 is down"
        ip("link", "set", "up0", "up")
        assert watch.wait(2)
        deadline = time.monotonic() + 5  # the carrier follows in its own notification
        while not kernel.read_uplinks().links["up0"].running:
            assert time.monotonic() < deadline, "up0 never got its carrier back"
            watch.wait(0.1)
        assert compute_uplink_fault(kernel.read_uplinks(), "up0", ADDRESS) == \
            "no default route via up0"
        watch.changed()  # drained: what comes next is the route's doing
        # The host's network manager puts the default route back.
        ip("route", "add", "default", "via", "192.0.2.254", "dev", "up0")
        assert watch.wait(2)
        assert compute_uplink_fault(kernel.read_uplinks(), "up0", ADDRESS) is None

        # A link that disappears is a change too.
        ip("link", "add", "extra0", "type", "veth", "peer", "name", "extra1")
        assert watch.wait(2)
        watch.changed()
        ip("link", "delete", "extra0")
        assert watch.wait(2)
        assert not watch.wait(0.2)
    finally:
        watch.close()
        kernel.close()
