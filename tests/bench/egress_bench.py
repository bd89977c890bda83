"""Egress gateways: throughput through a gateway against direct masquerade, and failover.

Run as root:  .venv/bin/python tests/bench/egress_bench.py [--seconds 5] [--reps 3]
                  [--rounds 20] [--budget 8] [--name bgXXXX] [--json FILE]
(`--rounds 0`: throughput only). It ends with one JSON line ({"bench": "egress", ...}).

Builds its own lab (`meshgress lab --name bg<hex> up --nodes 2 --gateway-nodes 2`: the
EgressGateway `egress` with 192.0.2.201/.202 held by gateway processes on gw1 and gw2, the
EgressPolicy `payments` sending namespace `payments` through it) and removes it afterwards
(`lab down`), also on failure or Ctrl-C. Nothing touches the host's network namespace.

Throughput. `iperf3 -s -1 -J` in the outside host, `iperf3 -c 192.0.2.254 -t S -O 1`
from pod payments/app-node1, in three modes, in one run:

- gateway: as the policy says (pod -> node1 -> WireGuard -> gateway -> SNAT to an egress IP);
- hand:    the same hops built by hand, no meshgress code running (`hand_built_gateway`:
  pod -> node -> policy route into a WireGuard tunnel -> gateway namespace -> nftables
  `snat` -> outside, with the same wireguard-go program and MTU as the lab's slot tunnels),
  in namespaces of its own (`mgb-egw-<pid>-<rand>-*`). The target: gateway/hand >= 0.95;
- direct:  the policy excludes the outside host (spec.excludedCIDRs ["192.0.2.254/32"] in
  the lab's datastore), so the pod leaves through node1's masquerade as 192.0.2.11,
  UNENCRYPTED: reported for information only (kernel-only forwarding against a userspace
  WireGuard hop is no comparison of meshgress's own costs).

Every node of both (the lab's node1, gw1, gw2; the hand-built node and gateway) carries the
same stand-in for kube-proxy's nftables during the throughput runs (connection tracking on,
as on any Kubernetes node: tests/bench/handbuilt.py). The modes alternate per round
(gateway, hand, direct, then direct, hand, gateway, ...: counterbalanced, fewer policy
edits); after each policy edit the benchmark waits until the outside echo reports the
expected source from that pod (3 TCP exchanges in a row) and times that switch. The source
the iperf3 server saw on the data connection is checked for every run (an egress IP;
192.0.2.11). Reported: receiver throughput per run, the median per mode, the ratio
gateway/hand (of the medians, and per round) and, for information, gateway/direct. For
context the same pod also sends to pod web/app-node2 across the WireGuard mesh (node1 ->
node2) once per round. A run iperf3 reports as failed (typically "Connection reset by
peer") is listed and retried, up to 3 attempts; for every attempt the benchmark counts the
"slot ... missed N probes: unhealthy" lines node1's agent logged meanwhile (a slot that is
declared unhealthy has its flows moved to the other egress IP, and the outside server
resets a TCP connection whose source changed).

Failover, N rounds. Each round one UDP probe stream per payments pod to the outside echo,
one probe every 10 ms, answers matched by sequence number (so the gap is resolved to the
probe interval, not to a receive timeout). Each stream picks its own source port so that
its flow leaves through a given egress IP (it tries fresh ports until the echo reports
that IP): the "victim" stream on the slot about to fail, the "healthy" stream on the other
slot. Victim pod and victim slot rotate over the rounds (pod1/.201, pod2/.201, pod1/.202,
pod2/.202, ...). A third, control stream runs from web/app-node1 (node1's masquerade, no
gateway), so losses common to everything (a starved machine, the echo service) can be
told apart from the gateways' own. After 1 s of baseline, `meshgress lab gateway kill`
crashes the gateway holding the victim slot (a thread notes when its process is gone);
the streams run on until the kill command returned + 2 s.
Reported per round: the victim stream's largest gap (from the first unanswered probe to
the next answered one, as tests/e2e/test_egress.py measures it), its probes lost, the
source it ended on, when the process was gone after the kill command started (mostly
the command's own interpreter start-up) and when the first probe went unanswered after
that, the healthy and control streams' probes lost, the nodes' "unhealthy" declarations,
and how long after the process was gone the survivor acquired its slot lease; then
median and worst.

Between rounds the gateways are put back to one slot each. The claiming policy does not
rebalance: the survivor takes the dead gateway's slot over (once its lease expired) and
keeps it, and a restarted gateway stays idle, so the next kill would take both slots down.
The reset therefore stops (drains) the survivor and starts both gateways (in process, the
same `Lab.gateway` the CLI calls), which split the slots while both are in their start-up
grace; it waits until both slots are held on different gateway nodes and both egress IPs
answer from both pods. That reset is not measured (payments traffic is failed closed
during it).

Bounded in time: when the next failover round would end after the budget (default 8
minutes for the whole run), the remaining rounds are skipped (after at least 3) and the
report says so.
Exits non-zero only when it could not measure (no successful gateway or direct run, no
failover round, or the lab could not be used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.bench.handbuilt import (  # noqa: E402 - after the path is set
    KUBE_PROXY,
    HandBuilt,
    delete_tables,
    in_netns,
    load_ruleset,
    remove_leftovers,
)
from tests.bench.handbuilt import run as run_checked  # noqa: E402

OUTSIDE = "192.0.2.254"
ECHO_PORT = 7777
IPERF_PORT = 5201
EGRESS_IPS = ("192.0.2.201", "192.0.2.202")
NODE1_ADDRESS = "192.0.2.11"
POLICY = "payments"
PODS = ("payments/app-node1", "payments/app-node2")
THROUGHPUT_POD = "payments/app-node1"
MESH_SERVER_POD = "web/app-node2"
CONTROL_POD = "web/app-node1"
"""Leaves through node1's masquerade: a probe stream that no gateway carries."""
PROBE_INTERVAL = 0.01
BASELINE = 1.0
OBSERVE_AFTER_KILL = 2.0
MIN_ROUNDS = 3
HAND_PREFIX = "mgb-egw-"
HAND_POD = "198.18.252.66"
HAND_POD_NET = "198.18.252.0/24"
HAND_NODE = "192.0.2.11"
HAND_GATEWAY = "192.0.2.21"
HAND_EGRESS_IP = "192.0.2.201"
HAND_OUTSIDE = "192.0.2.254"
HAND_TABLE = 100
THROUGHPUT_TARGET = 0.95

# The probe stream, run inside a pod (standard library only). argv: host port want
# interval. Finds a source port whose flow the echo sees from `want`, prints one JSON
# line {"port", "tries"} (port 0: not found), then sends one numbered datagram every
# `interval` until a line (or EOF) arrives on stdin, waits 0.3 s for late answers and
# prints {"samples": [[send time, source seen or null], ...]}.
STREAM = r"""
import json, select, socket, sys, time
host, port, want, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sock, tries, deadline = None, 0, time.monotonic() + 15
while sock is None and time.monotonic() < deadline:
    tries += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.settimeout(0.3)
    try:
        s.sendto(b"pick", (host, port))
        seen = s.recv(512).decode().split()[0]
    except OSError:
        seen = None
    if seen == want:
        sock = s
    else:
        s.close()
print(json.dumps({"port": sock.getsockname()[1] if sock else 0, "tries": tries}), flush=True)
if sock is None:
    sys.exit(1)
sock.setblocking(False)
sent, answers = [], {}
def drain():
    while True:
        try:
            data = sock.recv(512).decode().split()
        except BlockingIOError:
            return
        except OSError:
            return
        if len(data) >= 3 and data[2].isdigit():
            answers.setdefault(int(data[2]), data[0])
next_t, stop = time.time(), False
while not stop:
    now = time.time()
    if now >= next_t:
        sent.append(now)
        try:
            sock.sendto(str(len(sent)).encode(), (host, port))
        except OSError:
            pass
        next_t = max(next_t + interval, now)
    ready = select.select([sock, sys.stdin], [], [], max(0.0, next_t - time.time()))[0]
    if sock in ready:
        drain()
    if sys.stdin in ready:
        stop = True
end = time.time() + 0.3
while time.time() < end:
    if select.select([sock], [], [], max(0.0, end - time.time()))[0]:
        drain()
print(json.dumps({"samples": [[t, answers.get(i + 1)] for i, t in enumerate(sent)]}))
"""


class BenchError(RuntimeError):
    """The benchmark could not measure; the message says what went wrong."""


def run(argv: list[str], *, timeout: float = 120, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                         f"{proc.stdout}\n{proc.stderr}")
    return proc


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def other(ip: str) -> str:
    return next(i for i in EGRESS_IPS if i != ip)


def largest_gap(samples: list[list[Any]]) -> tuple[float, bool]:
    """Longest run without an answer, in seconds, from the first unanswered probe to the
    next answered one (tests/e2e/test_egress.py), and whether the stream recovered from
    its last run (False: it ended unanswered; the gap is then counted to the last probe)."""
    gap, start = 0.0, None
    for t, seen in samples:
        if seen is None and start is None:
            start = t
        elif seen is not None and start is not None:
            gap, start = max(gap, t - start), None
    if start is not None:
        return max(gap, samples[-1][0] - start), False
    return gap, True


# --- the lab ------------------------------------------------------------------------------


class BenchLab:
    def __init__(self, name: str) -> None:
        from meshgress.lab.lab import Lab

        self.name = name
        self.lab = Lab(name)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "meshgress.cli", "lab", "--name", self.name, *args],
                   timeout=timeout)

    def pod_netns(self, pod: str) -> Path:
        namespace, name = pod.split("/")
        return Path("/run/netns") / self.lab.pod_netns(namespace, name)

    @property
    def outside_netns(self) -> Path:
        return Path(f"/run/netns/mg-{self.name}-outside")

    def pod_address(self, pod: str) -> str:
        namespace, name = pod.split("/")
        for p in self.lab.pods():
            if p["namespace"] == namespace and p["name"] == name and p["address"]:
                return str(p["address"])
        raise BenchError(f"no address for pod {pod}")

    def lease(self, egress_ip: str) -> Any:
        """The Lease of the slot serving `egress_ip` (gateway `egress`), or None."""
        from meshgress.slots import SlotId

        store = self.lab.datastore()
        try:
            return store.get_lease(SlotId("egress", EGRESS_IPS.index(egress_ip)).lease_name)
        finally:
            store.close()

    def holders(self) -> dict[str, str | None]:
        """egress IP -> the gateway node holding its slot (None: not held)."""
        return {s["egressIP"]: s["node"] if s["holder"] else None for s in self.lab.slots()}

    def seen(self, pod: str, proto: str = "tcp", timeout: float = 1.0) -> str | None:
        """The source the outside echo saw for one exchange from `pod`, or None."""
        from meshgress.lab.echo import ask_tcp, ask_udp
        from meshgress.lab.netns import call_in_netns

        ask = ask_tcp if proto == "tcp" else ask_udp
        try:
            return call_in_netns(self.pod_netns(pod), lambda: ask(OUTSIDE, ECHO_PORT, timeout))
        except OSError:
            return None

    def set_excluded(self, excluded: bool) -> None:
        from meshgress.datastore import Conflict, Kind

        store = self.lab.datastore()
        try:
            for _ in range(20):
                policy = store.get(Kind.EGRESS_POLICY, POLICY)
                if excluded:
                    policy["spec"]["excludedCIDRs"] = [f"{OUTSIDE}/32"]
                else:
                    policy["spec"].pop("excludedCIDRs", None)
                try:
                    store.replace(policy)
                    return
                except Conflict:
                    time.sleep(0.05)
            raise BenchError("could not edit the EgressPolicy (conflicts)")
        finally:
            store.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
             ) -> float:
    """Poll `check` until it holds; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def wait_source(lab: BenchLab, pod: str, accept: Callable[[str | None], bool], what: str, *,
                timeout: float = 30, streak: int = 3) -> float:
    """Wait until `streak` TCP exchanges in a row from `pod` are seen from an accepted
    source; returns the seconds until the first of them."""
    start = time.monotonic()
    first: float | None = None
    good = 0
    while good < streak:
        if time.monotonic() - start > timeout:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {pod} to leave {what}")
        if accept(lab.seen(pod)):
            first = time.monotonic() - start if good == 0 else first
            good += 1
        else:
            good = 0
            time.sleep(0.05)
    assert first is not None
    return first


# --- the gateway built by hand -------------------------------------------------------------


@dataclass
class HandGateway:
    client_ns: Path
    server_ns: Path
    wireguard_go: str
    mtu: int


@contextlib.contextmanager
def hand_built_gateway(prefix: str, mtu: int, wireguard_go: str) -> Iterator[HandGateway]:
    """The lab's egress hops built with `ip`, `wg` and `nft`, no meshgress code running:
    a bridge with a node, a gateway and an outside host on it (the same addresses as the
    lab's, on a bridge of their own); a pod behind the node wired as the CNI plugin wires
    one; on the node a policy route (`ip rule iif <pod veth> lookup 100`, table 100:
    `default dev wg0`) into a WireGuard tunnel to the gateway (the same wireguard-go program
    and MTU as the lab's slot tunnels, one peer each, allowed-ips 0.0.0.0/0 on the node's
    side and the pod network on the gateway's); on the gateway forwarding and an nftables
    `snat` of the pod network to the egress IP 192.0.2.201 (held on its eth0, answered by
    ARP); kube-proxy's stand-in (connection tracking) on node and gateway. Replies come
    back un-SNATed by conntrack and routed into the tunnel."""
    with HandBuilt(prefix) as built:
        sw = built.bridge("sw")
        node, gateway, outside = built.netns("node"), built.netns("gw"), built.netns("out")
        built.attach(sw, node, "pn", f"{HAND_NODE}/24")
        built.attach(sw, gateway, "pg", f"{HAND_GATEWAY}/24")
        built.attach(sw, outside, "po", f"{HAND_OUTSIDE}/24")
        pod = built.pod(node, "pod", "pod1", HAND_POD, mtu)
        node_key, gateway_key = built.keypair("node"), built.keypair("gw")
        built.wireguard(node, "wg0", wireguard_go, key=node_key[0], port=51820, mtu=mtu,
                        address=None, peer=gateway_key[1], endpoint=f"{HAND_GATEWAY}:51820",
                        allowed_ips="0.0.0.0/0")
        built.wireguard(gateway, "wg0", wireguard_go, key=gateway_key[0], port=51820,
                        mtu=mtu, address=None, peer=node_key[1],
                        endpoint=f"{HAND_NODE}:51820", allowed_ips=HAND_POD_NET)
        run_checked(["ip", "-n", node, "-batch", "-"], input_text=(
            f"route add default dev wg0 table {HAND_TABLE}\n"
            f"rule add iif pod1 lookup {HAND_TABLE} priority 100\n"))
        run_checked(["ip", "-n", gateway, "-batch", "-"], input_text=(
            f"address add {HAND_EGRESS_IP}/32 dev eth0\n"
            f"route add {HAND_POD_NET} dev wg0\n"))
        built.sysctl(gateway, "net.ipv4.ip_forward=1")
        load_ruleset(gateway, f"""table ip hand-gateway {{
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		iifname "wg0" oifname "eth0" ip saddr {HAND_POD_NET} snat to {HAND_EGRESS_IP}
	}}
}}
""")
        for ns in (node, gateway):
            load_ruleset(ns, KUBE_PROXY)
        answered = run_checked([*in_netns(pod), "ping", "-n", "-c", "3", "-i", "0.2", "-w",
                                "15", HAND_OUTSIDE], check=False)
        if answered.returncode != 0:
            raise BenchError(f"the hand-built gateway does not carry the pod's traffic: "
                             f"{answered.stdout}{answered.stderr}")
        yield HandGateway(Path(f"/run/netns/{pod}"), Path(f"/run/netns/{outside}"),
                          wireguard_go, mtu)


def slot_mtu(lab: BenchLab) -> int:
    """The MTU of node1's slot tunnels (the lab's `mge…` interfaces)."""
    links = json.loads(run(["ip", "-n", f"mg-{lab.name}-node1", "-j", "link", "show"]).stdout)
    mtus = {int(link["mtu"]) for link in links if str(link["ifname"]).startswith("mge")}
    if len(mtus) != 1:
        raise BenchError(f"node1's slot tunnels: expected one MTU, found {sorted(mtus)}")
    return mtus.pop()


# --- throughput ---------------------------------------------------------------------------


@dataclass
class Transfer:
    mode: str
    mbps: float | None
    """Receiver throughput; None: the run failed (see `error`)."""
    retransmits: int
    source: str | None
    flaps: dict[str, int]
    """Slot -> times node1's prober declared it unhealthy during the run."""
    error: str | None = None


class SlotFlaps:
    """Counts the prober's "missed N probes: unhealthy" lines in agent logs from a mark on."""

    def __init__(self, lab: BenchLab, nodes: tuple[str, ...] = ("node1", "node2")) -> None:
        self.paths = {n: lab.lab.log_path(f"{n}-agent") for n in nodes}
        self.offsets: dict[str, int] = {}
        self.mark()

    def mark(self) -> None:
        self.offsets = {n: p.stat().st_size if p.exists() else 0 for n, p in self.paths.items()}

    def since_mark(self) -> dict[str, int]:
        """'node:slot' -> unhealthy declarations since the mark."""
        counts: dict[str, int] = {}
        for node, path in self.paths.items():
            with contextlib.suppress(OSError), path.open("rb") as fh:
                fh.seek(self.offsets[node])
                for line in fh.read().decode(errors="replace").splitlines():
                    if "probes: unhealthy" in line:
                        slot = line.split("slot ", 1)[1].split()[0]
                        counts[f"{node}:{slot}"] = counts.get(f"{node}:{slot}", 0) + 1
        return counts


def iperf(lab: BenchLab, server_ns: Path, client_ns: Path, dest: str, *, seconds: int,
          mode: str, attempts: int = 3) -> list[Transfer]:
    """One measurement; an attempt that iperf3 reports as failed (e.g. the connection was
    reset) is recorded and retried, up to `attempts` in all. The last item is the
    measurement unless every attempt failed."""
    flaps = SlotFlaps(lab, ("node1",))
    out: list[Transfer] = []
    for _ in range(attempts):
        flaps.mark()
        try:
            mbps, retransmits, source = iperf_once(server_ns, client_ns, dest,
                                                   seconds=seconds)
            t = Transfer(mode, mbps, retransmits, source, flaps.since_mark())
        except BenchError as exc:
            t = Transfer(mode, None, 0, None, flaps.since_mark(), error=str(exc))
        out.append(t)
        flap = " ".join(f"{k}x{v}" for k, v in t.flaps.items()) or "none"
        if t.mbps is None:
            print(f"  {mode:<8} FAILED: {t.error}; slot flaps {flap}", flush=True)
            time.sleep(0.5)
            continue
        print(f"  {mode:<8} {t.mbps:>9.1f} Mbit/s  retransmits {t.retransmits:>6}  "
              f"seen as {t.source}; slot flaps {flap}", flush=True)
        break
    return out


def iperf_once(server_ns: Path, client_ns: Path, dest: str, *,
               seconds: int) -> tuple[float, int, str]:
    server = subprocess.Popen(["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1", "-J",
                               "-p", str(IPERF_PORT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        def listening() -> bool:
            out = run(["nsenter", f"--net={server_ns}", "ss", "-Hltn",
                       f"sport = :{IPERF_PORT}"], check=False).stdout
            if server.poll() is not None:
                err = server.stderr.read() if server.stderr else ""
                raise BenchError(f"iperf3 server exited: {err}")
            return bool(out.strip())

        wait_for(listening, 10, "the iperf3 server", interval=0.05)
        client = run(["nsenter", f"--net={client_ns}", "iperf3", "-c", dest,
                      "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1", "-J"],
                     timeout=seconds + 60, check=False)
        try:
            server_out, _ = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server_out = ""  # a server that lost its client waits forever: killed below
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    try:
        result = json.loads(client.stdout)
    except ValueError as exc:
        raise BenchError(f"iperf3 client: {client.stdout[-300:]} {client.stderr[-300:]}") \
            from exc
    try:
        end = result["end"]
        mbps = end["sum_received"]["bits_per_second"] / 1e6
        retransmits = int(end["sum_sent"].get("retransmits", 0))
        sources = {c["remote_host"] for c in json.loads(server_out)["start"]["connected"]}
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3: {result.get('error', 'no result')}") from exc
    if len(sources) != 1:
        raise BenchError(f"iperf3: data from several sources {sources}")
    return mbps, retransmits, sources.pop()


def measure_throughput(lab: BenchLab, hand: HandGateway, seconds: int, reps: int
                       ) -> dict[str, Any]:
    order = []
    for i in range(reps):
        order += ["gateway", "hand", "direct"] if i % 2 == 0 else ["direct", "hand", "gateway"]
    runs: list[Transfer] = []
    switches: dict[str, list[float]] = {"gateway": [], "direct": []}
    mesh_dest = lab.pod_address(MESH_SERVER_POD)
    current = "gateway"
    lab.set_excluded(False)
    wait_source(lab, THROUGHPUT_POD, lambda s: s in EGRESS_IPS, "through the gateway")
    client_ns = lab.pod_netns(THROUGHPUT_POD)
    lab_nodes = [Path(f"/run/netns/mg-{lab.name}-{node}") for node in ("node1", "gw1", "gw2")]
    for ns in lab_nodes:
        load_ruleset(ns.name, KUBE_PROXY)
    try:
        for mode in order:
            if mode == "hand":
                runs += iperf(lab, hand.server_ns, hand.client_ns, HAND_OUTSIDE,
                              seconds=seconds, mode=mode)
                if runs[-1].source not in (None, HAND_EGRESS_IP):
                    raise BenchError(f"hand-built run left as {runs[-1].source}")
                continue
            if mode != current:
                lab.set_excluded(mode == "direct")
                if mode == "direct":
                    took = wait_source(lab, THROUGHPUT_POD, lambda s: s == NODE1_ADDRESS,
                                       f"as {NODE1_ADDRESS}")
                else:
                    took = wait_source(lab, THROUGHPUT_POD, lambda s: s in EGRESS_IPS,
                                       "with an egress IP")
                switches[mode].append(took)
                current = mode
            attempts = iperf(lab, lab.outside_netns, client_ns, OUTSIDE, seconds=seconds,
                             mode=mode)
            for t in attempts:
                ok = t.source is None or (t.source in EGRESS_IPS if mode == "gateway"
                                          else t.source == NODE1_ADDRESS)
                if not ok:
                    raise BenchError(f"{mode} run left as {t.source}")
            runs += attempts
            if mode == "direct":  # once per round: the mesh hop alone, for context
                runs += iperf(lab, lab.pod_netns(MESH_SERVER_POD), client_ns, mesh_dest,
                              seconds=seconds, mode="mesh")
    finally:
        lab.set_excluded(False)
        for ns in lab_nodes:
            delete_tables(ns.name, KUBE_PROXY)
    switches["gateway"].append(wait_source(lab, THROUGHPUT_POD, lambda s: s in EGRESS_IPS,
                                           "with an egress IP"))
    return {"runs": [asdict(r) for r in runs], "switch_s": switches}


# --- failover -----------------------------------------------------------------------------


@dataclass
class Round:
    index: int
    victim_pod: str
    victim_ip: str
    victim_node: str
    gap_ms: float
    """The victim stream's largest gap (first unanswered probe -> next answered one)."""
    recovered: bool
    lost: int
    kill_gap_ms: float | None
    """The victim stream's gap that began when its gateway died (None: no loss then)."""
    ended_on: list[str]
    detect_ms: float | None
    """Gateway process gone -> the victim stream's first unanswered probe."""
    kill_cmd_s: float
    died_after_s: float | None
    """`lab gateway kill` started -> the gateway process was gone."""
    takeover_s: float | None
    """Gateway process gone -> the survivor acquired its slot lease (None: not within
    10 s of the end of the streams)."""
    healthy_lost: int
    healthy_gap_ms: float
    healthy_sources: list[str]
    healthy_lost_alone: int
    """Healthy-stream probes lost with no control-stream probe lost within 100 ms."""
    control_lost: int
    port_tries: list[int] = field(default_factory=list)
    reset_s: float = 0.0
    moved_before: bool = False
    """The slots had left one-per-gateway on their own between the previous reset and
    this round (so the benchmark reset them again first)."""
    flaps: dict[str, int] = field(default_factory=dict)
    """'node:slot' -> unhealthy declarations by the nodes' probers during the round."""
    healthy_slot_flaps: int = 0
    timeline: dict[str, list[list[Any]]] = field(default_factory=dict)
    """Per stream, runs of equal outcome: [ms after the kill command started, source seen
    or null, probes]."""


@contextlib.contextmanager
def probe_stream(lab: BenchLab, pod: str, want: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        ["nsenter", f"--net={lab.pod_netns(pod)}", sys.executable, "-I", "-c", STREAM,
         OUTSIDE, str(ECHO_PORT), want, str(PROBE_INTERVAL)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_ready(proc: subprocess.Popen[str], pod: str, want: str) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        info = json.loads(line)
    except ValueError as exc:
        raise BenchError(f"probe stream in {pod}: {line!r} "
                         f"{proc.stderr.read() if proc.stderr else ''}") from exc
    if not info["port"]:
        raise BenchError(f"probe stream in {pod}: no source port leaves as {want} "
                         f"after {info['tries']} tries")
    return int(info["tries"])


def stream_samples(proc: subprocess.Popen[str]) -> list[list[Any]]:
    out, err = proc.communicate("stop\n", timeout=30)
    try:
        return list(json.loads(out.strip().splitlines()[-1])["samples"])
    except (ValueError, IndexError, KeyError) as exc:
        raise BenchError(f"probe stream gave no samples: {out[-500:]} {err[-500:]}") from exc


def spread(lab: BenchLab) -> dict[str, str | None]:
    holders = lab.holders()
    return holders if all(holders.values()) and len(set(holders.values())) == len(holders) \
        else {}


def both_ips_answer(lab: BenchLab) -> bool:
    """Both egress IPs are seen from both payments pods (fresh UDP flows hash over the
    slots; each pod tries up to 30 flows)."""
    for pod in PODS:
        seen: set[str | None] = set()
        for _ in range(30):
            seen.add(lab.seen(pod, "udp", timeout=0.3))
            if set(EGRESS_IPS) <= seen:
                break
        if not set(EGRESS_IPS) <= seen:
            return False
    return True


def reset_gateways(lab: BenchLab) -> float:
    """One slot per gateway node, both healthy from both pods; returns the seconds."""
    start = time.monotonic()
    for attempt in range(3):
        if not spread(lab):
            # In process (the same Lab.gateway the CLI calls): no interpreter start-up.
            record = lab.lab.load_record()
            for node in sorted((record.gateways if record else {}).keys()):
                lab.lab.gateway("stop", node)
            for node in ("gw1", "gw2"):
                lab.lab.gateway("start", node)
            with contextlib.suppress(BenchError):
                wait_for(lambda: all(lab.holders().values()), 30, "both slots held")
                time.sleep(1.0)  # let a gateway that took both (if any) show it
            if not spread(lab):
                print(f"  reset attempt {attempt + 1}: slots {lab.holders()}", flush=True)
                continue
        with contextlib.suppress(BenchError):
            wait_for(lambda: both_ips_answer(lab), 30, "both egress IPs answering", 0.2)
            return time.monotonic() - start
    raise BenchError(f"could not put one slot on each gateway: {lab.holders()}")


def runs_of(samples: list[list[Any]], origin: float) -> list[list[Any]]:
    out: list[list[Any]] = []
    for t, seen in samples:
        if out and out[-1][1] == seen:
            out[-1][2] += 1
        else:
            out.append([round((t - origin) * 1e3), seen, 1])
    return out


def gap_from(samples: list[list[Any]], since: float) -> float | None:
    """The gap of the first loss run that begins at or after `since` (to the next answer,
    or to the last probe), or None."""
    start = None
    for t, seen in samples:
        if seen is None and start is None and t >= since:
            start = t
        elif seen is not None and start is not None:
            return float(t - start)
    return None if start is None else float(samples[-1][0] - start)


class DeathWatch:
    """Notes when a process is gone (polled every 5 ms on a thread)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.when: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from meshgress.lab.netns import pid_alive

        while self.pid is not None and not self._stop.is_set():
            if not pid_alive(self.pid):
                self.when = time.time()
                return
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def failover_round(lab: BenchLab, index: int) -> Round:
    victim_pod = PODS[index % 2]
    healthy_pod = PODS[1 - index % 2]
    victim_ip = EGRESS_IPS[(index // 2) % 2]
    healthy_ip = other(victim_ip)
    holders = spread(lab)
    if not holders:
        raise BenchError(f"slots not spread before round {index + 1}: {lab.holders()}")
    victim_node = holders[victim_ip]
    assert victim_node is not None
    record = lab.lab.load_record()
    flaps = SlotFlaps(lab)
    with probe_stream(lab, victim_pod, victim_ip) as victim, \
            probe_stream(lab, healthy_pod, healthy_ip) as healthy, \
            probe_stream(lab, CONTROL_POD, NODE1_ADDRESS) as control:
        tries = [stream_ready(victim, victim_pod, victim_ip),
                 stream_ready(healthy, healthy_pod, healthy_ip),
                 stream_ready(control, CONTROL_POD, NODE1_ADDRESS)]
        time.sleep(BASELINE)
        death = DeathWatch(record.gateways.get(victim_node) if record else None)
        kill_start = time.time()
        try:
            lab.cli("gateway", "kill", victim_node)
        finally:
            kill_end = time.time()
            time.sleep(OBSERVE_AFTER_KILL)
            death.close()
        samples = stream_samples(victim)
        healthy_samples = stream_samples(healthy)
        control_samples = stream_samples(control)
    round_flaps = flaps.since_mark()
    healthy_slot = f"egress/{EGRESS_IPS.index(healthy_ip)}"
    dead = death.when
    gap, recovered = largest_gap(samples)
    origin = dead if dead is not None else kill_start
    first_loss = next((t for t, seen in samples if seen is None and t >= origin - 0.05), None)

    def taken_over() -> bool:
        lease = lab.lease(victim_ip)
        return bool(lease and lease.holder and not lease.expired(time.time())
                    and not lease.holder.startswith(f"{victim_node}/"))

    takeover = None
    with contextlib.suppress(BenchError):
        wait_for(taken_over, 10, "the survivor to take the slot over", interval=0.05)
        if dead is not None:
            takeover = lab.lease(victim_ip).acquire_time - dead
    kill_gap = gap_from(samples, origin - 0.05)
    hgap, _ = largest_gap(healthy_samples)
    control_losses = [t for t, seen in control_samples if seen is None]
    healthy_losses = [t for t, seen in healthy_samples if seen is None]
    alone = sum(1 for t in healthy_losses if not any(abs(t - c) <= 0.1 for c in control_losses))
    return Round(
        index=index + 1, victim_pod=victim_pod, victim_ip=victim_ip, victim_node=victim_node,
        gap_ms=gap * 1e3, recovered=recovered, lost=sum(1 for _, s in samples if s is None),
        kill_gap_ms=None if kill_gap is None else kill_gap * 1e3,
        ended_on=sorted({s for _, s in samples[-20:] if s}),
        detect_ms=None if first_loss is None or dead is None else (first_loss - dead) * 1e3,
        kill_cmd_s=kill_end - kill_start,
        died_after_s=None if dead is None else dead - kill_start, takeover_s=takeover,
        healthy_lost=len(healthy_losses), healthy_gap_ms=hgap * 1e3,
        healthy_sources=sorted({s for _, s in healthy_samples if s}),
        healthy_lost_alone=alone, control_lost=len(control_losses), port_tries=tries,
        flaps=round_flaps,
        healthy_slot_flaps=sum(v for k, v in round_flaps.items() if k.endswith(healthy_slot)),
        timeline={"victim": runs_of(samples, kill_start),
                  "healthy": runs_of(healthy_samples, kill_start),
                  "control": runs_of(control_samples, kill_start)})


def measure_failover(lab: BenchLab, rounds: int, deadline: float) -> list[Round]:
    """Up to `rounds` rounds; after MIN_ROUNDS, stops early when the next one would
    likely end after `deadline` (time.monotonic())."""
    results: list[Round] = []
    reset_gateways(lab)
    started = time.monotonic()
    for index in range(rounds):
        per_round = (time.monotonic() - started) / index if index else 15.0
        if index >= MIN_ROUNDS and time.monotonic() + per_round > deadline:
            print(f"  time budget reached: stopping after {index} of {rounds} rounds "
                  f"({per_round:.0f} s per round on this machine now)", flush=True)
            break
        moved = not spread(lab)
        if moved:
            print(f"  slots moved on their own since the last reset: {lab.holders()}; "
                  f"resetting again. The gateways' last slot events:", flush=True)
            for node in ("gw1", "gw2"):
                with contextlib.suppress(OSError):
                    lines = lab.lab.log_path(f"{node}-gateway").read_text(
                        errors="replace").splitlines()
                    events = [x for x in lines if any(
                        w in x for w in ("slot claimed", "slot fenced", "slot released",
                                         "gateway started"))]
                    for line in events[-4:]:
                        print(f"      {node}: {line[:200]}", flush=True)
            reset_gateways(lab)
        r = failover_round(lab, index)
        r.moved_before = moved
        r.reset_s = reset_gateways(lab)
        results.append(r)
        print(f"  round {r.index:>2}: {r.victim_pod} on {r.victim_ip} ({r.victim_node}) "
              f"gap {r.gap_ms:>5.0f} ms{'' if r.recovered else ' (NOT RECOVERED)'} "
              f"(at the kill {fmt_ms(r.kill_gap_ms)}) lost {r.lost:>3}, "
              f"died +{fmt_s(r.died_after_s)} after the command started, first loss "
              f"{fmt_ms(r.detect_ms, sign=True)} after; now {','.join(r.ended_on) or '-'} "
              f"| healthy lost {r.healthy_lost} ({r.healthy_lost_alone} without control "
              f"loss) via {','.join(r.healthy_sources)} | control lost {r.control_lost} "
              f"| takeover {fmt_s(r.takeover_s)} kill cmd {r.kill_cmd_s:.1f}s "
              f"reset {r.reset_s:.1f}s", flush=True)
        if r.flaps:
            print(f"      prober 'unhealthy' declarations: "
                  f"{' '.join(f'{k}x{v}' for k, v in sorted(r.flaps.items()))}", flush=True)
        if r.healthy_lost or r.control_lost or r.healthy_sources != [other(r.victim_ip)] \
                or not r.recovered or r.healthy_slot_flaps:
            for which, runs in r.timeline.items():
                print(f"      {which} stream (ms after kill command, source, probes): "
                      + " ".join(f"{t:+}:{seen or 'LOST'}x{n}" for t, seen, n in runs),
                      flush=True)
    return results


def fmt_ms(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else f"{value:{'+' if sign else ''}.0f}ms"


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


# --- report -------------------------------------------------------------------------------


def report(throughput: dict[str, Any], rounds: list[Round], args: argparse.Namespace,
           load: tuple[float, ...], elapsed: float) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"throughput": throughput, "failover": [asdict(r) for r in rounds]}, indent=2) + "\n")
    print()
    print(f"egress benchmark: lab {args.name}, {os.cpu_count()} CPUs, kernel "
          f"{platform.release()}, wireguard-go {throughput.get('wireguard_go')} (slot tunnel "
          f"MTU {throughput.get('mtu')}); load average at start {load[0]:.2f}, at end "
          f"{os.getloadavg()[0]:.2f}; {elapsed:.0f} s")
    print(f"command: {' '.join(sys.argv)}")
    print()
    runs = throughput["runs"]
    modes = ("gateway", "hand", "direct", "mesh")
    ok = {m: [r for r in runs if r["mode"] == m and r["mbps"] is not None] for m in modes}
    failed = {m: [r for r in runs if r["mode"] == m and r["mbps"] is None] for m in modes}
    mbps = {m: [r["mbps"] for r in ok[m]] for m in modes}
    header = (f"{'throughput (pod -> outside)':<48}{'runs':>5}{'median':>12}{'min':>10}"
              f"{'max':>10}{'retr. median':>14}{'failed':>8}{'slot flaps':>12}")
    print(header)
    print("-" * len(header))
    labels = {"gateway": "through the gateway (egress IP)",
              "hand": "gateway built by hand (egress IP)",
              "direct": f"direct masquerade, UNENCRYPTED ({NODE1_ADDRESS})",
              "mesh": "mesh pod->pod (context)"}
    for mode in modes:
        values = mbps[mode]
        flaps = sum(sum(r["flaps"].values()) for r in ok[mode] + failed[mode])
        if values:
            print(f"{labels[mode]:<48}{len(values):>5}{median(values):>7.0f} Mbit"
                  f"{min(values):>6.0f} Mbit{max(values):>6.0f} Mbit"
                  f"{median([float(r['retransmits']) for r in ok[mode]]):>14.0f}"
                  f"{len(failed[mode]):>8}{flaps:>12}")
        else:
            print(f"{labels[mode]:<48}{0:>5}{'-':>12}{'-':>10}{'-':>10}{'-':>14}"
                  f"{len(failed[mode]):>8}{flaps:>12}")
    gw, hand, direct, mesh = (median(mbps[m]) for m in modes)
    pairs = [g / h for g, h in zip(mbps["gateway"], mbps["hand"], strict=False)]
    print(f"ratio gateway/hand-built (medians): {gw / hand:.3f} (per round "
          f"{', '.join(f'{x:.3f}' for x in pairs)}; target >= {THROUGHPUT_TARGET}: "
          f"{'met' if gw / hand >= THROUGHPUT_TARGET else 'MISSED'})")
    print(f"for information: gateway/direct masquerade {gw / direct:.3f} (direct encrypts "
          f"nothing), gateway/mesh {gw / mesh:.2f}")
    for r in failed["gateway"] + failed["hand"] + failed["direct"] + failed["mesh"]:
        print(f"  failed {r['mode']} run: {r['error']}; prober flaps during it: {r['flaps']}")
    sw = throughput["switch_s"]
    print("policy edit -> source changed: to direct "
          f"{', '.join(f'{s:.2f}' for s in sw['direct'])} s; back to an egress IP "
          f"{', '.join(f'{s:.2f}' for s in sw['gateway'])} s")
    print()
    if rounds:
        report_failover(rounds)
    gaps = [r.gap_ms for r in rounds]
    print(json.dumps({
        "bench": "egress", "reps": args.reps, "seconds": args.seconds,
        "load": {"start": load[0], "end": os.getloadavg()[0]},
        "wireguard_go": throughput.get("wireguard_go"), "mtu": throughput.get("mtu"),
        "median_mbps": {m: median(mbps[m]) for m in modes},
        "ratios": {"gateway/hand": gw / hand, "gateway/hand_rounds": pairs,
                   "gateway/direct_unencrypted": gw / direct, "gateway/mesh": gw / mesh},
        "target_met": gw / hand >= THROUGHPUT_TARGET,
        "failover": {"rounds": len(rounds), "gap_ms_median": median(gaps) if gaps else None,
                     "gap_ms_worst": max(gaps, default=None),
                     "gap_ms_best": min(gaps, default=None)},
    }, sort_keys=True))


def report_failover(rounds: list[Round]) -> None:
    header = (f"{'round':>5} {'victim stream':<20}{'slot':<13}{'gw':<5}{'gap':>8}{'at kill':>9}"
              f"{'lost':>6}{'died':>7}{'1st loss':>9}  {'ends on':<13}{'healthy':>8}"
              f"{'alone':>6}{'ctrl':>5}{'takeover':>9}{'kill cmd':>9}")
    print(f"failover: {len(rounds)} gateway kills, probes every {PROBE_INTERVAL * 1e3:.0f} ms; "
          "gap = the victim stream's largest gap, at kill = its gap that began when the "
          "gateway died; died = kill command start -> process gone; 1st loss = process gone "
          "-> first unanswered probe; healthy = probes the healthy-slot stream lost (alone: "
          "with no control-stream loss within 100 ms); ctrl = probes lost by the control "
          f"stream ({CONTROL_POD}, no gateway); takeover = process gone -> survivor holds "
          "the slot lease")
    print(header)
    print("-" * len(header))
    for r in rounds:
        print(f"{r.index:>5} {r.victim_pod:<20}{r.victim_ip:<13}{r.victim_node:<5}"
              f"{r.gap_ms:>6.0f}ms{fmt_ms(r.kill_gap_ms):>9}{r.lost:>6}"
              f"{fmt_s(r.died_after_s):>7}{fmt_ms(r.detect_ms, sign=True):>9}  "
              f"{','.join(r.ended_on) or '-':<13}{r.healthy_lost:>8}{r.healthy_lost_alone:>6}"
              f"{r.control_lost:>5}{fmt_s(r.takeover_s):>9}{r.kill_cmd_s:>8.1f}s"
              f"{'' if r.recovered else '  NOT RECOVERED'}"
              f"{'  (slots had moved)' if r.moved_before else ''}")
    gaps = [r.gap_ms for r in rounds]
    kill_gaps = [r.kill_gap_ms for r in rounds if r.kill_gap_ms is not None]
    detect = [r.detect_ms for r in rounds if r.detect_ms is not None]
    healthy = [r.healthy_lost for r in rounds]
    print(f"victim gap (largest): median {median(gaps):.0f} ms, worst {max(gaps):.0f} ms, best "
          f"{min(gaps):.0f} ms; gap at the kill: median {median(kill_gaps):.0f} ms, worst "
          f"{max(kill_gaps, default=float('nan')):.0f} ms; first loss after the process was "
          f"gone: median {median(detect):.0f} ms")
    print(f"victim stream: not recovered in {sum(not r.recovered for r in rounds)} rounds; "
          f"moved to the other IP in "
          f"{sum(r.ended_on == [other(r.victim_ip)] for r in rounds)}/{len(rounds)}")
    print(f"healthy-slot stream: lost probes in {sum(1 for h in healthy if h)}/{len(rounds)} "
          f"rounds, {sum(healthy)} probes in all (worst round {max(healthy)}), "
          f"{sum(r.healthy_lost_alone for r in rounds)} of them with no control-stream loss "
          f"within 100 ms; seen from another IP than its own in "
          f"{sum(r.healthy_sources != [other(r.victim_ip)] for r in rounds)} rounds; its slot "
          f"declared unhealthy by a node's prober in "
          f"{sum(1 for r in rounds if r.healthy_slot_flaps)} rounds")
    print(f"control stream (no gateway): lost probes in "
          f"{sum(1 for r in rounds if r.control_lost)}/{len(rounds)} rounds, "
          f"{sum(r.control_lost for r in rounds)} probes in all")
    took = [r.takeover_s for r in rounds if r.takeover_s is not None]
    print(f"survivor took the dead gateway's slot lease over: {len(took)}/{len(rounds)} rounds, "
          f"median {median(took):.2f} s, worst {max(took, default=float('nan')):.2f} s after "
          f"the process was gone")
    moved = sum(r.moved_before for r in rounds)
    print(f"slots left one-per-gateway on their own between rounds: {moved} times; "
          f"`lab gateway kill` command median {median([r.kill_cmd_s for r in rounds]):.1f} s; "
          f"reset between rounds median {median([r.reset_s for r in rounds]):.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    parser.add_argument("--reps", type=int, default=3, help="runs per mode")
    parser.add_argument("--rounds", type=int, default=20, help="gateway kills")
    parser.add_argument("--name", default="bg" + secrets.token_hex(2), help="lab name")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="minutes for the whole run: fewer failover rounds when the "
                             "machine is too slow for all of them (default 8)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark builds a lab in network namespaces: run it as root")
    for tool in ("iperf3", "nsenter", "ss"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            sys.exit(f"{tool} is missing: run `make bench`, which installs it")

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    load = os.getloadavg()
    began = time.monotonic()
    lab = BenchLab(args.name)
    remove_leftovers(HAND_PREFIX)
    print(f"lab {args.name}: up", flush=True)
    try:
        lab.cli("up", "--nodes", "2", "--gateway-nodes", "2", timeout=300)
        record = lab.lab.load_record()
        wireguard_go = record.wireguard_go if record and record.wireguard_go else "wireguard-go"
        mtu = slot_mtu(lab)
        with hand_built_gateway(f"{HAND_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-", mtu,
                                wireguard_go) as hand:
            print(f"throughput: {args.reps} x {args.seconds} s per mode, alternating; "
                  f"wireguard-go {wireguard_go}, slot tunnel MTU {mtu}", flush=True)
            throughput = measure_throughput(lab, hand, args.seconds, args.reps)
        throughput["wireguard_go"], throughput["mtu"] = wireguard_go, mtu
        print(f"failover: {args.rounds} rounds", flush=True)
        # Keep 20 s for `lab down` and the report.
        rounds = measure_failover(lab, args.rounds, began + args.budget * 60 - 20) \
            if args.rounds else []
    except BenchError as exc:
        print(f"egress benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(Exception):
            lab.cli("down", timeout=120)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report(throughput, rounds, args, load, time.monotonic() - began)
    measured = {r["mode"] for r in throughput["runs"] if r["mbps"] is not None}
    if not {"gateway", "direct", "hand"} <= measured or (args.rounds and not rounds):
        print("egress benchmark: could not measure everything (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
