"""The link-level side of a WireGuard interface (exists? kind, MTU, up/down, add, delete).

Why it exists: both backends need the same rtnetlink operations around their own
WireGuard configuration channel — the kernel backend to create and delete its
`wireguard` links, the userspace backend to read and set MTU and state of the TUN
device wireguard-go made. One small adapter over pyroute2's IPRoute, optionally bound to
a named network namespace (the netlink socket is opened inside it; the namespace is
never created here).

`get` in the caller's own namespace — what every reconcile pass of every WireGuard
device does — skips pyroute2: one RTM_GETLINK by name on a plain netlink socket costs
tens of microseconds, where pyroute2's synchronous API (an asyncio loop per call, a dump
of every link to find the index) cost 5-15 ms.

Side effects: this module is part of the apply layer.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wireguard.errors import NetlinkRequestError

IFF_UP = 0x1
RTM_NEWLINK, RTM_GETLINK, NLMSG_ERROR = 16, 18, 2
NLM_F_REQUEST = 0x1
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 18, 1
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")


def _attrs(body: bytes, offset: int = 0) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while offset + 4 <= len(body):
        size, kind = _RTATTR.unpack_from(body, offset)
        if size < 4:
            break
        found[kind & 0x3FFF] = body[offset + 4:offset + size]
        offset += (size + 3) & ~3
    return found


def link_request(name: str) -> bytes:
    """RTM_GETLINK for one interface by name. Purely computational."""
    raw = name.encode() + b"\0"
    attr = _RTATTR.pack(4 + len(raw), IFLA_IFNAME) + raw + b"\0" * (-len(raw) % 4)
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, 1, 0) + body


def decode_link_reply(data: bytes, name: str) -> LinkState | None:
    """The link in the kernel's answer to `link_request` (None: no such link; other
    errors raise NetlinkRequestError). Purely computational."""
    if len(data) < _NLMSGHDR.size:
        raise NetlinkRequestError(name, "link get", errno.EPROTO, "short netlink reply")
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    body = data[_NLMSGHDR.size:]
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", body)[0]
        if code == errno.ENODEV:
            return None
        raise NetlinkRequestError(name, "link get", code, errno.errorcode.get(code, str(code)))
    if kind != RTM_NEWLINK or len(body) < _IFINFOMSG.size:
        raise NetlinkRequestError(name, "link get", errno.EPROTO, f"unexpected reply {kind}")
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    attrs = _attrs(body, _IFINFOMSG.size)
    info = _attrs(attrs.get(IFLA_LINKINFO, b""))
    link_kind = info.get(IFLA_INFO_KIND, b"").split(b"\0", 1)[0].decode() or None
    mtu = struct.unpack("=I", attrs[IFLA_MTU])[0] if len(attrs.get(IFLA_MTU, b"")) == 4 else 0
    return LinkState(index=index, kind=link_kind, mtu=mtu, up=bool(flags & IFF_UP))


def get_link_here(name: str) -> LinkState | None:
    """The link `name` in the calling thread's network namespace, over plain rtnetlink."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.sendto(link_request(name), (0, 0))
        return decode_link_reply(sock.recv(65536), name)


@dataclass(frozen=True)
class LinkState:
    index: int
    kind: str | None
    mtu: int
    up: bool


class Links:
    """rtnetlink operations on links by name, in `netns` (a name under /run/netns or a
    path) or, when None, in the caller's own network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    @contextmanager
    def session(self) -> Iterator[IPRoute]:
        # flags=0: open the socket inside the netns, never create it
        ipr = IPRoute() if self.netns is None else IPRoute(netns=self.netns, flags=0)
        try:
            yield ipr
        finally:
            ipr.close()

    def get(self, name: str, ipr: Any = None) -> LinkState | None:
        if ipr is None and self.netns is None:
            return get_link_here(name)
        if ipr is None:
            with self.session() as own:
                return self.get(name, own)
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            return None
        try:
            (msg,) = ipr.link("get", index=indexes[0])
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise NetlinkRequestError(name, "link get", exc.code, str(exc)) from exc
        return LinkState(
            index=msg["index"],
            kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
            mtu=msg.get_attr("IFLA_MTU"),
            up=bool(msg["flags"] & IFF_UP),
        )

    def add(self, name: str, kind: str) -> None:
        """Create a link of `kind`; an existing link of that kind counts as success."""
        with self.session() as ipr:
            try:
                ipr.link("add", ifname=name, kind=kind)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    state = self.get(name, ipr)
                    if state is not None and state.kind == kind:
                        return
                raise NetlinkRequestError(name, f"link add type {kind}", exc.code,
                                          str(exc)) from exc

    def configure(self, name: str, *, mtu: int | None, up: bool | None) -> None:
        """Set MTU and/or administrative state (MTU first, so the link comes up with it)."""
        if mtu is None and up is None:
            return
        with self.session() as ipr:
            state = self.get(name, ipr)
            if state is None:
                raise NetlinkRequestError(name, "link set", errno.ENODEV, "no such interface")
            try:
                if mtu is not None:
                    ipr.link("set", index=state.index, mtu=mtu)
                if up is not None:
                    ipr.link("set", index=state.index, state="up" if up else "down")
            except NetlinkError as exc:
                raise NetlinkRequestError(name, "link set", exc.code, str(exc)) from exc

    def delete(self, name: str) -> bool:
        """Delete the link; False if there was none."""
        with self.session() as ipr:
            state = self.get(name, ipr)
            if state is None:
                return False
            try:
                ipr.link("del", index=state.index)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return False
                raise NetlinkRequestError(name, "link del", exc.code, str(exc)) from exc
            return True
