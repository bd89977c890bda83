"""nodeagent.routes without root: RouteSpec to and from the kernel codec, the plan and the
table after it."""

import ipaddress
import socket
import struct

import pytest

from meshgress.kernel.rtnetlink import (
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REPLACE,
    RTM_DELROUTE,
    RTM_NEWROUTE,
    RTN_UNICAST,
    RTN_UNREACHABLE,
)
from meshgress.kernel_ids import ROUTE_PROTOCOL
from nodeagent.mesh import RouteSpec
from nodeagent.routes import (
    MAIN_TABLE,
    FakeRoutes,
    RoutePlan,
    apply_routes,
    compute_routes_after,
    decode_route,
    encode_route_request,
    plan_routes,
    route_dump_request,
)
from nodeagent.tracker import TrackedDataplane

RTMSG = struct.Struct("=BBBBBBBBI")
MESH = 7


def net(text):
    return ipaddress.ip_network(text)


def via_mesh(text):
    return RouteSpec(dst=net(text), oif="meshgress0")


def unreachable(text):
    return RouteSpec(dst=net(text), type="unreachable")


def attr(kind, payload):
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def body(dst, dst_len, *, family=socket.AF_INET, table=MAIN_TABLE, proto=ROUTE_PROTOCOL,
         kind=RTN_UNICAST, oif=MESH, table_attr=None):
    """An RTM_NEWROUTE body as the kernel sends it in a dump."""
    out = RTMSG.pack(family, dst_len, 0, 0, table, proto, 0, kind, 0)
    if table_attr is not None:
        out += attr(15, struct.pack("=I", table_attr))
    if dst_len:
        out += attr(1, ipaddress.ip_address(dst).packed)
    if oif is not None:
        out += attr(4, struct.pack("=I", oif))
    return out


DECODE = {
    "a pod CIDR through the mesh": (body("198.18.1.0", 24), via_mesh("198.18.1.0/24")),
    "the unreachable fallback (no interface)":
        (body("198.18.0.0", 16, kind=RTN_UNREACHABLE, oif=None), unreachable("198.18.0.0/16")),
    "RTA_TABLE wins over the header's table":
        (body("198.18.1.0", 24, table=252, table_attr=MAIN_TABLE), via_mesh("198.18.1.0/24")),
    "another table": (body("198.18.1.0", 24, table=252, table_attr=1000), None),
    "another protocol (the CNI's or the kernel's)": (body("198.18.1.0", 24, proto=2), None),
    "through another interface": (body("198.18.1.0", 24, oif=3), None),
    "IPv6": (body("198.18.1.0", 24, family=socket.AF_INET6), None),
    "a pending peer's held-back CIDR (blackhole)":
        (body("198.18.1.0", 24, kind=6, oif=None),
         RouteSpec(dst=net("198.18.1.0/24"), type="blackhole")),
    "another type (prohibit)": (body("198.18.1.0", 24, kind=8), None),
    "a default route, no RTA_DST": (body("0.0.0.0", 0, kind=RTN_UNREACHABLE, oif=None),
                                    unreachable("0.0.0.0/0")),
    "a truncated message": (b"\x02\x18", None),
}


@pytest.mark.parametrize(("raw", "expected"), DECODE.values(), ids=DECODE.keys())
def test_decode_route(raw, expected):
    assert decode_route(raw, mesh_index=MESH) == expected


def test_decode_without_a_mesh_interface_keeps_only_unreachable():
    assert decode_route(body("198.18.1.0", 24), mesh_index=None) is None


ROUNDTRIP = {
    "unicast /24": via_mesh("198.18.1.0/24"),
    "unicast /32": via_mesh("198.18.1.7/32"),
    "unreachable /16": unreachable("198.18.0.0/16"),
    "unreachable default": unreachable("0.0.0.0/0"),
}


@pytest.mark.parametrize("route", ROUNDTRIP.values(), ids=ROUNDTRIP.keys())
def test_encode_then_decode_gives_the_route_back(route):
    kind, flags, payload = encode_route_request(route, oif_index=MESH)
    assert kind == RTM_NEWROUTE
    assert flags & NLM_F_CREATE and flags & NLM_F_REPLACE
    assert decode_route(payload, mesh_index=MESH) == route


@pytest.mark.parametrize("route", ROUNDTRIP.values(), ids=ROUNDTRIP.keys())
def test_a_delete_names_destination_protocol_and_table(route):
    kind, flags, payload = encode_route_request(route, delete=True)
    assert kind == RTM_DELROUTE and not flags & NLM_F_CREATE
    family, dst_len, _s, _t, table, proto, scope, rtype, _f = RTMSG.unpack_from(payload)
    assert (family, dst_len, table, proto) == (socket.AF_INET, route.dst.prefixlen,
                                                MAIN_TABLE, ROUTE_PROTOCOL)
    assert scope == 255  # RT_SCOPE_NOWHERE: any scope (a link-scope route is found too)
    assert rtype == (RTN_UNREACHABLE if route.type == "unreachable" else 0)


def test_a_unicast_route_needs_an_interface_index():
    with pytest.raises(ValueError, match="interface index"):
        encode_route_request(via_mesh("198.18.1.0/24"))


def test_the_dump_request_asks_for_the_main_table_and_our_protocol():
    kind, flags, payload = route_dump_request()
    assert flags & NLM_F_DUMP == NLM_F_DUMP
    family, _d, _s, _t, table, proto, _scope, _type, _f = RTMSG.unpack_from(payload)
    assert (kind, family, table, proto) == (26, socket.AF_INET, MAIN_TABLE, ROUTE_PROTOCOL)


# --- the table after a plan ----------------------------------------------------------------

A, B, C = via_mesh("198.18.1.0/24"), via_mesh("198.18.2.0/24"), via_mesh("198.18.3.0/24")
FALLBACK = unreachable("198.18.0.0/16")
AFTER = {
    "in sync": ((A, B, FALLBACK), {A, B, FALLBACK}),
    "empty table": ((A, FALLBACK), set()),
    "one added, one removed": ((A, C, FALLBACK), {A, B, FALLBACK}),
    "a destination changes type in place":
        ((unreachable("198.18.1.0/24"), FALLBACK), {A, FALLBACK}),
    "everything goes": ((), {A, B, FALLBACK}),
}


@pytest.mark.parametrize(("desired", "observed"), AFTER.values(), ids=AFTER.keys())
def test_the_table_after_the_plan_needs_no_further_plan(desired, observed):
    observed = frozenset(observed)
    plan = plan_routes(desired, observed)
    after = compute_routes_after(observed, plan)
    assert after == frozenset(desired)
    assert plan_routes(desired, after).empty


def test_apply_routes_reads_once_then_tracks_and_a_failure_forces_a_read():
    routes = FakeRoutes()
    tracked = TrackedDataplane("routes", resync_interval=10.0)
    assert apply_routes(routes, (A, FALLBACK), tracked) == RoutePlan(add=(FALLBACK, A),
                                                                     remove=())
    assert apply_routes(routes, (A, B, FALLBACK), tracked).add == (B,)
    assert routes.reads == 1
    routes.fail_on = C
    with pytest.raises(OSError):
        apply_routes(routes, (A, B, C, FALLBACK), tracked)
    routes.fail_on = None
    assert apply_routes(routes, (A, B, C, FALLBACK), tracked).add == (C,)
    assert routes.reads == 2
    assert routes.table == {A, B, C, FALLBACK}


def test_apply_routes_without_a_tracker_reads_every_time():
    routes = FakeRoutes()
    apply_routes(routes, (A,))
    apply_routes(routes, (A,))
    assert routes.reads == 2
