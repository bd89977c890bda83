"""The link-level side of a WireGuard interface (exists? kind, MTU, up/down, add, delete).

Why it exists: both backends need the same rtnetlink operations around their own
WireGuard configuration channel — the kernel backend to create and delete its
`wireguard` links, the userspace backend to read and set MTU and state of the TUN
device wireguard-go made. One small adapter over pyroute2's IPRoute, optionally bound to
a named network namespace (the netlink socket is opened inside it; the namespace is
never created here).

Side effects: this module is part of the apply layer.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wireguard.errors import NetlinkRequestError

IFF_UP = 0x1


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
