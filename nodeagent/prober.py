"""Health of every egress slot, probed from this node through the slot's own tunnel.

Failover must be sub-second and must reflect the path this node's packets really take,
so each node measures it itself: every interval it sends one UDP datagram per slot from
its probe address, bound to the slot's tunnel interface, to the gateway's probe
responder, and waits `timeout` for the echo. `failure_threshold` misses in a row make a
slot unhealthy; one answer makes it healthy again.

A round in which the slot's tunnel received anything (its rx packet counter moved: only
the holder's key can produce packets there, so the holder is alive and reachable) counts
as answered even if the echo itself came late: a slot busy with heavy traffic delays its
echoes past the timeout, and taking its flows away then would be a false failover. Traffic
only keeps a healthy slot healthy; only an echo makes a slot healthy.

A change pokes the agent's loop, which moves only that slot's buckets. A slot never
answered is not healthy (fail closed).

Runs on its own thread; its only I/O is its sockets and /proc/thread-self/net/dev. With
no slot to probe (none has a holder) the thread sleeps until it is given one.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshgress.slots import PROBE_ADDRESS, PROBE_PORT, SlotId
from nodeagent.steering import ProbeTarget

log = logging.getLogger("meshgress.prober")

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
        self._thread.join(timeout=5)
        with self._lock:
            for state in self._slots.values():
                if state.sock:
                    state.sock.close()

    def set_targets(self, targets: tuple[ProbeTarget, ...]) -> None:
        with self._lock:
            wanted = {t.slot: t for t in targets}
            for slot in list(self._slots):
                if slot not in wanted or self._slots[slot].target != wanted[slot]:
                    state = self._slots.pop(slot)
                    if state.sock:
                        state.sock.close()
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
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE,
                            state.target.interface.encode())
            sock.bind((self._source, 0))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            log.debug("probe socket for %s: %s", state.target.interface, exc)
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                states = list(self._slots.items())
            if not states:
                self._targets_changed.wait()
                self._targets_changed.clear()
                continue
            interval = min(s.target.interval_ms for _, s in states) / 1000
            timeout = min(s.target.timeout_ms for _, s in states) / 1000
            self._seq += 1
            payload = self._token + struct.pack("!I", self._seq)
            waiting: dict[socket.socket, SlotId] = {}
            for slot, state in states:
                if state.sock is None:
                    state.sock = self._open(state)
                if state.sock is None:
                    continue
                try:
                    state.sock.sendto(payload, (str(PROBE_ADDRESS), PROBE_PORT))
                    state.sent += 1
                    waiting[state.sock] = slot
                except OSError:
                    pass
            answered: set[SlotId] = set()
            deadline = started + timeout
            while waiting and time.monotonic() < deadline:
                try:
                    readable, _, _ = select.select(list(waiting), [], [],
                                                   max(0.0, deadline - time.monotonic()))
                except (OSError, ValueError):
                    break  # set_targets closed a socket: the next round reopens
                for sock in readable:
                    try:
                        while True:
                            if sock.recv(64) == payload:
                                answered.add(waiting[sock])
                    except OSError:  # BlockingIOError: drained
                        pass
                    if waiting[sock] in answered:
                        del waiting[sock]
            received = _rx_packets()
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
                        state.answered += 1
                        state.misses = 0
                        if not state.healthy:
                            state.healthy, changed = True, True
                            state.transitions += 1
                            log.info("slot %s/%d is healthy", slot.gateway, slot.index)
                    else:
                        state.misses += 1
                        if state.healthy and state.misses >= state.target.failure_threshold:
                            state.healthy, changed = False, True
                            state.transitions += 1
                            state.failures += 1
                            log.warning("slot %s/%d missed %d probes: unhealthy",
                                        slot.gateway, slot.index, state.misses)
            if changed:
                self._on_change()
            self._stop.wait(max(0.0, started + interval - time.monotonic()))


def _rx_packets() -> dict[str, int]:
    """Received packets per interface of the calling thread's network namespace."""
    counters: dict[str, int] = {}
    try:
        with open("/proc/thread-self/net/dev", encoding="ascii") as f:
            lines = f.readlines()[2:]
    except OSError:
        return counters
    for line in lines:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) > 1:
            counters[name.strip()] = int(values[1])
    return counters
