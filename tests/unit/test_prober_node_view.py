"""The prober's reads of its node: the rx counters and addresses it keeps open, and the
local-slot check on top of them (read-only, in the test's own network namespace)."""

from __future__ import annotations

import ipaddress

from meshgress.slots import SlotId
from nodeagent.prober import _NodeView, _parse_net_dev, served_here
from nodeagent.steering import LocalHolder, ProbeTarget

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs
    lo:    1200      12    0    0    0     0          0         0     1200      12    0
mgeg1a2b: 98765     432    0    0    0     0          0         0        0       0    0
"""


def test_net_dev_gives_received_packets_per_interface():
    assert _parse_net_dev(NET_DEV) == {"lo": 12, "mgeg1a2b": 432}


def test_the_node_view_reads_again_from_its_open_handles():
    with _NodeView() as view:
        first, second = view.rx_packets(), view.rx_packets()
        assert "lo" in first and second["lo"] >= first["lo"]
        assert ipaddress.IPv4Address("127.0.0.1") in view.addresses()
        assert ipaddress.IPv4Address("127.0.0.1") in view.addresses()


def target(interface: str, egress_ip: str) -> ProbeTarget:
    return ProbeTarget(SlotId("egw", 0), "mge0", ipaddress.IPv4Address(egress_ip), 100, 50, 3,
                       local=LocalHolder(interface, ipaddress.IPv4Address(egress_ip)))


def test_a_local_slot_answers_with_its_interface_present_and_its_ip_up():
    up = {ipaddress.IPv4Address("192.0.2.201")}
    assert served_here([target("mgeg1a2b", "192.0.2.201")], {"mgeg1a2b": 1},
                       lambda: up) == {SlotId("egw", 0)}
    assert served_here([target("mgeg1a2b", "192.0.2.202")], {"mgeg1a2b": 1}, lambda: up) == set()
    assert served_here([target("mgeg1a2b", "192.0.2.201")], {"lo": 1}, lambda: up) == set()


def test_the_addresses_are_not_read_without_a_local_slot():
    def unreadable() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise AssertionError("read")
    remote = ProbeTarget(SlotId("egw", 1), "mge1", ipaddress.IPv4Address("192.0.2.202"), 100,
                         50, 3)
    assert served_here([remote], {}, unreadable) == set()


def test_an_unreadable_address_list_answers_nothing():
    def failing() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise OSError("netlink gone")
    assert served_here([target("mgeg1a2b", "192.0.2.201")], {"mgeg1a2b": 1}, failing) == set()
