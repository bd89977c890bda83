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
