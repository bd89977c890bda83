"""The rtnetlink message codec: requests meshgress sends and the replies it reads.

Why plain structs and not pyroute2: measured on this project's machines, pyroute2 0.9's
synchronous API costs about a millisecond per request (each call runs an asyncio event
loop) and decodes every reply into objects, which at 5,000 routes made a dump cost 1-3 s
and a pod ADD's eight requests most of its time. The message shapes meshgress needs are
few; here each is a function from values to bytes (or back), and a request costs tens of
microseconds.

Every constant is defined once, here. Messages are `(type, flags, payload)` tuples that
`meshgress.kernel.rtnl.Rtnl` frames, sends (several in one write) and answers. Decoders
return None for what they do not describe (another family, a message that is not theirs)
rather than raising, because dumps carry everything the kernel has.

IPv4 is what the datapath programs; addresses decode both families, since the node's
underlay may be IPv6.

Purely computational: no I/O.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import Final

# --- message types -------------------------------------------------------------------------
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTM_GETADDR: Final = 22
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWRULE: Final = 32
RTM_DELRULE: Final = 33
RTM_GETRULE: Final = 34
RTM_SETNEIGHTBL: Final = 67
RTM_NEWNETCONF: Final = 80
RTM_GETNETCONF: Final = 82
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3

# --- header flags ---------------------------------------------------------------------------
NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_ECHO: Final = 0x8
NLM_F_DUMP: Final = 0x300
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
NLM_F_CAPPED: Final = 0x100  # in an ACK
NLM_F_ACK_TLVS: Final = 0x200  # in an ACK
NLMSGERR_ATTR_MSG: Final = 1

# --- socket options -------------------------------------------------------------------------
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_EXT_ACK: Final = 11
NETLINK_GET_STRICT_CHK: Final = 12
RTNLGRP_LINK: Final = 1
RTNLGRP_IPV4_IFADDR: Final = 5
RTNLGRP_IPV4_ROUTE: Final = 7
RTNLGRP_IPV4_NETCONF: Final = 24

# --- link attributes ------------------------------------------------------------------------
IFLA_ADDRESS: Final = 1
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_LINK: Final = 5
IFLA_LINKINFO: Final = 18
IFLA_AF_SPEC: Final = 26
IFLA_NET_NS_FD: Final = 28
IFLA_INFO_KIND: Final = 1
IFLA_INFO_DATA: Final = 2
IFLA_INET_CONF: Final = 1
VETH_INFO_PEER: Final = 1
IFF_UP: Final = 0x1
IFF_RUNNING: Final = 0x40
"""Operationally up (RFC 2863): carrier present and not dormant. Cleared when a cable is
pulled, a switch port or a veth's peer goes down, or the link itself is set down."""
IFNAMSIZ: Final = 16
"""An interface name's buffer, NUL included: names are at most 15 bytes."""

# --- address attributes ---------------------------------------------------------------------
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_LABEL: Final = 3
IFA_CACHEINFO: Final = 6
IFA_FLAGS: Final = 8
IFA_F_PERMANENT: Final = 0x80
INFINITY_LIFE_TIME: Final = 0xFFFFFFFF

# --- route attributes and values -----------------------------------------------------------
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_PRIORITY: Final = 6
RTA_MULTIPATH: Final = 9
RTA_TABLE: Final = 15
RT_TABLE_UNSPEC: Final = 0
RT_TABLE_MAIN: Final = 254
RTN_UNSPEC: Final = 0
RTN_UNICAST: Final = 1
RTN_BLACKHOLE: Final = 6
RTN_UNREACHABLE: Final = 7
RT_SCOPE_UNIVERSE: Final = 0
RT_SCOPE_LINK: Final = 253
RT_SCOPE_HOST: Final = 254
RT_SCOPE_NOWHERE: Final = 255
"""In a delete request: matches a route of any scope."""

# --- rule attributes ------------------------------------------------------------------------
FRA_PRIORITY: Final = 6
FRA_FWMARK: Final = 10
FRA_TABLE: Final = 15
FRA_FWMASK: Final = 16
FRA_PROTOCOL: Final = 21
FR_ACT_TO_TBL: Final = 1

# --- IPv4 device configuration (net.ipv4.conf.<interface>.*) -------------------------------
IPV4_DEVCONF_FORWARDING: Final = 1
IPV4_DEVCONF_PROXY_ARP: Final = 3
IPV4_DEVCONF_RP_FILTER: Final = 8
NETCONFA_IFINDEX: Final = 1
NETCONFA_FORWARDING: Final = 2
NETCONFA_RP_FILTER: Final = 3
NETCONFA_PROXY_NEIGH: Final = 5
NETCONFA_IFINDEX_ALL: Final = -1
NDTA_NAME: Final = 1
NDTA_PARMS: Final = 6
NDTPA_IFINDEX: Final = 1
NDTPA_PROXY_DELAY: Final = 13

NLA_TYPE_MASK: Final = 0x3FFF

NLMSGHDR: Final = struct.Struct("=IHHII")
IFINFOMSG: Final = struct.Struct("=BxHiII")
IFADDRMSG: Final = struct.Struct("=BBBBi")
RTMSG: Final = struct.Struct("=BBBBBBBBI")
FIB_RULE_HDR: Final = struct.Struct("=BBBBBBBBI")
NETCONFMSG: Final = struct.Struct("=Bxxx")
NDTMSG: Final = struct.Struct("=Bxxx")
IFA_CACHEINFO_STRUCT: Final = struct.Struct("=IIII")
RTNEXTHOP: Final = struct.Struct("=HBBi")
RTATTR: Final = struct.Struct("=HH")
U32: Final = struct.Struct("=I")
U64: Final = struct.Struct("=Q")
I32: Final = struct.Struct("=i")

Message = tuple[int, int, bytes]
"""(type, flags, payload) of one request, for `Rtnl.batch`."""

_CREATE_OR_REPLACE: Final = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_CREATE_NEW: Final = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_ACKED: Final = NLM_F_REQUEST | NLM_F_ACK
_DUMP: Final = NLM_F_REQUEST | NLM_F_DUMP


# --- attributes -----------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type-length-value, padded to 4 bytes)."""
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def u32_attr(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def text_of(raw: bytes | None) -> str:
    """A NUL-terminated attribute as text ("" when absent)."""
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


def u32_of(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind)
    return U32.unpack(raw)[0] if raw is not None and len(raw) == 4 else None


def parse_attrs(data: bytes, offset: int = 0,
                wanted: frozenset[int] | None = None) -> dict[int, bytes]:
    """Attributes from `offset` on, by type; only the `wanted` types if given."""
    attrs: dict[int, bytes] = {}
    end = len(data)
    unpack = RTATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if wanted is None or kind in wanted:
            attrs[kind] = data[offset + 4: offset + length]
        offset += (length + 3) & ~3
    return attrs


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


# --- links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    up: bool
    kind: str | None
    mtu: int
    peer_index: int | None = None
    """IFLA_LINK: for a veth, its peer's index (in the peer's namespace)."""
    running: bool = False
    """IFF_RUNNING: operationally up, able to carry packets (`up` is only the admin state)."""


_LINK_ATTRS: Final = frozenset((IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO))


def decode_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body, IFINFOMSG.size, _LINK_ATTRS)
    kind = None
    if IFLA_LINKINFO in attrs:
        kind = text_of(parse_attrs(attrs[IFLA_LINKINFO]).get(IFLA_INFO_KIND)) or None
    mac = ":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b""))
    mtu = U32.unpack(attrs[IFLA_MTU])[0] if len(attrs.get(IFLA_MTU, b"")) == 4 else 0
    peer = U32.unpack(attrs[IFLA_LINK])[0] if len(attrs.get(IFLA_LINK, b"")) == 4 else None
    return Link(index, text_of(attrs.get(IFLA_IFNAME)), mac, bool(flags & IFF_UP), kind, mtu,
                peer, bool(flags & IFF_RUNNING))


def link_get_message(name: str) -> Message:
    """RTM_GETLINK of one interface by name (ENODEV when there is none)."""
    return (RTM_GETLINK, _ACKED, IFINFOMSG.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(name)))


def link_dump_message() -> Message:
    return (RTM_GETLINK, _DUMP, IFINFOMSG.pack(0, 0, 0, 0, 0))


def link_create_message(name: str, kind: str, *, mtu: int | None = None) -> Message:
    """`ip link add NAME type KIND` (EEXIST when the name is taken)."""
    payload = (IFINFOMSG.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(name))
               + (u32_attr(IFLA_MTU, mtu) if mtu else b"")
               + attr(IFLA_LINKINFO, attr(IFLA_INFO_KIND, cstr(kind))))
    return (RTM_NEWLINK, _CREATE_NEW, payload)


def veth_create_message(name: str, mac: str, peer_name: str, peer_mac: str,
                        peer_netns_fd: int, *, mtu: int | None = None,
                        up: bool = False) -> Message:
    """A veth pair whose peer is created directly inside `peer_netns_fd`'s namespace.

    The kernel echoes the new link (kernels >= 6.3) because the request asks for it."""
    mtu_attr = u32_attr(IFLA_MTU, mtu) if mtu else b""
    peer = (IFINFOMSG.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(peer_name))
            + attr(IFLA_ADDRESS, mac_bytes(peer_mac))
            + u32_attr(IFLA_NET_NS_FD, peer_netns_fd) + mtu_attr)
    linkinfo = (attr(IFLA_INFO_KIND, cstr("veth"))
                + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)))
    payload = (IFINFOMSG.pack(0, 0, 0, IFF_UP if up else 0, IFF_UP)
               + attr(IFLA_IFNAME, cstr(name)) + attr(IFLA_ADDRESS, mac_bytes(mac))
               + mtu_attr + attr(IFLA_LINKINFO, linkinfo))
    return (RTM_NEWLINK, _CREATE_NEW | NLM_F_ECHO, payload)


def link_set_message(index: int, *, up: bool | None = None, mtu: int | None = None) -> Message:
    """Set a link's administrative state and/or MTU (one request: the MTU is applied
    before the state changes)."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    payload = (IFINFOMSG.pack(0, 0, index, flags, change)
               + (u32_attr(IFLA_MTU, mtu) if mtu is not None else b""))
    return (RTM_NEWLINK, _ACKED, payload)


def set_up_message(index: int) -> Message:
    return link_set_message(index, up=True)


def link_delete_message(name: str) -> Message:
    """Delete a link by name (ENODEV when there is none)."""
    return (RTM_DELLINK, _ACKED, IFINFOMSG.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(name)))


def link_delete_index_message(index: int) -> Message:
    """Delete a link by index (ENODEV when there is none): the very interface a caller
    looked at, not whichever carries its name by then."""
    return (RTM_DELLINK, _ACKED, IFINFOMSG.pack(0, 0, index, 0, 0))


# --- addresses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    index: int
    address: IPv4Address | IPv6Address
    prefixlen: int
    scope: int
    label: str
    flags: int = 0

    @property
    def permanent(self) -> bool:
        """Added without a lifetime (by a person, or by meshgress without one)."""
        return bool(self.flags & IFA_F_PERMANENT)


def address_message(index: int, address: IPv4Address, prefixlen: int, *,
                    scope: int = RT_SCOPE_UNIVERSE, label: str | None = None,
                    lifetime: int | None = None) -> Message:
    """Add or refresh an IPv4 address. With `lifetime` (seconds) the kernel removes it by
    itself once that runs out, unless refreshed first."""
    raw = address.packed
    payload = (IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, scope, index)
               + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
               + (attr(IFA_LABEL, cstr(label)) if label else b""))
    if lifetime is not None:
        payload += attr(IFA_CACHEINFO, IFA_CACHEINFO_STRUCT.pack(lifetime, lifetime, 0, 0))
    return (RTM_NEWADDR, _CREATE_OR_REPLACE, payload)


def address_delete_message(index: int, address: IPv4Address, prefixlen: int) -> Message:
    """Remove an IPv4 address (EADDRNOTAVAIL when it is not there)."""
    raw = address.packed
    payload = (IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, 0, index)
               + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))
    return (RTM_DELADDR, _ACKED, payload)


def address_dump_message(family: int = socket.AF_INET) -> Message:
    return (RTM_GETADDR, _DUMP, IFADDRMSG.pack(family, 0, 0, 0, 0))


def decode_address(body: bytes) -> Address | None:
    if len(body) < IFADDRMSG.size:
        return None
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(body)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    attrs = parse_attrs(body, IFADDRMSG.size)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    size = 4 if family == socket.AF_INET else 16
    if raw is None or len(raw) != size:
        return None
    full_flags = u32_of(attrs, IFA_FLAGS)
    return Address(index, ip_address(raw), prefixlen, scope, text_of(attrs.get(IFA_LABEL)),
                   flags if full_flags is None else full_flags)


# --- routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """An IPv4 route as meshgress writes and reads it.

    `oif` is an interface index; for a multipath route, the first hop's. `metric` is
    RTA_PRIORITY (None: not given)."""

    dst: IPv4Network
    table: int = RT_TABLE_MAIN
    protocol: int = 0
    type: int = RTN_UNICAST
    scope: int = RT_SCOPE_UNIVERSE
    oif: int | None = None
    gateway: IPv4Address | None = None
    metric: int | None = None


def route_message(route: Route, *, replace: bool = True) -> Message:
    """RTM_NEWROUTE for `route`. `replace`: create or replace whatever route the kernel
    has for the same destination, table and metric; otherwise create only (EEXIST when
    there is one)."""
    payload = (RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0,
                          route.table if route.table < 256 else RT_TABLE_UNSPEC,
                          route.protocol, route.scope, route.type, 0)
               + u32_attr(RTA_TABLE, route.table)
               + (attr(RTA_DST, route.dst.network_address.packed) if route.dst.prefixlen
                  else b"")
               + (u32_attr(RTA_OIF, route.oif) if route.oif is not None else b"")
               + (attr(RTA_GATEWAY, route.gateway.packed) if route.gateway is not None
                  else b"")
               + (u32_attr(RTA_PRIORITY, route.metric) if route.metric is not None else b""))
    return (RTM_NEWROUTE, _CREATE_OR_REPLACE if replace else _CREATE_NEW, payload)


def route_delete_message(dst: IPv4Network, *, table: int, protocol: int,
                         type: int = RTN_UNSPEC, oif: int | None = None) -> Message:
    """Delete the route to `dst` in `table` that carries `protocol`, of any scope; only of
    `type` when given, only through `oif` when given (ESRCH when there is none)."""
    payload = (RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0,
                          table if table < 256 else RT_TABLE_UNSPEC, protocol,
                          RT_SCOPE_NOWHERE, type, 0)
               + u32_attr(RTA_TABLE, table)
               + (attr(RTA_DST, dst.network_address.packed) if dst.prefixlen else b"")
               + (u32_attr(RTA_OIF, oif) if oif is not None else b""))
    return (RTM_DELROUTE, _ACKED, payload)


def route_dump_message(*, table: int = RT_TABLE_UNSPEC, protocol: int = 0,
                       type: int = RTN_UNSPEC, oif: int | None = None) -> Message:
    """An IPv4 route dump whose header asks for one table, protocol, type and interface
    (0/None: any). Kernels honour the filter only on a socket with strict checking
    (NETLINK_GET_STRICT_CHK, 4.20+); callers filter the reply as well."""
    payload = (RTMSG.pack(socket.AF_INET, 0, 0, 0,
                          table if table < 256 else RT_TABLE_UNSPEC, protocol, 0, type, 0)
               + (u32_attr(RTA_TABLE, table) if table >= 256 else b"")
               + (u32_attr(RTA_OIF, oif) if oif is not None else b""))
    return (RTM_GETROUTE, _DUMP, payload)


_ZERO_DST: Final = b"\0\0\0\0"


def decode_route(body: bytes) -> Route | None:
    """The IPv4 route an RTM_NEWROUTE body describes (None: another family).

    Hand-unrolled rather than through `parse_attrs`: a resync decodes every route of a
    5,000-node mesh."""
    if len(body) < RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, protocol, scope, kind, _flags = RTMSG.unpack_from(body)
    if family != socket.AF_INET:
        return None
    dst, oif, gateway, metric = _ZERO_DST, None, None, None
    offset, end = RTMSG.size, len(body)
    unpack, u32 = RTATTR.unpack_from, U32.unpack_from
    while offset + 4 <= end:
        size, attr_type = unpack(body, offset)
        if size < 4:
            break
        attr_type &= NLA_TYPE_MASK
        if size == 8:
            if attr_type == RTA_DST:
                dst = body[offset + 4:offset + 8]
            elif attr_type == RTA_OIF:
                oif = u32(body, offset + 4)[0]
            elif attr_type == RTA_TABLE:
                table = u32(body, offset + 4)[0]
            elif attr_type == RTA_GATEWAY:
                gateway = IPv4Address(body[offset + 4:offset + 8])
            elif attr_type == RTA_PRIORITY:
                metric = u32(body, offset + 4)[0]
        elif attr_type == RTA_MULTIPATH and oif is None and size >= 4 + RTNEXTHOP.size:
            oif = RTNEXTHOP.unpack_from(body, offset + 4)[3]
        offset += (size + 3) & ~3
    return Route(IPv4Network((int.from_bytes(dst, "big"), dst_len)), table, protocol, kind,
                 scope, oif, gateway, metric)


# --- policy rules ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Rule:
    """`ip rule priority P fwmark MARK/MASK lookup TABLE` (IPv4), tagged with `protocol`."""

    priority: int
    fwmark: int
    fwmask: int
    table: int
    protocol: int = 0


def rule_message(rule: Rule, *, delete: bool = False) -> Message:
    """Add (EEXIST when an identical rule exists) or delete (ENOENT when none) a rule."""
    payload = (FIB_RULE_HDR.pack(socket.AF_INET, 0, 0, 0,
                                 rule.table if rule.table < 256 else RT_TABLE_UNSPEC, 0, 0,
                                 FR_ACT_TO_TBL, 0)
               + u32_attr(FRA_PRIORITY, rule.priority) + u32_attr(FRA_FWMARK, rule.fwmark)
               + u32_attr(FRA_FWMASK, rule.fwmask) + u32_attr(FRA_TABLE, rule.table)
               + (attr(FRA_PROTOCOL, bytes((rule.protocol,))) if rule.protocol and not delete
                  else b""))
    if delete:
        return (RTM_DELRULE, _ACKED, payload)
    return (RTM_NEWRULE, _CREATE_NEW, payload)


def rule_dump_message() -> Message:
    return (RTM_GETRULE, _DUMP, FIB_RULE_HDR.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0))


def decode_rule(body: bytes) -> Rule | None:
    """An IPv4 fwmark rule (None: another family, or a rule without a fwmark)."""
    if len(body) < FIB_RULE_HDR.size:
        return None
    family, _dst, _src, _tos, table, _r1, _r2, _action, _flags = FIB_RULE_HDR.unpack_from(body)
    if family != socket.AF_INET:
        return None
    attrs = parse_attrs(body, FIB_RULE_HDR.size)
    mark = u32_of(attrs, FRA_FWMARK)
    if mark is None:
        return None
    protocol = attrs.get(FRA_PROTOCOL, b"\0")[:1] or b"\0"
    return Rule(priority=u32_of(attrs, FRA_PRIORITY) or 0, fwmark=mark,
                fwmask=u32_of(attrs, FRA_FWMASK) or 0xFFFFFFFF,
                table=u32_of(attrs, FRA_TABLE) or table, protocol=protocol[0])


# --- IPv4 device settings -------------------------------------------------------------------


def set_ipv4_conf_message(index: int, values: dict[int, int]) -> Message:
    """Set per-interface IPv4 sysctls (`IPV4_DEVCONF_*` -> value), as writing
    /proc/sys/net/ipv4/conf/<interface>/... would, but batchable with other requests."""
    conf = b"".join(u32_attr(key, value) for key, value in sorted(values.items()))
    payload = IFINFOMSG.pack(0, 0, index, 0, 0) + attr(
        IFLA_AF_SPEC, attr(socket.AF_INET, attr(IFLA_INET_CONF, conf)))
    return (RTM_NEWLINK, _ACKED, payload)


def set_arp_proxy_delay_message(index: int, msecs: int) -> Message:
    """/proc/sys/net/ipv4/neigh/<interface>/proxy_delay, as a request."""
    parms = u32_attr(NDTPA_IFINDEX, index) + attr(NDTPA_PROXY_DELAY, U64.pack(msecs))
    payload = (NDTMSG.pack(socket.AF_INET) + attr(NDTA_NAME, cstr("arp_cache"))
               + attr(NDTA_PARMS, parms))
    return (RTM_SETNEIGHTBL, _ACKED, payload)


def netconf_get_message(index: int) -> Message:
    """The IPv4 netconf of one interface: forwarding, rp_filter, proxy_arp."""
    return (RTM_GETNETCONF, _ACKED,
            NETCONFMSG.pack(socket.AF_INET) + u32_attr(NETCONFA_IFINDEX, index))


@dataclass(frozen=True)
class Netconf:
    index: int
    forwarding: int | None
    rp_filter: int | None
    proxy_arp: int | None


def decode_netconf(body: bytes) -> Netconf | None:
    """An RTM_NEWNETCONF body (reply or notification); index -1 means `all`."""
    if len(body) < NETCONFMSG.size or body[0] != socket.AF_INET:
        return None
    attrs = parse_attrs(body, NETCONFMSG.size)
    raw_index = attrs.get(NETCONFA_IFINDEX)
    if raw_index is None or len(raw_index) != 4:
        return None
    return Netconf(I32.unpack(raw_index)[0], u32_of(attrs, NETCONFA_FORWARDING),
                   u32_of(attrs, NETCONFA_RP_FILTER), u32_of(attrs, NETCONFA_PROXY_NEIGH))
