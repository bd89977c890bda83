"""The link-level side of a WireGuard interface (exists? kind, MTU, up/down, add, delete).

Why it exists: both backends need the same rtnetlink operations around their own
WireGuard configuration channel — the kernel backend to create and delete its
`wireguard` links, the userspace backend to read and set MTU and state of the TUN
device wireguard-go made. One small adapter over the kernel library's rtnetlink socket
(`meshgress.kernel.rtnl`), in the caller's network namespace or in a named one (the socket
is opened inside it; the namespace is never created here). Each call opens its own
socket: a backend may be used from any thread.

Side effects: this module is part of the apply layer.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.rtnl import NetlinkError, Rtnl
from wireguard.errors import NetlinkRequestError


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

    def _rtnl(self) -> Rtnl:
        return Rtnl(netns=self.netns)

    def get(self, name: str) -> LinkState | None:
        try:
            with self._rtnl() as rtnl:
                link = rtnl.get_link(name)
        except NetlinkError as exc:
            raise NetlinkRequestError(name, "link get", exc.errno or errno.EIO,
                                      exc.strerror or "") from exc
        if link is None:
            return None
        return LinkState(index=link.index, kind=link.kind, mtu=link.mtu, up=link.up)

    def add(self, name: str, kind: str) -> None:
        """Create a link of `kind`; an existing link of that kind counts as success."""
        with self._rtnl() as rtnl:
            try:
                rtnl.request(rt.link_create_message(name, kind))
            except NetlinkError as exc:
                if exc.errno == errno.EEXIST:
                    existing = rtnl.get_link(name)
                    if existing is not None and existing.kind == kind:
                        return
                raise NetlinkRequestError(name, f"link add type {kind}", exc.errno or errno.EIO,
                                          exc.strerror or "") from exc

    def configure(self, name: str, *, mtu: int | None, up: bool | None) -> None:
        """Set MTU and/or administrative state (in one request: the link comes up with
        its MTU already set)."""
        if mtu is None and up is None:
            return
        with self._rtnl() as rtnl:
            link = rtnl.get_link(name)
            if link is None:
                raise NetlinkRequestError(name, "link set", errno.ENODEV, "no such interface")
            try:
                rtnl.request(rt.link_set_message(link.index, up=up, mtu=mtu))
            except NetlinkError as exc:
                raise NetlinkRequestError(name, "link set", exc.errno or errno.EIO,
                                          exc.strerror or "") from exc

    def delete(self, name: str) -> bool:
        """Delete the link; False if there was none."""
        with self._rtnl() as rtnl:
            try:
                return rtnl.delete_link(name)
            except NetlinkError as exc:
                raise NetlinkRequestError(name, "link del", exc.errno or errno.EIO,
                                          exc.strerror or "") from exc
