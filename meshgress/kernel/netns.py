"""Entering network namespaces from a thread.

A netlink or nftables socket is bound to the network namespace of the thread that opens
it, and setns(2) moves only the calling thread. So code that must act on another
namespace — a throwaway one, in tests and the lab — opens its sockets in a thread that
entered that namespace, and keeps using them from anywhere. Entering needs
CAP_SYS_ADMIN; a process without it can still be handed such a socket by one that has it
(the CNI plugin does so for the agent) and ask the kernel which namespace it lives in
(`socket_namespace`).

Python 3.11 has no `os.setns`; libc's is called through ctypes (3.12+ uses the
standard one).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C
"""ioctl on a socket: an fd of the network namespace it lives in (Linux 4.9+)."""
NETNS_RUN_DIR = Path("/run/netns")

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace `fd` refers to."""
    native = getattr(os, "setns", None)
    if native is not None:  # Python >= 3.12
        native(fd, nstype)
        return
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def socket_namespace(sock_fd: int) -> int:
    """An open fd of the network namespace the socket `sock_fd` lives in, for the caller
    to close. Needs CAP_NET_ADMIN over that namespace; OSError otherwise."""
    return fcntl.ioctl(sock_fd, SIOCGSKNS)


def namespace_identity(fd: int) -> tuple[int, int]:
    """What tells namespaces apart: the device and inode of an fd referring to one (its
    nsfs inode, also through a bind mount such as /run/netns/NAME)."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def netns_path(netns: str) -> Path:
    """A namespace given as a path, or as a name under /run/netns (as `ip netns` names)."""
    return Path(netns) if "/" in netns else NETNS_RUN_DIR / netns


def enter_network_namespace(netns: str) -> None:
    """Move the calling thread into `netns` for good (a worker thread's initializer)."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def in_network_namespace(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a short-lived thread that entered `netns`, and return its result (or
    raise its exception). The calling thread never changes namespace."""
    box: dict[str, object] = {}

    def enter_and_call() -> None:
        try:
            enter_network_namespace(netns)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=enter_and_call, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
