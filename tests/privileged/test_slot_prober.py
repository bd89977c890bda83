"""The node's slot prober on real sockets: echoes make a slot healthy, silence makes it
unhealthy, and a busy slot whose echoes come late stays healthy while traffic arrives
(late echoes are such traffic too: the holder is alive).

Two throwaway namespaces joined by a veth: "node" holds the slot interface (named as a
node's slot tunnel, `mge` + 8 hex digits) and runs the real `SlotProber` in a process of
its own (so /proc/thread-self/net/dev is the node's); "gateway" holds the slot's egress
IP and runs an echo responder whose delay the test sets, and a sender that plays the
slot's traffic (packets arriving on the node's slot interface). The node is a gateway
node as well: an uplink on the egress IP's subnet and another slot's egress IP of its
own, so the probe must leave by the slot interface it is bound to, whatever the main
table says.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from meshgress.slots import PROBE_PORT
from tests.privileged.conftest import NETNS_DIR, require_root, run, spawn, stop

REPO = Path(__file__).resolve().parents[2]
SLOT_INTERFACE = "mge00c0ffee"
PROBE_SOURCE = "198.18.5.0"
EGRESS_IP = "192.0.2.77"
"""The probed slot's egress IP, up on the gateway."""

PROBER = """
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[1])
from meshgress.slots import SlotId
from nodeagent.prober import SlotProber
from nodeagent.steering import ProbeTarget
out = open(sys.argv[2], "a", buffering=1)
prober = SlotProber(sys.argv[3], lambda: None).start()
prober.set_targets((ProbeTarget(SlotId("g", 0), sys.argv[4], ipaddress.IPv4Address(sys.argv[5]),
                                100, 80, 3),))
while True:
    out.write(json.dumps({"t": time.time(), "healthy": bool(prober.healthy())}) + "\\n")
    time.sleep(0.05)
"""

RESPONDER = """
import socket, sys, threading, time
control = sys.argv[1]
def settings():
    try:
        delay, traffic = open(control).read().split()
        return float(delay), traffic == "on"
    except (OSError, ValueError):
        return 0.0, False
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
echo.bind((sys.argv[2], int(sys.argv[3])))
def traffic():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    while True:
        if settings()[1]:
            s.sendto(b"x" * 200, (sys.argv[4], 9))
        time.sleep(0.005)
threading.Thread(target=traffic, daemon=True).start()
while True:
    data, peer = echo.recvfrom(64)
    delay = settings()[0]
    if delay < 0:
        continue  # silent: the holder is gone
    if delay:
        threading.Timer(delay, echo.sendto, (data, peer)).start()
    else:
        echo.sendto(data, peer)
"""


def _slot_link(node: str, gateway: str) -> None:
    """The node's slot interface and, on the gateway's side, the slot's egress IP."""
    run(["ip", "-n", node, "link", "add", SLOT_INTERFACE, "type", "veth", "peer", "name",
         "probe0", "netns", gateway])
    run(["ip", "-n", node, "addr", "add", f"{PROBE_SOURCE}/32", "dev", SLOT_INTERFACE])
    run(["ip", "-n", node, "link", "set", SLOT_INTERFACE, "up"])
    run(["ip", "-n", gateway, "addr", "add", f"{EGRESS_IP}/32", "dev", "probe0"])
    run(["ip", "-n", gateway, "link", "set", "probe0", "up"])
    run(["ip", "-n", gateway, "route", "add", f"{PROBE_SOURCE}/32", "dev", "probe0"])


def _health_after(log: Path, since: float) -> list[bool]:
    samples = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [s["healthy"] for s in samples if s["t"] >= since]


def _wait_for(log: Path, healthy: bool, timeout: float) -> float:
    started = time.time()
    while time.time() - started < timeout:
        if _health_after(log, started)[-1:] == [healthy]:
            return time.time() - started
        time.sleep(0.05)
    raise AssertionError(f"the slot did not become {'healthy' if healthy else 'unhealthy'} "
                         f"within {timeout} s")


def test_echoes_silence_and_a_busy_slot(netns_factory: Callable[[str], str],
                                        tmp_path: Path) -> None:
    require_root()
    node, gateway = netns_factory("node"), netns_factory("gw")
    _slot_link(node, gateway)
    # The node's uplink on the egress IP's subnet, and a slot held on the node itself.
    run(["ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "up1"])
    run(["ip", "-n", node, "addr", "add", "192.0.2.11/24", "dev", "up0"])
    run(["ip", "-n", node, "link", "set", "up0", "up"])
    run(["ip", "-n", node, "addr", "add", "192.0.2.78/32", "dev", "lo"])
    control, log = tmp_path / "control", tmp_path / "health.jsonl"
    control.write_text("0 off")
    log.touch()
    procs = [
        spawn(["nsenter", f"--net={NETNS_DIR / gateway}", sys.executable, "-c", RESPONDER,
               str(control), EGRESS_IP, str(PROBE_PORT), PROBE_SOURCE, gateway]),
        spawn(["nsenter", f"--net={NETNS_DIR / node}", sys.executable, "-c", PROBER,
               str(REPO), str(log), PROBE_SOURCE, SLOT_INTERFACE, EGRESS_IP, node]),
    ]
    try:
        _wait_for(log, True, timeout=10)
        # Busy: every echo comes 300 ms late (past the 80 ms timeout), but the slot's
        # tunnel keeps receiving: the holder is alive, the slot stays healthy.
        control.write_text("0.3 on")
        started = time.time()
        time.sleep(2.0)
        assert all(_health_after(log, started)), "a busy slot was declared unhealthy"
        # Nothing arrives in time (echoes 5 s late, no traffic): unhealthy after three
        # misses in a row.
        control.write_text("5 off")
        assert _wait_for(log, False, timeout=3) < 1.0
        # Traffic alone never revives a slot: only an echo does.
        control.write_text("-1 on")
        started = time.time()
        time.sleep(1.0)
        assert not any(_health_after(log, started))
        control.write_text("0 off")
        assert _wait_for(log, True, timeout=3) < 1.0
        # The holder goes silent: unhealthy within threshold x interval (+ timeout).
        control.write_text("-1 off")
        assert _wait_for(log, False, timeout=3) < 1.0
        # The slot's tunnel is made anew (its wireguard-go restarted): same name, a new
        # interface index, which the old probe socket is not bound to.
        control.write_text("0 off")
        assert _wait_for(log, True, timeout=3) < 1.0
        run(["ip", "-n", node, "link", "del", SLOT_INTERFACE])
        assert _wait_for(log, False, timeout=3) < 1.0
        _slot_link(node, gateway)
        assert _wait_for(log, True, timeout=3) < 1.0
    finally:
        for proc in procs:
            stop(proc)


LOCAL_PROBER = """
import ipaddress, json, sys, time
sys.path.insert(0, sys.argv[1])
from meshgress.slots import SlotId
from nodeagent.prober import SlotProber
from nodeagent.steering import LocalHolder, ProbeTarget
out = open(sys.argv[2], "a", buffering=1)
prober = SlotProber(sys.argv[3], lambda: None).start()
local = LocalHolder(sys.argv[5], ipaddress.IPv4Address(sys.argv[6]))
prober.set_targets((ProbeTarget(SlotId("g", 0), sys.argv[4], local.egress_ip, 100, 80, 3,
                                local),))
while True:
    out.write(json.dumps({"t": time.time(), "healthy": bool(prober.healthy())}) + "\\n")
    time.sleep(0.05)
"""


def test_a_slot_held_on_this_node_is_checked_where_it_lives(
        netns_factory: Callable[[str], str], tmp_path: Path) -> None:
    """On a gateway node, the node's own agent cannot probe a slot held there through the
    tunnel (the egress IP is then its own address: the kernel delivers the probe locally,
    and nothing answers). It is healthy while the gateway's slot interface exists and the
    egress IP is up on the node; unhealthy within the threshold once the IP is gone (the
    gateway stopped renewing), healthy again when it is back."""
    require_root()
    node = netns_factory("gwnode")
    gateway_iface, egress_ip = "mgeg00c0ffee", "192.0.2.77"
    # The node's slot tunnel and the gateway's own slot interface, side by side.
    run(["ip", "-n", node, "link", "add", SLOT_INTERFACE, "type", "veth", "peer", "name",
         gateway_iface])
    for iface in (SLOT_INTERFACE, gateway_iface):
        run(["ip", "-n", node, "link", "set", iface, "up"])
    run(["ip", "-n", node, "addr", "add", f"{PROBE_SOURCE}/32", "dev", SLOT_INTERFACE])
    run(["ip", "-n", node, "addr", "add", f"{egress_ip}/32", "dev", "lo"])
    log = tmp_path / "health.jsonl"
    log.touch()
    proc = spawn(["nsenter", f"--net={NETNS_DIR / node}", sys.executable, "-c", LOCAL_PROBER,
                  str(REPO), str(log), PROBE_SOURCE, SLOT_INTERFACE, gateway_iface, egress_ip])
    try:
        _wait_for(log, True, timeout=10)
        run(["ip", "-n", node, "addr", "del", f"{egress_ip}/32", "dev", "lo"])
        assert _wait_for(log, False, timeout=3) < 1.0
        run(["ip", "-n", node, "addr", "add", f"{egress_ip}/32", "dev", "lo"])
        assert _wait_for(log, True, timeout=3) < 1.0
        run(["ip", "-n", node, "link", "del", gateway_iface])
        assert _wait_for(log, False, timeout=3) < 1.0
    finally:
        stop(proc)
