"""Health of every egress slot, probed from this node through the slot's own tunnel.

Failover must be sub-second and must reflect the path this node's packets really take, so
each node measures it itself: every interval it sends one UDP datagram per slot from its
probe address, bound to the slot's tunnel interface, to the gateway's probe responder at
the slot's egress IP, and waits `timeout` for the echo. `failure_threshold` misses in a
row make a slot unhealthy; one answer makes it healthy again.

A round in which the slot's tunnel received anything (its rx packet counter moved: only
the holder's key can produce packets there, so the holder is alive and reachable) counts
as answered even if the echo itself came late: a slot busy with heavy traffic delays its
echoes past the timeout, and taking its flows away then would be a false failover. Traffic
only keeps a healthy slot healthy; only an echo makes a slot healthy.

A slot whose holder runs on this very node (a gateway node's own agent) cannot be probed
through its tunnel: the egress IP is then this node's own, and the kernel delivers the
probe locally. Such a slot is checked where it lives instead: it answers a round when the
gateway's slot interface exists and the slot's egress IP is up on this node — the gateway
keeps that IP up only while it renews the slot's lease, so a gateway that dies or stops
renewing fails this check within the IP's lifetime (about 2 s) rather than at once.

A change pokes the agent's loop, which moves only that slot's buckets. A slot never
answered is not healthy (fail closed).

Runs on its own thread; its only I/O is its sockets, an rtnetlink address dump when a
slot is held on this node, and /proc/thread-self/net/dev. The netlink socket and the proc
file stay open for the thread's life: a round every 100 ms on an idle node is most of an
agent's idle cost, and opening both anew each round doubled what a round costs. With no
slot to probe (none has a holder) the thread sleeps until it is given one.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import IO

from meshgress.kernel.rtnl import Rtnl
from meshgress.slots import FIXED_UDP_PORTS, PROBE_PORT, SlotId
from nodeagent.steering import ProbeTarget

log = logging.getLogger("meshgress.prober")

IPAddress = IPv4Address | IPv6Address

SO_BINDTODEVICE = 25
IP_FREEBIND = 15


@dataclass
class _SlotState:
    target: ProbeTarget
    sock: socket.socket | None = None
    misses: int = 0
    healthy: bool = False
    sent: int = 0
    answered: int = 0
    transitions: int = 0
    failures: int = 0
    """Transitions from healthy to unhealthy: failovers away from the slot."""
    rx_packets: int | None = None


class SlotProber:
    def __init__(self, source: str, on_change: Callable[[], None]) -> None:
        self._source = source
        self._on_change = on_change
        self._lock = threading.Lock()
        self._slots: dict[SlotId, _SlotState] = {}
        self._retired: list[_SlotState] = []
        """Slots no longer probed whose sockets the prober thread has yet to close: a round
        may still be using them (one closed under a round made its selector refuse fd -1,
        which ended the thread)."""
        self._stop = threading.Event()
        self._targets_changed = threading.Event()
        self._seq = 0
        self._token = os.urandom(4)
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def start(self) -> SlotProber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._targets_changed.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        with self._lock:
            self._retired.extend(self._slots.values())
        self._close_retired()

    def set_targets(self, targets: tuple[ProbeTarget, ...]) -> None:
        with self._lock:
            wanted = {t.slot: t for t in targets}
            for slot in list(self._slots):
                if slot not in wanted or self._slots[slot].target != wanted[slot]:
                    self._retired.append(self._slots.pop(slot))
            for slot, target in wanted.items():
                self._slots.setdefault(slot, _SlotState(target))
        self._targets_changed.set()

    def healthy(self) -> frozenset[SlotId]:
        with self._lock:
            return frozenset(s for s, st in self._slots.items() if st.healthy)

    def stats(self) -> dict[SlotId, dict[str, int | bool]]:
        with self._lock:
            return {s: {"healthy": st.healthy, "sent": st.sent, "answered": st.answered,
                        "transitions": st.transitions, "failures": st.failures}
                    for s, st in self._slots.items()}

    def _open(self, state: _SlotState) -> socket.socket | None:
        return open_probe_socket(state.target.interface, self._source)

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        _close_sockets(retired)

    def _run(self) -> None:
        with _NodeView() as view:
            while not self._stop.is_set():
                started = time.monotonic()
                with self._lock:
                    # Under one lock: a slot's new state (a new holder, the same tunnel)
                    # binds the address and port its retired state holds until closed
                    # here, so no round may open the new one first.
                    retired, self._retired = self._retired, []
                    states = list(self._slots.items())
                _close_sockets(retired)  # no round is using them now
                if not states:
                    self._targets_changed.wait()
                    self._targets_changed.clear()
                    continue
                interval = min(s.target.interval_ms for _, s in states) / 1000
                try:
                    self._round(states, started, view)
                except Exception:
                    # A bug in one round must not end probing for good: without it no
                    # slot would ever be healthy again on this node.
                    log.exception("probe round failed")
                self._stop.wait(max(0.0, started + interval - time.monotonic()))

    def _round(self, states: list[tuple[SlotId, _SlotState]], started: float,
               view: _NodeView) -> None:
        timeout = min(s.target.timeout_ms for _, s in states) / 1000
        answered = self._probe_round(states, started + timeout)
        received = view.rx_packets()
        local = [s for _, s in states if s.target.local]
        answered |= served_here([s.target for s in local], received, view.addresses)
        for state in local:
            state.sent += 1
        if self._record_round(states, answered, received):
            self._on_change()

    def _probe_round(self, states: list[tuple[SlotId, _SlotState]],
                     deadline: float) -> set[SlotId]:
        """Send this round's probe through every remote slot's tunnel; the slots whose
        echo came back before `deadline`."""
        self._seq += 1
        payload = self._token + struct.pack("!I", self._seq)
        sel = selectors.DefaultSelector()
        waiting: set[SlotId] = set()
        for slot, state in states:
            if state.target.local is not None:
                continue
            if state.sock is None:
                state.sock = self._open(state)
            if state.sock is None:
                continue
            try:
                state.sock.sendto(payload, (str(state.target.address), PROBE_PORT))
            except OSError as exc:
                # Bound to its interface by index: once the tunnel is recreated (its
                # wireguard-go restarted) every send fails, so open a new one next round.
                log.debug("probe through %s failed (%s): socket reopened next round",
                          state.target.interface, exc)
                state.sock.close()
                state.sock = None
                continue
            state.sent += 1
            sel.register(state.sock, selectors.EVENT_READ, slot)
            waiting.add(slot)
        answered: set[SlotId] = set()
        while waiting - answered and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                assert isinstance(key.fileobj, socket.socket)
                if _drain_for(key.fileobj, payload):
                    answered.add(key.data)
        sel.close()
        return answered

    def _record_round(self, states: list[tuple[SlotId, _SlotState]], answered: set[SlotId],
                      received: dict[str, int]) -> bool:
        """Count the round into every slot's state; True when a slot's health changed."""
        changed = False
        with self._lock:
            for slot, state in states:
                if self._slots.get(slot) is not state:
                    continue
                rx = received.get(state.target.interface)
                traffic = rx is not None and state.rx_packets is not None \
                    and rx > state.rx_packets
                state.rx_packets = rx
                if slot in answered or (traffic and state.healthy):
                    changed |= _answered(slot, state)
                else:
                    changed |= _missed(slot, state)
        return changed


def _close_sockets(states: list[_SlotState]) -> None:
    for state in states:
        if state.sock is not None:
            state.sock.close()
            state.sock = None


def _drain_for(sock: socket.socket, payload: bytes) -> bool:
    """Read what has arrived on a probe socket; True when this round's echo is among it."""
    found = False
    try:
        while True:
            found |= sock.recv(64) == payload
    except OSError:  # BlockingIOError included: nothing more to read
        pass
    return found


def _answered(slot: SlotId, state: _SlotState) -> bool:
    state.answered += 1
    state.misses = 0
    if state.healthy:
        return False
    state.healthy = True
    state.transitions += 1
    log.info("slot %s/%d is healthy", slot.gateway, slot.index)
    return True


def _missed(slot: SlotId, state: _SlotState) -> bool:
    state.misses += 1
    if not state.healthy or state.misses < state.target.failure_threshold:
        return False
    state.healthy = False
    state.transitions += 1
    state.failures += 1
    log.warning("slot %s/%d missed %d probes: unhealthy", slot.gateway, slot.index,
                state.misses)
    return True


class _NodeView:
    """What a round reads of this node, through handles kept open by the calling thread:
    the rx counters (/proc/thread-self/net/dev, re-read from its start) and the IPv4
    addresses (an rtnetlink socket, opened when first needed and again after an error)."""

    def __init__(self) -> None:
        self._dev: IO[bytes] | None = None
        self._rtnl: Rtnl | None = None

    def __enter__(self) -> _NodeView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dev is not None:
            self._dev.close()
        if self._rtnl is not None:
            self._rtnl.close()

    def rx_packets(self) -> dict[str, int]:
        try:
            if self._dev is None:
                self._dev = open("/proc/thread-self/net/dev", "rb", buffering=0)  # noqa: SIM115
            self._dev.seek(0)
            text = self._dev.read(1 << 20)
        except OSError:
            return {}
        return _parse_net_dev(text.decode("ascii", "replace"))

    def addresses(self) -> set[IPAddress]:
        try:
            if self._rtnl is None:
                self._rtnl = Rtnl()
            return {a.address for a in self._rtnl.addresses()}
        except OSError:
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None
            raise


def _addresses_now() -> set[IPAddress]:
    with Rtnl() as rtnl:
        return {a.address for a in rtnl.addresses()}


def served_here(targets: list[ProbeTarget], interfaces: Mapping[str, int],
                addresses: Callable[[], set[IPAddress]] = _addresses_now) -> set[SlotId]:
    """The slots held on this node (`target.local`) whose gateway interface is among
    `interfaces` and whose egress IP is up here (`addresses`: this node's IPv4
    addresses, read only when a slot is held here)."""
    local = [t for t in targets if t.local is not None]
    if not local:
        return set()
    try:
        local_ips = addresses()
    except OSError as exc:
        log.debug("reading this node's addresses: %s", exc)
        return set()
    return {t.slot for t in local if t.local is not None
            and t.local.gateway_interface in interfaces and t.local.egress_ip in local_ips}


def open_probe_socket(interface: str, source: str,
                      port: int | None = PROBE_PORT) -> socket.socket | None:
    """A UDP socket bound to `interface` (so the probe takes the slot's tunnel whatever
    the routing tables say) and to the node's probe address; None when it cannot be made
    (the interface is gone, say).

    The agent's sockets all bind PROBE_PORT (each to its own tunnel, so they never
    conflict). `port=None`, for a one-off look beside a running agent, takes an
    ephemeral port, but never one of FIXED_UDP_PORTS: a socket holding one of those keeps
    an agent or a gateway on this node from binding it.
    """
    if port is not None:
        return _bound_probe_socket(interface, source, port)
    rejected: list[socket.socket] = []
    try:
        for _ in range(16):  # random draws: 16 in a row on the 254 fixed ports do not happen
            sock = _bound_probe_socket(interface, source, 0)
            if sock is None or sock.getsockname()[1] not in FIXED_UDP_PORTS:
                return sock
            rejected.append(sock)  # held until the end, so the next draw differs
        return None
    finally:
        for sock in rejected:
            sock.close()


def _bound_probe_socket(interface: str, source: str, port: int) -> socket.socket | None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        log.debug("probe socket for %s: %s", interface, exc)
        return None
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        sock.bind((source, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.debug("probe socket for %s: %s", interface, exc)
        return None
    return sock


def probe_once(targets: Sequence[ProbeTarget], source: str, *, timeout: float = 0.3,
               attempts: int = 3) -> set[SlotId]:
    """The slots that answer now: one probe per attempt through each remote slot's tunnel
    (an echo within `timeout` answers), and the local check for slots held here. For a
    one-off look (`meshgress status`); the agent's prober keeps its own sockets."""
    answered = served_here(list(targets), _rx_packets())
    remote = [t for t in targets if t.local is None]
    sockets = {t.slot: open_probe_socket(t.interface, source, port=None) for t in remote}
    try:
        for attempt in range(attempts):
            payload = os.urandom(4) + struct.pack("!I", attempt)
            sel = selectors.DefaultSelector()
            for target in remote:
                sock = sockets[target.slot]
                if sock is None or target.slot in answered:
                    continue
                try:
                    sock.sendto(payload, (str(target.address), PROBE_PORT))
                except OSError:
                    continue
                sel.register(sock, selectors.EVENT_READ, target.slot)
            deadline = time.monotonic() + timeout
            while sel.get_map() and time.monotonic() < deadline:
                for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                    assert isinstance(key.fileobj, socket.socket)
                    if _drain_for(key.fileobj, payload):
                        answered.add(key.data)
                        sel.unregister(key.fileobj)
            sel.close()
            if all(t.slot in answered for t in remote):
                break
    finally:
        for sock in sockets.values():
            if sock is not None:
                sock.close()
    return answered


def _rx_packets() -> dict[str, int]:
    """Received packets per interface of the calling thread's network namespace."""
    try:
        with open("/proc/thread-self/net/dev", encoding="ascii") as f:
            return _parse_net_dev(f.read())
    except OSError:
        return {}


def _parse_net_dev(text: str) -> dict[str, int]:
    """/proc/net/dev -> received packets per interface."""
    counters: dict[str, int] = {}
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) > 1:
            counters[name.strip()] = int(values[1])
    return counters
