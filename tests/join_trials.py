"""Two nodes joining each other while their pods are already sending, on real WireGuard.

What it reproduces: both nodes learn of each other at the same instant (as two nodes that
come up together do), each adds the other as a peer, and a pod on each side is already
pinging a pod on the other every 10 ms. Without one-sided handshakes both WireGuard
devices send an initiation at once, each consumes the other's, both answers are
rejected, and nothing flows until the 5 s rekey timeout. A trial measures, per
direction, the time from that instant to the first ping reply.

Each side is driven by the node agent's own `MeshManager` (compute_mesh, the device
plan, the handshake kicks and the routes, including the held-back blackholes), with a
real WireGuard backend given by the caller (wireguard-go here, the kernel module in the
QEMU lane) and the agent's rtnetlink route adapter, each in its own network namespace:

    node A  192.0.2.1 ──veth── 192.0.2.2  node B
      │ proxy ARP, 169.254.1.1 on lo        │
    pod 198.18.1.10                        pod 198.18.2.10

Namespaces are named after the test run (`tests.run_owned`) and removed at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from meshgress.cluster import ENDPOINT_ANNOTATION, PUBLIC_KEY_ANNOTATION, parse_node
from meshgress.config import ClusterConfig
from meshgress.kernel.netns import enter_network_namespace
from nodeagent.managers import MeshManager
from nodeagent.mesh import MeshInputs, compute_mesh, is_initiator
from nodeagent.routes import NetlinkRoutes
from tests.run_owned import owned
from wireguard.backend import WireGuardBackend
from wireguard.keys import generate_private_key, public_key

CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("198.19.0.0/16"),))
INTERFACE = "meshgress0"
REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Side:
    name: str
    node_ns: str
    pod_ns: str
    underlay: str
    pod_cidr: str
    pod_ip: str


@dataclass(frozen=True)
class TrialResult:
    initiator: str
    """Which side's key made it the initiator."""
    waits: dict[str, float]
    """Side name → seconds from the join to its pod's first reply (inf: none)."""
    after_configured: dict[str, float]
    """The same, counted from when both sides had finished configuring (their passes
    done, nothing pending): what is left once the time to configure is taken out — under
    software emulation the configuring itself is slow, a stall is still 5 s or more."""


@contextlib.contextmanager
def two_nodes(prefix: str) -> Iterator[tuple[Side, Side]]:
    """The topology above; everything removed afterwards."""
    tag = f"{owned(prefix)}{secrets.token_hex(2)}"
    sides = (Side("a", f"{tag}-na", f"{tag}-pa", "192.0.2.1", "198.18.1.0/24", "198.18.1.10"),
             Side("b", f"{tag}-nb", f"{tag}-pb", "192.0.2.2", "198.18.2.0/24", "198.18.2.10"))
    made: list[str] = []
    try:
        for side in sides:
            for ns in (side.node_ns, side.pod_ns):
                sh("ip", "netns", "add", ns)
                made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b = sides
        sh("ip", "-n", a.node_ns, "link", "add", "u0", "type", "veth", "peer", "name", "u0",
           "netns", b.node_ns)
        for side in sides:
            _wire(side)
        yield a, b
    finally:
        for ns in reversed(made):
            sh("ip", "netns", "delete", ns, check=False)


def _wire(side: Side) -> None:
    node, pod = side.node_ns, side.pod_ns
    sh("ip", "-n", node, "addr", "add", f"{side.underlay}/24", "dev", "u0")
    sh("ip", "-n", node, "link", "set", "u0", "up")
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", node, "link", "add", "pod0", "type", "veth", "peer", "name", "eth0",
       "netns", pod)
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.conf.pod0.proxy_arp=1")
    # The pods' gateway is the node's own (as the CNI plugin sets it up), so the node
    # answers the pod's ARP for it.
    sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", "lo", "scope", "host")
    sh("ip", "-n", node, "link", "set", "pod0", "up")
    sh("ip", "-n", node, "route", "add", f"{side.pod_ip}/32", "dev", "pod0")
    sh("ip", "-n", pod, "addr", "add", f"{side.pod_ip}/32", "dev", "eth0")
    sh("ip", "-n", pod, "link", "set", "eth0", "up")
    sh("ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")


def _node(side: Side, key: str) -> Any:
    return parse_node({
        "metadata": {"name": side.name, "annotations": {
            PUBLIC_KEY_ANNOTATION: key, ENDPOINT_ANNOTATION: f"{side.underlay}:51820"}},
        "spec": {"podCIDRs": [side.pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": side.underlay}]}})


class _Pinger:
    """`ping -D` from a pod every 10 ms; notes the first reply's wall-clock time."""

    def __init__(self, side: Side, target: str) -> None:
        self.first_reply: float | None = None
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", side.pod_ns, "ping", "-D", "-n", "-i", "0.01", "-W", "1",
             target], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            match = REPLY.match(line)
            if match and self.first_reply is None:
                self.first_reply = float(match.group(1))

    def stop(self) -> None:
        # SIGINT, not SIGTERM: ping then flushes what it printed into the pipe (its output
        # is block-buffered there) and exits.
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._thread.join(5)


def run_trial(a: Side, b: Side, backend_for: Callable[[], WireGuardBackend], *,
              settle: float = 3.0) -> TrialResult:
    """One join: fresh keys (so either side may be the initiator), fresh devices, pods
    pinging from before the join; both sides configure at the same instant.

    Each side runs in a thread that has entered its node's network namespace, so the
    backend (`backend_for()`, called there), the route adapter and wireguard-go (started
    from that thread) all act there."""
    keys = {side.name: generate_private_key() for side in (a, b)}
    nodes = (_node(a, public_key(keys["a"])), _node(b, public_key(keys["b"])))
    pingers = {"a": _Pinger(a, b.pod_ip), "b": _Pinger(b, a.pod_ip)}
    barrier = threading.Barrier(2)
    measured = threading.Event()
    joined: dict[str, float] = {}
    settled: dict[str, float] = {}
    errors: list[BaseException] = []

    def join(side: Side) -> None:
        try:
            enter_network_namespace(side.node_ns)
            backend = backend_for()
            routes = NetlinkRoutes(INTERFACE)
        except BaseException as exc:  # handed to the test below
            errors.append(exc)
            barrier.abort()
            return
        try:
            manager = MeshManager(backend, routes, resync_interval=60,
                                  own_public_key=public_key(keys[side.name]))
            mesh = compute_mesh(MeshInputs(self_name=side.name, nodes=nodes,
                                           private_key=keys[side.name], mtu=1420,
                                           cluster=CLUSTER, interface=INTERFACE))
            barrier.wait(30)
            joined[side.name] = time.time()
            deadline = time.monotonic() + settle
            while True:
                manager.apply_device(mesh.device)
                manager.kick_handshakes(INTERFACE)
                manager.apply_routes(manager.routes(mesh))
                if not manager.pending or time.monotonic() > deadline:
                    break
                time.sleep(max(0.0, manager.resync_in()))
            settled[side.name] = time.time()
            measured.wait(settle + 30)
        except BaseException as exc:  # handed to the test below
            errors.append(exc)
        finally:
            with contextlib.suppress(Exception):
                backend.delete(INTERFACE)
            routes.close()

    threads = [threading.Thread(target=join, args=(side,)) for side in (a, b)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 2 * settle + 30  # configuring may be slow (TCG)
        while time.monotonic() < deadline and not errors:
            if len(settled) == 2:
                replied = all(p.first_reply is not None for p in pingers.values())
                if replied or time.time() > max(settled.values()) + settle:
                    break
            time.sleep(0.02)
    finally:
        for pinger in pingers.values():
            pinger.stop()
        measured.set()
        for thread in threads:
            thread.join(60)
    if errors:
        raise errors[0]
    start, configured = min(joined.values()), max(settled.values())
    initiator = "a" if is_initiator(public_key(keys["a"]), public_key(keys["b"])) else "b"
    return TrialResult(
        initiator,
        {name: (p.first_reply - start) if p.first_reply is not None else float("inf")
         for name, p in pingers.items()},
        {name: max(0.0, p.first_reply - configured) if p.first_reply is not None
         else float("inf") for name, p in pingers.items()})
