"""The prober thread owns its probe sockets: a slot dropped while a round is using its
socket is closed only after that round, and a round that fails does not end probing."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from meshgress.slots import SlotId
from nodeagent.prober import SlotProber
from nodeagent.steering import ProbeTarget

SLOT = SlotId("egw", 0)
TARGET = ProbeTarget(SLOT, "mge0", ipaddress.IPv4Address("127.0.0.1"), 50, 20, 3)


def udp_socket(_state: object) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def test_a_slot_dropped_during_a_round_keeps_its_socket_until_the_round_is_over():
    prober = SlotProber("127.0.0.1", on_change=lambda: None)  # not started: rounds by hand
    prober._open = udp_socket  # type: ignore[method-assign]
    prober.set_targets((TARGET,))
    with prober._lock:
        states = list(prober._slots.items())  # what a round works on
    state = states[0][1]
    state.sock = udp_socket(state)
    prober.set_targets(())  # the agent's loop drops the slot meanwhile
    assert state.sock.fileno() != -1, "closed under the round that is using it"
    prober._probe_round(states, time.monotonic() + 0.02)
    prober._close_retired()  # the prober thread, before its next round
    assert state.sock is None
    prober.stop()


def test_a_round_that_fails_does_not_end_probing():
    rounds = []
    second = threading.Event()

    class Flaky(SlotProber):
        def _round(self, states, started, view):  # type: ignore[no-untyped-def]
            rounds.append(started)
            if len(rounds) == 1:
                raise ValueError("Invalid file descriptor: -1")
            second.set()

    prober = Flaky("127.0.0.1", on_change=lambda: None)
    prober.set_targets((TARGET,))
    prober.start()
    try:
        assert second.wait(5), "probing stopped after a failed round"
    finally:
        prober.stop()


def test_stop_closes_every_socket():
    prober = SlotProber("127.0.0.1", on_change=lambda: None)
    prober.set_targets((TARGET,))
    with prober._lock:
        state = prober._slots[SLOT]
    sock = state.sock = udp_socket(state)
    prober.stop()
    assert sock.fileno() == -1 and state.sock is None


def test_a_socket_whose_sends_fail_is_replaced_on_the_next_round():
    """A probe socket is bound to its tunnel by interface index; when the tunnel is
    recreated, every send through the old socket fails (ENODEV) for good."""
    opened: list[socket.socket] = []

    class GoneDevice(socket.socket):
        def sendto(self, *args: object) -> int:  # type: ignore[override]
            raise OSError(19, "No such device")

    def open_socket(_state: object) -> socket.socket:
        sock = GoneDevice(socket.AF_INET, socket.SOCK_DGRAM) if not opened \
            else udp_socket(_state)
        sock.setblocking(False)
        opened.append(sock)
        return sock

    prober = SlotProber("127.0.0.1", on_change=lambda: None)  # not started: rounds by hand
    prober._open = open_socket  # type: ignore[method-assign]
    prober.set_targets((TARGET,))
    with prober._lock:
        states = list(prober._slots.items())
    state = states[0][1]
    prober._probe_round(states, time.monotonic() + 0.02)
    assert opened[0].fileno() == -1 and state.sock is None  # closed, not leaked
    sent = state.sent
    prober._probe_round(states, time.monotonic() + 0.02)
    assert len(opened) == 2 and state.sock is opened[1]
    assert state.sent == sent + 1  # the new socket's probe went out
    prober.stop()
