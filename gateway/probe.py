"""The health-probe responder: echo every datagram nodes send to a held slot.

Nodes probe each slot through its tunnel at sub-second intervals (meshgress.slots): a UDP
datagram from their probe address to the slot's egress IP at PROBE_PORT. The holder
answers with the same payload, so a node learns that the tunnel, the holder's WireGuard
peer for it, the holder's process and the egress IP all work. One socket per held slot
interface, bound to the slot's egress IP and to that interface (SO_BINDTODEVICE): probes
arriving any other way (from the outside, on the external interface) find no socket.
The socket binds with IP_FREEBIND, so it can open before the IP is up (and stays open
while the IP lapses): it answers exactly while the kernel has the IP. A reply must leave
back through the same tunnel: the socket also carries the slot's mark (SO_MARK), so the
slot's `ip rule fwmark` routes it by `default dev <slot interface>` like every other
reply of the slot — whatever the main table says about the node's pod CIDR (on a
gateway node the agent routes it via the mesh, or has it unreachable).

Only held slots answer: a slot interface kept after its lease was lost has no socket, so
probes through it fail and nodes stop using it.

One daemon thread serves every socket; `ensure` (called by the control loop) opens and
closes sockets to match the held slot interfaces, and reopens a socket whose interface was
recreated (a socket stays bound to the old interface index) or whose mark changed. The
thread sleeps in select(2) with no timeout: a probe, or a pipe that `ensure` and `close`
write to when the set of sockets changed, wakes it (a gateway with no probes coming in
never wakes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from meshgress.slots import PROBE_PORT

log = logging.getLogger("meshgress.gateway.probe")

MAX_DATAGRAM = 2048
IP_FREEBIND = 15


@dataclass(frozen=True)
class ProbeSocket:
    """What one slot's responder socket is bound to; a change reopens the socket."""

    ifindex: int
    """The slot interface's current index (a socket stays bound to the old one when the
    interface is recreated)."""
    mark: int
    address: ipaddress.IPv4Address
    """The slot's egress IP."""


class ProbeResponder:
    def __init__(self, port: int = PROBE_PORT) -> None:
        self.port = port
        self._sockets: dict[str, tuple[ProbeSocket, socket.socket]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._retired: list[socket.socket] = []
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.answered = 0
        self._thread = threading.Thread(target=self._serve, name="probe", daemon=True)
        self._thread.start()

    def interfaces(self) -> dict[str, ProbeSocket]:
        with self._lock:
            return {name: key for name, (key, _) in self._sockets.items()}

    def ensure(self, wanted: Mapping[str, ProbeSocket]) -> None:
        """Serve exactly the interfaces in `wanted` (slot interface name → its socket's
        binding). Raises OSError for a socket that cannot be opened (the others are still
        served)."""
        failures: list[str] = []
        changed = False
        with self._lock:
            for name in list(self._sockets):
                key, sock = self._sockets[name]
                if wanted.get(name) != key:
                    # Closed by the serving thread once it has left select (a socket
                    # closed under select(2) would leave it waiting on a dead descriptor).
                    self._retired.append(sock)
                    del self._sockets[name]
                    changed = True
            for name, key in sorted(wanted.items()):
                if name in self._sockets:
                    continue
                try:
                    self._sockets[name] = (key, self._open(name, key))
                    changed = True
                except OSError as exc:
                    failures.append(f"{name}: {exc}")
        if changed:
            self._wake()
        if failures:
            raise OSError(f"probe responder: {'; '.join(failures)}")

    def _open(self, interface: str, binding: ProbeSocket) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            if binding.mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, binding.mark)
            sock.bind((str(binding.address), self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self._wake_write, b"x")

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks = {sock.fileno(): sock for _, sock in self._sockets.values()}
                for sock in self._retired:
                    sock.close()
                self._retired.clear()
            try:
                readable, _, _ = select.select([self._wake_read, *socks], [], [])
            except (OSError, ValueError):
                continue  # a socket was closed under us; take a new snapshot
            if self._wake_read in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 4096)
                continue  # the sockets changed: take a new snapshot
            for fd in readable:
                sock = socks[fd]
                for _ in range(64):
                    try:
                        data, peer = sock.recvfrom(MAX_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    with contextlib.suppress(OSError):
                        sock.sendto(data, peer)
                        self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=2)
        with self._lock:
            for _, sock in self._sockets.values():
                sock.close()
            self._sockets.clear()
            for sock in self._retired:
                sock.close()
            self._retired.clear()
        os.close(self._wake_read)
        os.close(self._wake_write)
