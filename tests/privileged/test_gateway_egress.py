"""The egress gateway process on real kernels, in throwaway network namespaces.

Topology (every namespace is `mgt-gw-<pid of this run>-<role>`; underlay 192.0.2.0/24 on a
bridge in its own namespace):

    node1  eth0 192.0.2.1    hand-made slot tunnel `mgn0` (wireguard-go): peer = the
                             slot's holder as published on its Lease, allowed-ips 0/0;
                             "pods" as local addresses on lo: 198.18.1.10 (selected),
                             198.18.1.20 (not selected), probe source 198.18.1.0;
                             `ip rule from 198.18.1.0/24 lookup 100` → default dev mgn0
    gw1    eth0 192.0.2.11   a real `python -m gateway.process`, in a private mount
    gw2    eth0 192.0.2.12   namespace (its own /var/run/wireguard), default route via
                             the outside host (the external interface is found by it)
    out    eth0 192.0.2.100  the outside: a UDP echo server recording the source it sees

Egress IPs 192.0.2.50 and .51. node2 exists only as a Node object (one more peer).

The gateway namespaces run no node agent, but have what it would leave there: ip_forward
on, its `inet meshgress` table (leak guard, masquerade) and its routes (the cluster pod
range unreachable, node1's pod CIDR routed), which the gateway must work alongside and
never touch.

Safety: nothing touches the host's network namespace; every command runs under
`nsenter --net=` / `ip -n`; the test process itself never enters a namespace (sockets
inside them are made by short-lived threads). Every process is started here and stopped by
its PID; every namespace, link and folder is removed afterwards, also on failure, and
leftovers of crashed runs (their run's PID is gone) are removed first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
)
from meshgress.datastore import LEASE_NAMESPACE, Kind
from meshgress.datastore.file import FileDatastore
from meshgress.kernel.nft_model import ruleset_commands
from meshgress.lab.netns import pid_alive
from meshgress.slots import LEASE_DURATION_SECONDS, PROBE_PORT, SlotId, gateway_port
from nodeagent.firewall import FirewallSpec, compute_ruleset
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Device, Peer
from wireguard.plan import plan_device
from wireguard.userspace import UserspaceBackend, private_socket_dir_command

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

PREFIX = "mgt-gw-"
RUN = f"{PREFIX}{os.getpid()}-"
LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")
TMP = Path(tempfile.gettempdir())
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

OUTSIDE = "192.0.2.100"
ECHO_PORT = 7000
EGRESS_IPS = ("192.0.2.50", "192.0.2.51")
GATEWAYS = {"gw1": "192.0.2.11", "gw2": "192.0.2.12"}
NODE1 = "192.0.2.1"
POD_OK = "198.18.1.10"
POD_DENIED = "198.18.1.20"
PROBE_SOURCE = "198.18.1.0"
SLOT0 = SlotId("egw", 0)
SLOT1 = SlotId("egw", 1)

GATEWAY_SCRIPT = (
    'set -e; [ -d /var/run/wireguard ] || { mount -t tmpfs -o mode=0755 mgt-gw /var/run; '
    'mkdir -m 0755 /var/run/wireguard; }; mount --bind "$1" /var/run/wireguard; shift; '
    'exec "$@"'
)
"""Runs the gateway in a private mount namespace whose /var/run/wireguard is the folder
given, as a lab node's mount namespace does."""


# --- helpers ------------------------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, timeout: float = 30,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: exit {proc.returncode}: {proc.stderr or proc.stdout}")
    return proc


def nsexec(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert ns.startswith(PREFIX)
    return run(["nsenter", f"--net={NETNS_DIR / ns}", *argv], check=check)


def ip(ns: str, *argv: str, check: bool = True) -> str:
    assert ns.startswith(PREFIX)
    return run(["ip", "-n", ns, *argv], check=check).stdout


def ip_json(ns: str, *argv: str) -> Any:
    out = ip(ns, "-j", *argv)
    return json.loads(out) if out.strip() else []


def remove_links(ns: str) -> None:
    """Delete the namespace's links (a wireguard-go exits when its TUN goes away)."""
    listing = run(["ip", "-n", ns, "-o", "link", "show"], check=False).stdout
    for line in listing.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            run(["ip", "-n", ns, "link", "del", name], check=False)


def remove_netns(ns: str) -> None:
    remove_links(ns)
    run(["ip", "netns", "del", ns], check=False)


def netns_names() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(NETNS_DIR))
    return []


def wait_until(what: str, check: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def socket_in_netns(ns: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket created inside a namespace by a short-lived thread that entered it."""
    box: dict[str, Any] = {}

    def enter() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(socket.AF_INET, kind)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


def _pdeathsig() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EchoServer:
    """UDP echo on the outside host; records the source address of every datagram."""

    def __init__(self, ns: str) -> None:
        self.sock = socket_in_netns(ns)
        self.sock.bind((OUTSIDE, ECHO_PORT))
        self.sock.settimeout(0.2)
        self.seen: list[tuple[str, int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, (host, port) = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((host, port, data))
            with contextlib.suppress(OSError):
                self.sock.sendto(data, (host, port))

    def sources(self, payload: bytes) -> list[str]:
        return [host for host, _, data in self.seen if data == payload]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def udp_exchange(ns: str, source: str, destination: tuple[str, int], payload: bytes,
                 *, timeout: float = 1.0, attempts: int = 5) -> bytes | None:
    """Send from `source` inside `ns` and return the first answer (None: no answer)."""
    sock = socket_in_netns(ns)
    try:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        for _ in range(attempts):
            sock.sendto(payload, destination)
            try:
                data, _ = sock.recvfrom(2048)
                return data
            except TimeoutError:
                continue
        return None
    finally:
        sock.close()


# --- the world ----------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    node: str
    ns: str
    proc: subprocess.Popen[bytes]
    log: Path
    flow_log: Path

    @property
    def identity(self) -> str:
        return f"{self.node}/{self.proc.pid}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def children(self, comm: str) -> list[int]:
        """PIDs of this gateway's child processes named `comm`."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        found = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    found.append(pid)
        return found


@dataclass
class World:
    root: Path
    store: FileDatastore
    ns: dict[str, str]
    node_key: str
    node_backend: UserspaceBackend
    echo: EchoServer
    cluster_config: Path
    processes: list[GatewayProcess] = field(default_factory=list)

    # -- gateways

    def start_gateway(self, node: str, *extra: str) -> GatewayProcess:
        ns = self.ns[node]
        folder = self.root / f"{node}-{len(self.processes)}"
        folder.mkdir(parents=True)
        # One socket folder per node, shared by successive gateway processes there (as a
        # lab node's mount namespace is), so a restart finds the wireguard-go it left.
        sockets = self.root / f"{node}-wg"
        sockets.mkdir(exist_ok=True)
        log = folder / "gateway.log"
        flow_log = folder / "flows.jsonl"
        argv = ["nsenter", f"--net={NETNS_DIR / ns}", "unshare", "--mount", "--propagation",
                "slave", "sh", "-c", GATEWAY_SCRIPT, "mgt-gw", str(sockets),
                sys.executable, "-m", "meshgress.cli", "gateway", "--node", node,
                "--datastore", str(self.root / "store"),
                "--cluster-config", str(self.cluster_config),
                "--state-dir", str(self.root / f"{node}-state"),
                "--metrics-address", "127.0.0.1:9821", "--flow-log", str(flow_log),
                "--log-level", "INFO", *extra]
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    preexec_fn=_pdeathsig)
        gw = GatewayProcess(node, ns, proc, log, flow_log)
        self.processes.append(gw)
        return gw

    def kill(self, gw: GatewayProcess, sig: int = signal.SIGKILL) -> None:
        if gw.proc.poll() is None:
            gw.proc.send_signal(sig)

    def stop_all(self) -> None:
        for gw in self.processes:
            if gw.proc.poll() is None:
                gw.proc.send_signal(signal.SIGTERM)
        for gw in self.processes:
            try:
                gw.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
                gw.proc.wait(timeout=5)

    # -- observations

    def lease(self, slot: SlotId) -> tuple[str | None, dict[str, str]]:
        """(holder or None when free/expired, annotations) of a slot's lease."""
        lease = self.store.get_lease(slot.lease_name)
        if lease is None:
            return None, {}
        obj = self.store.get(Kind.LEASE, slot.lease_name, LEASE_NAMESPACE)
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return (None if lease.expired(time.time()) else lease.holder), annotations

    def egress_ips_on(self, node: str) -> set[str]:
        found = set()
        for link in ip_json(self.ns[node], "-4", "addr", "show", "dev", "eth0"):
            for info in link.get("addr_info", []):
                if info.get("local") in EGRESS_IPS:
                    found.add(info["local"])
        return found

    def mac(self, node: str) -> str:
        return ip_json(self.ns[node], "link", "show", "dev", "eth0")[0]["address"]

    def neighbour(self, address: str) -> str | None:
        entries = ip_json(self.ns["out"], "neigh", "show", address)
        return entries[0].get("lladdr") if entries else None

    def counters(self, node: str) -> dict[str, tuple[int, int]]:
        proc = nsexec(self.ns[node], "nft", "-j", "list", "counters", "table", "inet",
                      "meshgress-gw", check=False)
        if proc.returncode != 0:
            return {}
        out = {}
        for item in json.loads(proc.stdout).get("nftables", []):
            if "counter" in item:
                c = item["counter"]
                out[c["name"]] = (c["packets"], c["bytes"])
        return out

    def diagnose(self) -> str:
        """The kernel state of every gateway and of the node, for a failing test."""
        out = []
        for role in ("gw1", "gw2", "node1"):
            ns = self.ns[role]
            for argv in (["ip", "-4", "addr"], ["ip", "rule"], ["ip", "route", "show", "table",
                                                               "all"],
                         ["nft", "list", "ruleset"], ["conntrack", "-L"]):
                proc = nsexec(ns, *argv, check=False)
                out.append(f"## {role}: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        with contextlib.suppress(Exception):
            out.append(f"## node1 mgn0: {self.node_backend.read('mgn0')} "
                       f"{self.node_backend.stats('mgn0')}")
        return "\n".join(out)

    # -- the node side

    def point_node_at(self, slot: SlotId) -> None:
        """Configure node1's slot tunnel from what the holder published on the Lease.

        As a node agent must on every change of holder, the peer is removed and added
        again even when key and endpoint are unchanged: a new holder process (or the same
        key on a fresh wireguard-go) knows nothing of the old session, so keeping it
        would blackhole traffic until WireGuard's own rekey timeout (~15 s)."""
        _, annotations = self.lease(slot)
        peer = Peer(annotations[PUBLIC_KEY_ANNOTATION],
                    endpoint=annotations[ENDPOINT_ANNOTATION], allowed_ips=["0.0.0.0/0"])
        for peers in ((), (peer,)):
            desired = Device("mgn0", private_key=self.node_key, listen_port=51820,
                             peers=peers)
            self.node_backend.apply(plan_device(desired, self.node_backend.read("mgn0")))
        ip(self.ns["node1"], "route", "replace", "default", "dev", "mgn0", "table", "100")


def _remove_leftovers_of_crashed_runs() -> None:
    for ns in netns_names():
        match = LEFTOVER.match(ns)
        if match and not pid_alive(int(match.group(1))):
            remove_netns(ns)
    for path in TMP.glob(f"{PREFIX}*"):
        match = LEFTOVER.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _node_object(name: str, address: str, *, cidr: str | None = None, key: str | None = None,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if key:
        meta["annotations"] = {PUBLIC_KEY_ANNOTATION: key,
                               ENDPOINT_ANNOTATION: f"{address}:51820"}
    spec = {"podCIDRs": [cidr]} if cidr else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def egress_gateway(ips: tuple[str, ...]) -> dict[str, Any]:
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": "egw"}, "spec": {"egressIPs": list(ips)}}


@pytest.fixture(scope="module")
def world(have_tool: Callable[[str], None]) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it creates network namespaces)")
    for tool in ("ip", "nsenter", "unshare", "nft", "wireguard-go", "conntrack", "ping"):
        have_tool(tool)
    _remove_leftovers_of_crashed_runs()
    root = Path(tempfile.mkdtemp(prefix=RUN, dir=TMP))
    names = {role: f"{RUN}{role}" for role in ("sw", "node1", "gw1", "gw2", "out")}
    made: list[str] = []
    echo: EchoServer | None = None
    backend: UserspaceBackend | None = None
    world: World | None = None
    try:
        for ns in names.values():
            run(["ip", "netns", "add", ns])
            made.append(ns)
            ip(ns, "link", "set", "lo", "up")
        sw = names["sw"]
        ip(sw, "link", "add", "br0", "type", "bridge")
        ip(sw, "link", "set", "br0", "up")
        hosts = {"node1": NODE1, "gw1": GATEWAYS["gw1"], "gw2": GATEWAYS["gw2"],
                 "out": OUTSIDE}
        for role, address in hosts.items():
            port = f"p-{role}"
            ip(sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
               names[role])
            ip(sw, "link", "set", port, "master", "br0", "up")
            ip(names[role], "addr", "add", f"{address}/24", "dev", "eth0")
            ip(names[role], "link", "set", "eth0", "up")
        agent_table = json.dumps({"nftables": ruleset_commands(compute_ruleset(FirewallSpec(
            cluster_pod_cidrs=(ipaddress.IPv4Network("198.18.0.0/16"),),
            service_cidrs=(ipaddress.IPv4Network("10.96.0.0/12"),))))})
        for gw in ("gw1", "gw2"):
            ip(names[gw], "route", "add", "default", "via", OUTSIDE)
            # What the node agent of a gateway node has: forwarding on, and its own table
            # (leak guard and masquerade), which the gateway must work with, untouched.
            nsexec(names[gw], "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # ... and its routes: node1's pod CIDR through the mesh (here: via node1), the
            # rest of the cluster pod range unreachable (fail closed).
            ip(names[gw], "route", "add", "unreachable", "198.18.0.0/16", "proto", "109")
            ip(names[gw], "route", "add", "198.18.1.0/24", "via", NODE1, "proto", "109")
            run(["nsenter", f"--net={NETNS_DIR / names[gw]}", "nft", "-j", "-f", "-"],
                input_text=agent_table)
        node = names["node1"]
        for address in (POD_OK, POD_DENIED, PROBE_SOURCE):
            ip(node, "addr", "add", f"{address}/32", "dev", "lo")
        ip(node, "rule", "add", "from", "198.18.1.0/24", "lookup", "100", "priority", "100")
        sockets = root / "node1-wg"
        sockets.mkdir()
        backend = UserspaceBackend(sockets, netns=node,
                                   command=private_socket_dir_command(sockets))
        echo = EchoServer(names["out"])

        store = FileDatastore(root / "store")
        node_key = generate_private_key()
        cluster_config = root / "cluster.yaml"
        cluster_config.write_text(yaml.safe_dump(
            {"clusterPodCIDRs": ["198.18.0.0/16"], "serviceCIDRs": ["10.96.0.0/12"]}))
        objects: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "ns-a", "labels": {"team": "a"}}},
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "ns-b", "labels": {"team": "b"}}},
            _node_object("node1", NODE1, cidr="198.18.1.0/24", key=public_key(node_key)),
            _node_object("node2", "192.0.2.2", cidr="198.18.2.0/24",
                         key=public_key(generate_private_key())),
            *(_node_object(gw, address, labels={"meshgress.io/gateway": "true"})
              for gw, address in GATEWAYS.items()),
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "p1", "namespace": "ns-a", "labels": {"app": "x"}},
             "spec": {"nodeName": "node1"}, "status": {"podIP": POD_OK}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "p2", "namespace": "ns-b", "labels": {"app": "x"}},
             "spec": {"nodeName": "node1"}, "status": {"podIP": POD_DENIED}},
            egress_gateway(EGRESS_IPS[:1]),
            {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
             "metadata": {"name": "team-a"},
             "spec": {"gateway": "egw", "namespaceSelector": {"matchLabels": {"team": "a"}}}},
        ]
        for obj in objects:
            store.create(obj)
        world = World(root, store, names, node_key, backend, echo, cluster_config)
        yield world
    finally:
        if world is not None:
            world.stop_all()
        if echo is not None:
            echo.close()
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.delete("mgn0")
        for ns in made:
            remove_links(ns)  # wireguard-go left by a killed gateway exits with its TUN
        strays: dict[str, list[str]] = {}
        deadline = time.monotonic() + 3
        for ns in made:
            # Anything still running in our namespaces was started by this test (say, a
            # gateway's helper): kill it by PID, and report it.
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    strays.setdefault(ns, []).append(
                        Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(root, ignore_errors=True)
        leftover = [ns for ns in made if ns in netns_names()]
        assert not leftover, f"namespaces left behind: {leftover}"
        assert not strays, f"processes left running in the test's namespaces: {strays}"


def holders(world: World) -> dict[SlotId, str | None]:
    return {slot: world.lease(slot)[0] for slot in (SLOT0, SLOT1)}


# --- one gateway: claim, publish, SNAT, drop, probe, status, drain ----------------------


def test_one_gateway_serves_its_slot(world: World) -> None:
    gw = world.start_gateway("gw1")
    try:
        # (1) the slot is claimed, the IP is up, the lease annotations are published
        def published() -> bool:
            holder, annotations = world.lease(SLOT0)
            return holder == gw.identity and annotations.get(EGRESS_IP_ANNOTATION) == \
                EGRESS_IPS[0]

        wait_until("the slot to be claimed and published", published, timeout=15)
        _, annotations = world.lease(SLOT0)
        assert annotations[HOLDER_NODE_ANNOTATION] == "gw1"
        assert annotations[ENDPOINT_ANNOTATION] == f"{GATEWAYS['gw1']}:{gateway_port(0)}"
        key_file = world.root / "gw1-state" / "private.key"
        assert annotations[PUBLIC_KEY_ANNOTATION] == public_key(key_file.read_text().strip())
        assert os.stat(key_file).st_mode & 0o777 == 0o600
        assert world.egress_ips_on("gw1") == {EGRESS_IPS[0]}
        [addr] = [a for link in ip_json(world.ns["gw1"], "-4", "addr", "show", "dev", "eth0")
                  for a in link["addr_info"] if a["local"] == EGRESS_IPS[0]]
        assert addr["prefixlen"] == 32 and addr["valid_life_time"] <= LEASE_DURATION_SECONDS
        link = ip_json(world.ns["gw1"], "link", "show", "dev", SLOT0.gateway_interface)
        assert link and "UP" in link[0]["flags"]
        rules = ip(world.ns["gw1"], "rule", "show")
        assert "fwmark 0x800000/0xff0000 lookup 52076" in rules
        assert ip(world.ns["gw1"], "route", "show", "table", "52076").startswith(
            f"default dev {SLOT0.gateway_interface}")
        rp = nsexec(world.ns["gw1"], "cat",
                    f"/proc/sys/net/ipv4/conf/{SLOT0.gateway_interface}/rp_filter").stdout
        assert rp.strip() == "2"

        world.point_node_at(SLOT0)

        # (4) the probe (to the egress IP) is answered through the tunnel
        assert udp_exchange(world.ns["node1"], PROBE_SOURCE, (EGRESS_IPS[0], PROBE_PORT),
                            b"probe-1") == b"probe-1"

        # (2) an allowed pod leaves with the egress IP; the reply comes back the same way
        assert udp_exchange(world.ns["node1"], POD_OK, (OUTSIDE, ECHO_PORT),
                            b"allowed") == b"allowed"
        assert set(world.echo.sources(b"allowed")) == {EGRESS_IPS[0]}

        # The node agent's table saw nothing leak: SNAT (priority 90) won over its
        # masquerade (100), and the slot interface is trusted by its guards.
        agent = json.loads(nsexec(world.ns["gw1"], "nft", "-j", "list", "counters", "table",
                                  "inet", "meshgress").stdout)["nftables"]
        assert {c["counter"]["name"]: c["counter"]["packets"] for c in agent
                if "counter" in c} == {"leak_out": 0, "spoof_in": 0}

        # (3) a source that is not selected is dropped at the gateway, and counted
        suffix = SLOT0.gateway_interface[len("mgeg"):]
        before = world.counters("gw1").get(f"drop_{suffix}", (0, 0))[0]
        assert udp_exchange(world.ns["node1"], POD_DENIED, (OUTSIDE, ECHO_PORT), b"denied",
                            timeout=0.3, attempts=3) is None
        assert world.echo.sources(b"denied") == []
        after = world.counters("gw1")[f"drop_{suffix}"][0]
        assert after >= before + 3

        # the flow log names the pod behind egress IP:port
        def flow_logged() -> list[dict[str, Any]]:
            if not gw.flow_log.exists():
                return []
            lines = [json.loads(line) for line in gw.flow_log.read_text().splitlines()]
            return [r for r in lines if r["podIP"] == POD_OK and r["protocol"] == "udp"]

        [record] = wait_until("the flow log line", flow_logged, timeout=5)
        assert record["pod"] == "ns-a/p1" and record["slot"] == "egw/0"
        assert record["destination"] == f"{OUTSIDE}:{ECHO_PORT}"
        assert record["egress"].startswith(f"{EGRESS_IPS[0]}:")
        assert not [r for r in json.loads("[" + ",".join(
            gw.flow_log.read_text().splitlines()) + "]") if r["podIP"] == POD_DENIED]

        # metrics, per slot
        metrics = nsexec(world.ns["gw1"], sys.executable, "-c",
                         "import urllib.request as u;print(u.urlopen("
                         "'http://127.0.0.1:9821/metrics', timeout=5).read().decode())").stdout
        labels = f'{{egress_ip="{EGRESS_IPS[0]}",gateway="egw",slot="0"}}'
        assert f"meshgress_gateway_slot_held{labels} 1" in metrics
        assert f"meshgress_gateway_slot_flows_total{labels} 1" in metrics
        assert re.search(rf"meshgress_gateway_slot_dropped_packets_total{re.escape(labels)} "
                         rf"[1-9]", metrics)

        # (7) status, as specified
        def gateway_ready() -> dict[str, Any] | None:
            status = world.store.get(Kind.EGRESS_GATEWAY, "egw").get("status") or {}
            ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
            return status if ready and ready[0]["status"] == "True" else None

        status = wait_until("EgressGateway Ready", gateway_ready, timeout=5)
        assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
            ("Ready", "True", "SlotsReady"), ("Degraded", "False", "SlotsReady"),
            ("EgressIPConflict", "False", "NoConflict"),
            ("SlotLimitExceeded", "False", "WithinSlotLimit"), ("InvalidSpec", "False", "Valid")]
        [slot] = status["slots"]
        assert {k: slot[k] for k in ("ip", "index", "holder", "node", "publicKey",
                                     "endpoint", "ready")} == {
            "ip": EGRESS_IPS[0], "index": 0, "holder": gw.identity, "node": "gw1",
            "publicKey": annotations[PUBLIC_KEY_ANNOTATION],
            "endpoint": f"{GATEWAYS['gw1']}:{gateway_port(0)}", "ready": True}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", slot["since"])
        assert status["observedGeneration"] == 1
        policy = world.store.get(Kind.EGRESS_POLICY, "team-a")["status"]
        assert [(c["type"], c["status"], c["reason"]) for c in policy["conditions"]] == [
            ("Accepted", "True", "Accepted"), ("Conflict", "False", "NoConflict"),
            ("InvalidSpec", "False", "Valid")]
        assert policy["selectedPods"] == 1 and policy["observedGeneration"] == 1

        # fencing: another holder owns the lease now (as after a partition longer than the
        # lease): the IP goes at once; once the lease is free again, it comes back.
        stolen_lease = world.store.get(Kind.LEASE, SLOT0.lease_name, LEASE_NAMESPACE)
        stolen_lease["spec"]["holderIdentity"] = "intruder"
        stolen_lease["spec"]["renewTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z",
                                                          time.gmtime())
        stolen_lease["metadata"]["annotations"]["meshgress.io/lease-duration-seconds"] = "30.0"
        world.store.apply(stolen_lease)
        stolen = time.monotonic()
        wait_until("the IP to be fenced", lambda: world.egress_ips_on("gw1") == set(),
                   timeout=3, interval=0.01)
        fenced_after = time.monotonic() - stolen
        print(f"fenced {fenced_after:.2f}s after the lease was taken away")
        assert fenced_after < 1.5
        world.store.release_lease(SLOT0.lease_name, "intruder")
        wait_until("the slot to be claimed again", lambda: world.lease(SLOT0)[0] == gw.identity
                   and world.egress_ips_on("gw1") == {EGRESS_IPS[0]}, timeout=5)

        # drain on SIGTERM: IP gone, lease released at once, nothing of ours left
        world.kill(gw, signal.SIGTERM)
        assert gw.proc.wait(timeout=10) == 0, gw.logs()
        lease = world.store.get_lease(SLOT0.lease_name)
        assert lease is not None and lease.holder is None
        assert world.egress_ips_on("gw1") == set()
        assert nsexec(world.ns["gw1"], "nft", "list", "table", "inet", "meshgress-gw",
                      check=False).returncode != 0
        assert SLOT0.gateway_interface not in ip(world.ns["gw1"], "link", "show")
        assert "0xff0000" not in ip(world.ns["gw1"], "rule", "show")
        assert ip(world.ns["gw1"], "route", "show", "table", "52076", check=False) == ""
        # ... and the node agent's table is untouched.
        assert nsexec(world.ns["gw1"], "nft", "list", "chain", "inet", "meshgress",
                      "masq").returncode == 0
    except BaseException:
        print(gw.logs())
        print(world.diagnose())
        raise
    finally:
        world.stop_all()  # a failure above must not leave it holding slots for the next test


# --- two gateways: one slot each, kill -9 takeover, SIGTERM drain to a standby -------------


def test_two_gateways_share_slots_and_take_over(world: World) -> None:
    world.store.apply(egress_gateway(EGRESS_IPS))
    launched = time.monotonic()
    started = [world.start_gateway("gw1"), world.start_gateway("gw2")]
    standby: GatewayProcess | None = None
    try:
        identities = {gw.identity: gw for gw in started}

        def one_each() -> dict[SlotId, str | None] | None:
            found = holders(world)
            ok = set(found.values()) == set(identities) and all(
                world.lease(s)[1].get(EGRESS_IP_ANNOTATION) == EGRESS_IPS[s.index]
                for s in found)
            return found if ok else None

        found = wait_until("one slot per gateway", one_each, timeout=15)
        # Gateways take slots beyond --max-slots only once past their start-up grace
        # (one lease duration): let them be a little older, as running gateways are.
        time.sleep(max(0.0, LEASE_DURATION_SECONDS + 0.2 - (time.monotonic() - launched)))
        victim = identities[found[SLOT0]]
        survivor = identities[found[SLOT1]]
        moving = EGRESS_IPS[0]
        assert world.egress_ips_on(victim.node) == {moving}
        assert world.egress_ips_on(survivor.node) == {EGRESS_IPS[1]}
        # The outside knows both IPs (and the victim's MAC for the one that will move).
        for address in EGRESS_IPS:
            nsexec(world.ns["out"], "ping", "-c", "1", "-W", "2", address)
        assert world.neighbour(moving) == world.mac(victim.node)

        # (5) kill -9: the IP leaves the victim (kernel lifetime) and then, never
        # before, comes up on the survivor; the survivor announces it.
        children = victim.children("conntrack")
        assert children, "the flow log's conntrack should run under the gateway"
        world.kill(victim)
        killed = time.monotonic()
        victim.proc.wait(timeout=5)
        gone_at = None
        while True:
            on_victim = moving in world.egress_ips_on(victim.node)
            on_survivor = moving in world.egress_ips_on(survivor.node)
            assert not (on_victim and on_survivor), "the egress IP is up on both gateways"
            now = time.monotonic()
            if not on_victim and gone_at is None:
                gone_at = now
            if on_survivor:
                break
            assert now - killed < LEASE_DURATION_SECONDS + 4, survivor.logs()
            time.sleep(0.01)
        takeover = now - killed
        print(f"kill -9 takeover: IP gone after {gone_at - killed:.2f}s, "
              f"up on the survivor after {takeover:.2f}s")
        assert takeover <= LEASE_DURATION_SECONDS + 1.2
        assert holders(world)[SLOT0] == survivor.identity
        assert not [pid for pid in children if pid_alive(pid)], \
            "the killed gateway's conntrack outlived it"
        wait_until("the outside's neighbour entry to follow the GARP",
                   lambda: world.neighbour(moving) == world.mac(survivor.node), timeout=3)
        wait_until("the survivor to publish the moved slot",
                   lambda: world.lease(SLOT0)[1].get(HOLDER_NODE_ANNOTATION) == survivor.node,
                   timeout=3)
        # Traffic follows once the node points at the new holder.
        world.point_node_at(SLOT0)
        assert udp_exchange(world.ns["node1"], POD_OK, (OUTSIDE, ECHO_PORT),
                            b"after-takeover") == b"after-takeover"
        assert set(world.echo.sources(b"after-takeover")) == {moving}

        # (6) a standby where the victim was (it also cleans up the victim's leftovers);
        # SIGTERM the survivor: it releases both leases at once and the standby takes
        # one immediately, the other after the orphan grace.
        standby = world.start_gateway(victim.node)
        wait_until("the standby to be up", lambda: "gateway started" in standby.logs(),
                   timeout=10)
        time.sleep(0.5)  # its first pass
        assert holders(world) == {SLOT0: survivor.identity, SLOT1: survivor.identity}
        world.kill(survivor, signal.SIGTERM)
        stopped = time.monotonic()
        first_taken = None
        while True:
            found = holders(world)
            for address in EGRESS_IPS:
                assert not (address in world.egress_ips_on(survivor.node)
                            and address in world.egress_ips_on(standby.node)), \
                    f"{address} is up on both gateways"
            now = time.monotonic()
            taken = [s for s, h in found.items() if h == standby.identity]
            if taken and first_taken is None:
                first_taken = now - stopped
            if len(taken) == 2 and world.egress_ips_on(standby.node) == set(EGRESS_IPS):
                break
            assert now - stopped < 8, standby.logs() + survivor.logs()
            time.sleep(0.01)
        both = now - stopped
        assert survivor.proc.wait(timeout=10) == 0, survivor.logs()
        print(f"SIGTERM drain: standby took its first slot after {first_taken:.2f}s, "
              f"both after {both:.2f}s")
        assert first_taken is not None and first_taken < 1.5
        assert world.egress_ips_on(survivor.node) == set()
        assert nsexec(world.ns[survivor.node], "nft", "list", "table", "inet",
                      "meshgress-gw", check=False).returncode != 0
        # The standby removed the killed gateway's leftover interface? It adopted it: the
        # slot it holds has one interface each, and nothing else is left.
        links = ip(world.ns[standby.node], "-o", "link", "show")
        assert sorted(re.findall(r"mgeg[0-9a-f]{8}", links)) == sorted(
            {SLOT0.gateway_interface, SLOT1.gateway_interface})
        # EgressGateway status shows both slots held by the standby.
        def both_ready() -> bool:
            status = world.store.get(Kind.EGRESS_GATEWAY, "egw").get("status") or {}
            return [s.get("holder") for s in status.get("slots", [])] == \
                [standby.identity] * 2 and all(s["ready"] for s in status["slots"])

        wait_until("status to show the standby holding both slots", both_ready, timeout=5)
    except BaseException:
        for gw in [*started, *([standby] if standby else [])]:
            print(f"--- {gw.identity}\n{gw.logs()}")
        print(world.diagnose())
        raise
