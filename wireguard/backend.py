"""The one small interface both WireGuard backends implement, and how one is chosen.

Why it exists: the node agent and the gateway must not care whether WireGuard runs in
the kernel or as wireguard-go. They read the device, plan against what they read, and
apply the plan — through `WireGuardBackend`. `detect_backend` picks the kernel module
when the node has it and wireguard-go otherwise (or what the operator asked for).

Contract of every backend:
- `read(name)` returns the device as it is now (None: no such interface), read from the
  kernel or wireguard-go every time, never from memory.
- `stats(name)` returns the per-peer counters (empty when there is no such interface).
- `apply(plan)` creates the link if the plan says so, then sends only what the plan
  contains; an empty plan sends nothing. Errors are WireGuardError subclasses.
- `delete(name)` removes the interface; a missing interface is not an error.
- `kick(name, keys)` makes the device start a handshake with each of those peers now (it
  sends a keepalive, which a peer without a session answers by handshaking), leaving the
  peers' configuration as it was. A handshake is held back for 5 s after the device last
  sent one (WireGuard's rekey timeout), so a kick never doubles one in flight.
- `kind` is "kernel" or "userspace".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from wireguard.errors import BackendUnavailableError
from wireguard.model import Device, PeerStats
from wireguard.plan import DevicePlan, plan_device
from wireguard.userspace import DEFAULT_SOCKET_DIR, UserspaceBackend

KERNEL = "kernel"
USERSPACE = "userspace"


@runtime_checkable
class WireGuardBackend(Protocol):
    @property
    def kind(self) -> str: ...

    def read(self, name: str) -> Device | None: ...

    def stats(self, name: str) -> tuple[PeerStats, ...]: ...

    def apply(self, plan: DevicePlan) -> None: ...

    def delete(self, name: str) -> None: ...

    def kick(self, name: str, keys: Sequence[str]) -> None: ...


def apply_device(backend: WireGuardBackend, desired: Device) -> DevicePlan:
    """Read the device, plan against what was read, apply the plan, return it (to log).

    The one-call reconcile for callers that need nothing in between."""
    plan = plan_device(desired, backend.read(desired.name))
    if not plan.empty:
        backend.apply(plan)
    return plan


def kernel_module_available() -> bool:
    """True if the kernel has WireGuard: loaded or built in (/sys/module/wireguard), or a
    loadable module `modprobe` can find (dry run; nothing is loaded or created)."""
    if Path("/sys/module/wireguard").exists():
        return True
    modprobe = shutil.which("modprobe") or next(
        (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.access(p, os.X_OK)), None)
    if modprobe is None:
        return False
    try:
        result = subprocess.run([modprobe, "-n", "-q", "wireguard"], capture_output=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def userspace_available(wireguard_go: str = "wireguard-go") -> bool:
    """True if the wireguard-go binary can be found."""
    return shutil.which(wireguard_go) is not None


def select_backend_kind(override: str | None, *, kernel: bool, userspace: bool) -> str:
    """Which backend to use, given what the node has. Purely computational.

    `override` None or "auto": the kernel when it has WireGuard, else wireguard-go.
    "kernel"/"userspace": that one, or BackendUnavailableError if the node lacks it."""
    choice = (override or "auto").strip().lower()
    if choice == "auto":
        if kernel:
            return KERNEL
        if userspace:
            return USERSPACE
        raise BackendUnavailableError(
            "no WireGuard implementation on this node: the kernel has no wireguard module "
            "and wireguard-go is not on PATH (install one, e.g. `apt-get install wireguard-go`)"
        )
    if choice == KERNEL:
        if not kernel:
            raise BackendUnavailableError("the kernel WireGuard backend was asked for, but this "
                                          "kernel has no wireguard module")
        return KERNEL
    if choice == USERSPACE:
        if not userspace:
            raise BackendUnavailableError("the userspace WireGuard backend was asked for, but "
                                          "wireguard-go is not on PATH")
        return USERSPACE
    raise BackendUnavailableError(f"unknown WireGuard backend {override!r}: use auto, "
                                  f"{KERNEL} or {USERSPACE}")


def detect_backend(override: str | None = None, *, netns: str | None = None,
                   socket_dir: str | os.PathLike[str] | None = None,
                   wireguard_go: str = "wireguard-go",
                   log_path: str | os.PathLike[str] | None = None,
                   log_level: str | None = None) -> WireGuardBackend:
    """The backend to use on this node (see `select_backend_kind`).

    `netns` makes the backend work on interfaces in that network namespace; `socket_dir`
    (userspace only) is where wireguard-go's UAPI sockets are (default
    /var/run/wireguard); `log_path` and `log_level` (userspace only) where wireguard-go's
    own log goes and its LOG_LEVEL (see `UserspaceBackend`)."""
    choice = (override or "auto").strip().lower()
    kind = select_backend_kind(
        override,
        kernel=choice in ("auto", KERNEL) and kernel_module_available(),
        userspace=choice in ("auto", USERSPACE) and userspace_available(wireguard_go),
    )
    if kind == KERNEL:
        # Imported only when chosen: pyroute2 costs ~0.4 s of start-up, which short-lived
        # commands on a userspace node (`meshgress status`) would pay for nothing.
        from wireguard.kernel import KernelBackend  # noqa: PLC0415 - see above

        return KernelBackend(netns=netns)
    return UserspaceBackend(socket_dir=socket_dir or DEFAULT_SOCKET_DIR, netns=netns,
                            command=(wireguard_go,), log_path=log_path, log_level=log_level)
