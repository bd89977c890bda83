"""When a gateway's own links can no longer carry a slot (`gateway.uplink`): the pure
judgement, and the watcher thread that turns kernel notifications into pokes."""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from gateway.uplink import LinkState, UplinkView, UplinkWatcher, compute_uplink_fault

UP, DOWN, NO_CARRIER = LinkState(True, True), LinkState(False, False), LinkState(True, False)
NODE_IP = ipaddress.IPv4Address("192.0.2.11")


def view(*, eth0: LinkState = UP, eth1: LinkState | None = None,
         defaults: tuple[str, ...] = ("eth0",), node_ip_on: str = "eth0") -> UplinkView:
    links = {"lo": UP, "eth0": eth0} | ({"eth1": eth1} if eth1 is not None else {})
    return UplinkView(links=links, default_routes=defaults,
                      addresses={NODE_IP: node_ip_on,
                                 ipaddress.IPv4Address("127.0.0.1"): "lo"})


@pytest.mark.parametrize(("uplinks", "external", "fault"), [
    (view(), "eth0", None),
    (view(eth0=DOWN, defaults=()), "eth0", "eth0 is down"),
    (view(eth0=NO_CARRIER), "eth0", "eth0 has no carrier"),
    (view(defaults=()), "eth0", "no default route via eth0"),
    (view(eth1=UP, defaults=("eth1",)), "eth0", "no default route via eth0"),
    (view(eth1=UP, defaults=("eth1", "eth0")), "eth0", None),
    (view(), "eth9", "eth9 does not exist"),
    (view(defaults=()), None, "no default route to find the external interface by"),
    # The nodes' tunnels reach this node on eth1: without it the slot is dark too.
    (view(eth1=NO_CARRIER, node_ip_on="eth1"), "eth0",
     "tunnel endpoint 192.0.2.11: eth1 has no carrier"),
    (view(eth1=UP, node_ip_on="eth1"), "eth0", None),
], ids=["healthy", "admin down", "no carrier", "default route lost",
        "default route elsewhere", "a second default route via it", "missing interface",
        "no default route and no interface named", "tunnel endpoint without carrier",
        "tunnel endpoint on another healthy link"])
def test_an_uplink_fault_names_what_is_wrong(uplinks, external, fault):
    assert compute_uplink_fault(uplinks, external, NODE_IP) == fault


def test_an_internal_ip_that_is_not_local_is_no_fault():
    # Behind NAT, or IPv6: the endpoint's link cannot be told, so it is not judged.
    assert compute_uplink_fault(view(), "eth0", ipaddress.IPv4Address("203.0.113.9")) is None
    assert compute_uplink_fault(view(), "eth0", ipaddress.IPv6Address("2001:db8::1")) is None
    assert compute_uplink_fault(view(), "eth0", None) is None


def test_the_default_interface_is_the_preferred_default_route():
    assert view(eth1=UP, defaults=("eth1", "eth0")).default_interface == "eth1"
    assert view(defaults=()).default_interface is None


class ScriptedWatch:
    """Answers `wait` from a script: True (a change), False (nothing), or an exception."""

    def __init__(self, script: list[bool | OSError]) -> None:
        self.script = script
        self.closed = False
        self.interrupted = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if not self.script:
            self.interrupted.wait(0.01 if timeout is None else min(timeout, 0.01))
            return False
        step = self.script.pop(0)
        if isinstance(step, OSError):
            raise step
        return step

    def interrupt(self) -> None:
        self.interrupted.set()

    def close(self) -> None:
        self.closed = True


def test_the_watcher_pokes_on_every_change_and_survives_a_failing_watch():
    watch = ScriptedWatch([False, True, OSError(105, "No buffer space"), True, False, True])
    pokes: list[float] = []
    done = threading.Event()

    def on_change() -> None:
        pokes.append(time.monotonic())
        if len(pokes) == 3:
            done.set()

    watcher = UplinkWatcher(watch, on_change, poll=0.01).start()
    try:
        assert done.wait(5), f"pokes: {len(pokes)}"
    finally:
        watcher.close()
    assert len(pokes) == 3 and watcher.changes == 3
    assert watch.closed
