"""The rtnetlink messages of the node's egress steering (rules and per-slot tables): pure."""

import socket
import struct

import pytest

from meshgress.kernel_ids import FWMARK_MASK
from nodeagent.egress_apply import (
    RTN_BLACKHOLE,
    RTN_UNICAST,
    blackhole_route_message,
    decode_rule,
    decode_table_route,
    delete_default_route_message,
    route_dump_message,
    rule_dump_message,
    rule_message,
)

RTMSG = struct.Struct("=BBBBBBBBI")
HDR = struct.Struct("=BBBBBBBBI")


def rta(kind, value):
    payload = struct.pack("=I", value)
    return struct.pack("=HH", 4 + len(payload), kind) + payload


def route_body(table, proto=109, kind=RTN_UNICAST, oif=None, dst_len=0):
    body = RTMSG.pack(socket.AF_INET, dst_len, 0, 0, table if table < 256 else 0, proto, 253,
                      kind, 0) + rta(15, table)
    return body + (rta(4, oif) if oif is not None else b"")


@pytest.mark.parametrize(("body", "expected"), [
    (route_body(51821, oif=7), (51821, "mge00000001")),
    (route_body(51820, kind=RTN_BLACKHOLE), (51820, None)),
    (route_body(51821, oif=8), None),              # through an interface not ours
    (route_body(254, oif=7), None),                # the main table is the mesh's
    (route_body(51821, proto=3, oif=7), None),     # another protocol
    (route_body(51821, oif=7, dst_len=24), None),  # not a default route
])
def test_decode_table_route(body, expected):
    assert decode_table_route(body, {7: "mge00000001"}) == expected


@pytest.mark.parametrize(("mark", "table"), [(0x10000, 51821), (0xFF0000, 51820),
                                             (0x20000, 200)])
def test_a_rule_roundtrips_and_a_delete_names_the_same_rule(mark, table):
    kind, flags, body = rule_message(mark, table)
    assert kind == 32 and flags & 0x400 and flags & 0x200  # NEWRULE, CREATE|EXCL
    assert decode_rule(body) == (mark, table)
    kind, flags, deleted = rule_message(mark, table, delete=True)
    assert kind == 33 and not flags & 0x400 and deleted == body


def test_rules_of_others_are_not_ours():
    _, _, body = rule_message(0x10000, 51821)
    other_priority = body.replace(struct.pack("=HHI", 8, 6, 100), struct.pack("=HHI", 8, 6, 32766))
    assert decode_rule(other_priority) is None
    other_mask = body.replace(struct.pack("=HHI", 8, 16, FWMARK_MASK),
                              struct.pack("=HHI", 8, 16, 0xFFFFFFFF))
    assert decode_rule(other_mask) is None


def test_dumps_and_writes_say_what_the_kernel_needs():
    kind, flags, body = route_dump_message(RTN_UNICAST, oif=7)
    assert kind == 26 and flags & 0x300 == 0x300
    family, dst_len, src_len, tos, table, proto, scope, rtype, _ = RTMSG.unpack_from(body)
    # strict dump checking refuses any of dst_len, src_len, tos, scope set
    assert (family, dst_len, src_len, tos, scope) == (socket.AF_INET, 0, 0, 0, 0)
    assert (table, proto, rtype) == (0, 109, RTN_UNICAST) and body[RTMSG.size:] == rta(4, 7)
    assert rule_dump_message()[2] == HDR.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    _, _, hole = blackhole_route_message(51820)
    assert RTMSG.unpack_from(hole)[7] == RTN_BLACKHOLE and hole.endswith(rta(15, 51820))
    _, _, gone = delete_default_route_message(51821)
    assert RTMSG.unpack_from(gone)[6] == 255  # scope nowhere: matches a link-scope route


def test_an_empty_batch_sends_nothing():
    from cni.netlink import Rtnl  # a NETLINK_ROUTE socket needs no privilege

    with Rtnl() as rtnl:
        assert rtnl.batch([]) == []
        assert rtnl.batch_results([]) == ([], {})
