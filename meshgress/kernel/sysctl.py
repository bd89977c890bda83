"""Kernel settings under /proc/sys: read them, and set them only when they differ.

One way for every sysctl meshgress touches. Global ones (`net/ipv4/ip_forward`,
`net/ipv4/conf/all/rp_filter`) are files under /proc/sys, which shows the network
namespace of the process reading it. Per-interface IPv4 settings are *written* over
rtnetlink instead (`rtnetlink.set_ipv4_conf_message`, batchable with the requests that
create the interface, and bound to the socket's namespace) and read back here.
"""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")


def read(key: str, root: Path = PROC_SYS) -> str | None:
    """The value of `key` (a path under /proc/sys, e.g. "net/ipv4/ip_forward"), or None
    when it does not exist or cannot be read."""
    try:
        return (root / key).read_text().strip()
    except OSError:
        return None


def ensure(key: str, value: str, root: Path = PROC_SYS) -> bool:
    """Set `key` to `value` unless it already has it; True when it was written."""
    path = root / key
    if path.read_text().strip() == value:
        return False
    path.write_text(value + "\n")
    return True


def interface_key(section: str, interface: str, name: str) -> str:
    """The key of a per-interface setting: ("ipv4/conf", "eth0", "rp_filter") ->
    "net/ipv4/conf/eth0/rp_filter"."""
    return f"net/{section}/{interface}/{name}"
