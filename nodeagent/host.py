"""Small facts about the node's own network that the agent reads or ensures.

Kept apart so the rest of the agent never opens /proc or netlink for one-off questions:
which interface carries the underlay address and its MTU, and IP forwarding (pods are
routed, so the node must forward). `HostPort` is what the agent needs; `NodeHost` is the
real one, in the network namespace of the calling thread.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Protocol

from meshgress.kernel import sysctl
from meshgress.kernel.rtnl import Rtnl

IP_FORWARD = "net/ipv4/ip_forward"


class HostError(RuntimeError):
    pass


class HostPort(Protocol):
    def underlay_mtu(self, address: str) -> int:
        """The MTU of the interface that holds `address` (the node's InternalIP)."""
        ...

    def ensure_ip_forwarding(self) -> None: ...


class NodeHost:
    """HostPort on the real kernel."""

    def underlay_mtu(self, address: str) -> int:
        wanted = ipaddress.ip_address(address)
        family = socket.AF_INET6 if wanted.version == 6 else socket.AF_INET
        with Rtnl() as rtnl:
            indexes = {a.index for a in rtnl.addresses(family) if a.address == wanted}
            for link in rtnl.links():
                if link.index in indexes:
                    return link.mtu
        raise HostError(f"no interface on this node holds the underlay address {address}")

    def ensure_ip_forwarding(self) -> None:
        sysctl.ensure(IP_FORWARD, "1")
