"""Small facts about the node's own network that the agent reads or ensures.

Kept apart so the rest of the agent never opens /proc or netlink for one-off questions:
which interface carries the underlay address and its MTU, and IP forwarding (pods are
routed, so the node must forward).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pyroute2 import IPRoute

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class HostError(RuntimeError):
    pass


def underlay_mtu(address: str) -> int:
    """The MTU of the interface that holds `address` (the node's InternalIP)."""
    family = 10 if ipaddress.ip_address(address).version == 6 else 2
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=family):
            if msg.get_attr("IFA_ADDRESS") == address or msg.get_attr("IFA_LOCAL") == address:
                link = ipr.get_links(msg["index"])[0]
                return int(link.get_attr("IFLA_MTU"))
    raise HostError(f"no interface on this node holds the underlay address {address}")


def ensure_ip_forwarding() -> None:
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
