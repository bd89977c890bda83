"""The exceptions of the wireguard library, in one place so callers can branch on type.

They split the way a control loop needs them to: a *permanent* error (a bad key file, no
WireGuard implementation on the node, a malformed value) is reported and not retried
until something changes; a *temporary* one (a UAPI or netlink call that failed, a
wireguard-go that did not start in time) is logged, counted and retried. The attribute
`WireGuardError.temporary` says which (meshgress's reconcile runtime reads it), so the
library needs nothing of its callers.

Purely declarative: no I/O.
"""

from __future__ import annotations

import errno as _errno
import os


class WireGuardError(Exception):
    """Base class of every error this library raises on purpose."""

    temporary: bool = False


class InvalidKeyError(WireGuardError, ValueError):
    """A string is not a WireGuard key (base64 of exactly 32 bytes)."""


class KeyFileError(WireGuardError):
    """The private key file cannot be used: wrong permissions, owner, type or content.

    Permanent: a person has to look at the file (the message says what to do).
    """


class BackendUnavailableError(WireGuardError):
    """Neither the kernel module nor wireguard-go is available (or the one asked for is not)."""


class NotWireGuardDeviceError(WireGuardError):
    """An interface of that name exists but is not a device this backend can manage."""


class DeviceStartError(WireGuardError):
    """wireguard-go did not come up (exited early, or its UAPI socket never appeared)."""

    temporary = True


class UapiError(WireGuardError):
    """wireguard-go answered a UAPI request with a non-zero errno (or not at all).

    `errno` is the positive errno value (wireguard-go sends it negated, e.g. `errno=-22`);
    branch on it, never on the message. Operations before the failing line of a `set`
    transaction have been applied: the caller re-reads and re-plans (level-triggered).
    """

    temporary = True

    def __init__(self, interface: str, op: str, errno: int, detail: str = "") -> None:
        self.interface = interface
        self.op = op
        self.errno = abs(errno)
        name = _errno.errorcode.get(self.errno, "E?")
        text = f"wireguard-go UAPI {op} on {interface} failed: errno {self.errno} ({name}, " \
               f"{os.strerror(self.errno)})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class NetlinkRequestError(WireGuardError):
    """A kernel WireGuard generic-netlink or rtnetlink request failed (`errno` positive)."""

    temporary = True

    def __init__(self, interface: str, op: str, errno: int, detail: str = "") -> None:
        self.interface = interface
        self.op = op
        self.errno = abs(errno)
        name = _errno.errorcode.get(self.errno, "E?")
        text = f"kernel WireGuard {op} on {interface} failed: errno {self.errno} ({name})"
        if detail:
            text += f": {detail}"
        super().__init__(text)
