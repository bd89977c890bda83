"""The kernel library's rtnetlink codec (pure): requests say what the kernel needs, and the
decoders read back what a request (or the kernel's reply, which has the same shape) says."""

import ipaddress
import socket
import struct

import pytest

from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.rtnetlink import Route, Rule
from meshgress.kernel.rtnl import Rtnl

NET = ipaddress.IPv4Network


def attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def test_attributes_are_padded_and_parsed_back():
    data = rt.attr(3, b"wg0\0") + rt.attr(4, struct.pack("=I", 1420)) + rt.attr(1 | 0x8000, b"x")
    assert len(rt.attr(3, b"abcde")) == 12
    assert rt.parse_attrs(data) == {3: b"wg0\0", 4: struct.pack("=I", 1420), 1: b"x"}
    assert rt.parse_attrs(data, wanted=frozenset({4})) == {4: struct.pack("=I", 1420)}
    assert rt.parse_attrs(b"\x02\x00\x01\x00") == {}  # a length below 4 ends the walk


def test_a_link_is_decoded_with_kind_mtu_state_and_peer():
    body = (rt.IFINFOMSG.pack(0, 0, 7, 0x1043, 0) + attr(3, b"wg0\0")
            + attr(4, struct.pack("=I", 1420)) + attr(5, struct.pack("=I", 2))
            + attr(1, bytes.fromhex("020000000001")) + attr(18, attr(1, b"wireguard\0")))
    assert rt.decode_link(body) == rt.Link(7, "wg0", "02:00:00:00:00:01", True, "wireguard",
                                           1420, 2, running=True)
    bare = rt.IFINFOMSG.pack(0, 0, 9, 0x1000, 0) + attr(4, struct.pack("=I", 1500))
    assert rt.decode_link(bare) == rt.Link(9, "", "", False, None, 1500, None, running=False)
    # UP, BROADCAST, MULTICAST without RUNNING: what `ip link` shows as NO-CARRIER.
    no_carrier = rt.IFINFOMSG.pack(0, 0, 3, 0x1003, 0)
    link = rt.decode_link(no_carrier)
    assert link.up and not link.running


@pytest.mark.parametrize(("kwargs", "flags", "change", "mtu"), [
    ({"up": True}, rt.IFF_UP, rt.IFF_UP, None),
    ({"up": False}, 0, rt.IFF_UP, None),
    ({"mtu": 1380}, 0, 0, 1380),
    ({"up": True, "mtu": 1380}, rt.IFF_UP, rt.IFF_UP, 1380),
], ids=["up", "down", "mtu only", "mtu then up"])
def test_setting_a_link_changes_only_what_is_asked(kwargs, flags, change, mtu):
    kind, msg_flags, payload = rt.link_set_message(7, **kwargs)
    assert kind == rt.RTM_NEWLINK and msg_flags == rt.NLM_F_REQUEST | rt.NLM_F_ACK
    assert rt.IFINFOMSG.unpack_from(payload)[2:4] == (7, flags)
    assert rt.IFINFOMSG.unpack_from(payload)[4] == change
    attrs = rt.parse_attrs(payload, rt.IFINFOMSG.size)
    assert attrs.get(rt.IFLA_MTU) == (struct.pack("=I", mtu) if mtu else None)


def test_creating_a_link_never_replaces_one():
    kind, flags, payload = rt.link_create_message("meshgress0", "wireguard")
    assert kind == rt.RTM_NEWLINK and flags & rt.NLM_F_EXCL and flags & rt.NLM_F_CREATE
    attrs = rt.parse_attrs(payload, rt.IFINFOMSG.size)
    assert attrs[rt.IFLA_IFNAME] == b"meshgress0\0"
    assert rt.parse_attrs(attrs[rt.IFLA_LINKINFO]) == {rt.IFLA_INFO_KIND: b"wireguard\0"}
    kind, flags, _ = rt.veth_create_message("mgc1", "02:00:00:00:00:01", "eth0",
                                            "02:00:00:00:00:02", 5)
    assert flags & rt.NLM_F_EXCL and flags & rt.NLM_F_ECHO and not flags & rt.NLM_F_REPLACE


def test_an_address_with_a_lifetime_and_its_decoding():
    kind, flags, payload = rt.address_message(3, ipaddress.IPv4Address("192.0.2.50"), 32,
                                              lifetime=2)
    assert kind == rt.RTM_NEWADDR and flags & rt.NLM_F_REPLACE
    attrs = rt.parse_attrs(payload, rt.IFADDRMSG.size)
    assert rt.IFA_CACHEINFO_STRUCT.unpack(attrs[rt.IFA_CACHEINFO])[:2] == (2, 2)
    decoded = rt.decode_address(payload + attr(rt.IFA_FLAGS, struct.pack("=I", 0x80)))
    assert decoded is not None and decoded.address == ipaddress.IPv4Address("192.0.2.50")
    assert decoded.index == 3 and decoded.prefixlen == 32 and decoded.permanent
    v6 = (rt.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 4)
          + attr(rt.IFA_ADDRESS, ipaddress.IPv6Address("2001:db8::1").packed))
    assert rt.decode_address(v6).address == ipaddress.IPv6Address("2001:db8::1")
    assert rt.decode_address(rt.IFADDRMSG.pack(socket.AF_PACKET, 0, 0, 0, 1)) is None


@pytest.mark.parametrize("route", [
    Route(NET("198.18.2.0/24"), 254, 109, rt.RTN_UNICAST, rt.RT_SCOPE_LINK, 7),
    Route(NET("198.18.0.0/16"), 254, 109, rt.RTN_UNREACHABLE),
    Route(NET("0.0.0.0/0"), 51821, 109, rt.RTN_UNICAST, rt.RT_SCOPE_LINK, 9),
    Route(NET("0.0.0.0/0"), 51820, 109, rt.RTN_BLACKHOLE),
    Route(NET("0.0.0.0/0"), 254, 3, oif=2, gateway=ipaddress.IPv4Address("192.0.2.1"),
          metric=100),
], ids=["mesh", "fallback", "slot table", "drop table", "default via"])
def test_a_route_request_decodes_to_the_same_route(route):
    kind, flags, payload = rt.route_message(route)
    assert kind == rt.RTM_NEWROUTE and flags & rt.NLM_F_REPLACE and flags & rt.NLM_F_CREATE
    assert rt.decode_route(payload) == route
    _, create_only, _ = rt.route_message(route, replace=False)
    assert create_only & rt.NLM_F_EXCL and not create_only & rt.NLM_F_REPLACE


def test_a_multipath_route_reads_its_first_hop():
    hop = rt.RTNEXTHOP.pack(rt.RTNEXTHOP.size, 0, 0, 4)
    body = (rt.RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, rt.RTN_UNICAST, 0)
            + attr(rt.RTA_MULTIPATH, hop + rt.RTNEXTHOP.pack(rt.RTNEXTHOP.size, 0, 0, 5)))
    assert rt.decode_route(body).oif == 4


def test_deletes_and_dumps_say_what_the_kernel_needs():
    kind, _, payload = rt.route_delete_message(NET("0.0.0.0/0"), table=51821, protocol=109)
    assert kind == rt.RTM_DELROUTE
    head = rt.RTMSG.unpack_from(payload)
    assert head[4:8] == (0, 109, rt.RT_SCOPE_NOWHERE, rt.RTN_UNSPEC)  # any scope, any type
    assert rt.parse_attrs(payload, rt.RTMSG.size)[rt.RTA_TABLE] == struct.pack("=I", 51821)
    kind, flags, payload = rt.route_dump_message(protocol=109, type=rt.RTN_UNICAST, oif=7)
    assert kind == rt.RTM_GETROUTE and flags & rt.NLM_F_DUMP == rt.NLM_F_DUMP
    family, dst_len, src_len, tos, table, proto, scope, rtype, _ = rt.RTMSG.unpack_from(payload)
    # strict dump checking refuses any of dst_len, src_len, tos, scope set
    assert (family, dst_len, src_len, tos, scope) == (socket.AF_INET, 0, 0, 0, 0)
    assert (table, proto, rtype) == (0, 109, rt.RTN_UNICAST)
    assert payload[rt.RTMSG.size:] == attr(rt.RTA_OIF, struct.pack("=I", 7))


def test_a_link_deleted_by_index_is_named_by_nothing_else():
    kind, flags, payload = rt.link_delete_index_message(42)
    assert kind == rt.RTM_DELLINK and flags == rt.NLM_F_REQUEST | rt.NLM_F_ACK
    assert rt.IFINFOMSG.unpack_from(payload)[2] == 42
    assert payload[rt.IFINFOMSG.size:] == b""


def test_a_route_created_without_replace_fails_on_an_existing_one():
    route = Route(NET("198.18.0.7/32"), protocol=109, oif=4)
    assert rt.route_message(route, replace=False)[1] & rt.NLM_F_EXCL
    assert not rt.route_message(route, replace=False)[1] & rt.NLM_F_REPLACE


def test_a_rule_roundtrips_and_its_delete_names_the_same_rule():
    rule = Rule(priority=100, fwmark=0x10000, fwmask=0xFF0000, table=51821, protocol=109)
    kind, flags, payload = rt.rule_message(rule)
    assert kind == rt.RTM_NEWRULE and flags & rt.NLM_F_EXCL
    assert rt.decode_rule(payload) == rule
    kind, flags, deleted = rt.rule_message(rule, delete=True)
    assert kind == rt.RTM_DELRULE and not flags & rt.NLM_F_CREATE
    assert rt.decode_rule(deleted) == Rule(100, 0x10000, 0xFF0000, 51821, 0)
    small_table = rt.rule_message(Rule(101, 0x800000, 0xFF0000, 200))[2]
    assert rt.FIB_RULE_HDR.unpack_from(small_table)[4] == 200


def test_device_settings_and_their_notifications():
    _, _, payload = rt.set_ipv4_conf_message(4, {rt.IPV4_DEVCONF_RP_FILTER: 2})
    spec = rt.parse_attrs(payload, rt.IFINFOMSG.size)[rt.IFLA_AF_SPEC]
    conf = rt.parse_attrs(rt.parse_attrs(rt.parse_attrs(spec)[socket.AF_INET])[rt.IFLA_INET_CONF])
    assert conf == {rt.IPV4_DEVCONF_RP_FILTER: struct.pack("=I", 2)}
    reply = (rt.NETCONFMSG.pack(socket.AF_INET) + attr(rt.NETCONFA_IFINDEX, struct.pack("=i", -1))
             + attr(rt.NETCONFA_RP_FILTER, struct.pack("=I", 1)))
    assert rt.decode_netconf(reply) == rt.Netconf(-1, None, 1, None)


def test_an_empty_batch_sends_nothing():
    with Rtnl() as rtnl:  # a NETLINK_ROUTE socket needs no privilege
        assert rtnl.batch([]) == []
        assert rtnl.batch_results([]) == ([], {})
