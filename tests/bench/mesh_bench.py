"""Pod-to-pod throughput and latency across the meshgress WireGuard mesh, against a
hand-configured wireguard-go tunnel between two bare namespaces.

Run as root:  .venv/bin/python tests/bench/mesh_bench.py [--rounds 3] [--seconds 10]
                  [--pings 200] [--json FILE]

meshgress ("mesh"): a lab of two worker nodes and no gateway nodes
(`meshgress lab --name b<pid> up --nodes 2 --gateway-nodes 0`); `iperf3 -s` runs in the
network namespace of pod payments/app-node2 and the client in pod payments/app-node1, so
every packet takes the production path: pod veth → node (routing, the `inet meshgress`
leak guard) → meshgress0 (wireguard-go, MTU as the agent computed it: 1500 - 60 = 1440) →
underlay veth → the lab's bridge → the other node, and back out through its pod veth. The
node agents keep running meanwhile, as they would.

Baseline ("bare"): three throwaway namespaces `mgb-mesh-<pid>-{sw,a,b}` shaped like the
lab's underlay — a bridge in `sw`, `a` (192.0.2.1/24) and `b` (192.0.2.2/24) each on it
with a veth — and in `a` and `b` the same wireguard-go binary started the same way the
agent starts it (foreground, LOG_LEVEL=error, in a private mount namespace so its
/var/run/wireguard is its own), configured by hand with `wg set` (keys from `wg genkey`),
`wg0` with the same MTU and 198.18.250.1/24, .2/24. iperf3 and ping run directly in `a`
and `b`: no pod veth, no nftables, no forwarding. So mesh/bare isolates what meshgress
adds on top of wireguard-go.

Measurements, alternated (mesh, bare, mesh, bare, …) so the noise of this shared machine
hits both: TCP throughput (iperf3, one stream, `--seconds` long, the first second omitted
from the result), and latency (`--pings` pings at 10 ms intervals; p50/p99 of the
per-packet rtt). Both tunnels are warmed up (handshake done) before the first sample.
Reported: every sample, the medians, and mesh/bare for each (throughput: target ≥ 0.95),
and the CPU the lab's two node agents used during each mesh throughput sample (share of
one core, both together): on two cores it competes with wireguard-go and iperf3.

Everything is removed afterwards, also on failure: iperf3 servers and the baseline's
processes are stopped by PID, its namespaces deleted, the lab taken down. Leftovers of a
crashed run (its PID is gone) are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MESHGRESS = [sys.executable, "-m", "meshgress.cli"]
NETNS_DIR = Path("/run/netns")
LAB_ROOT = Path(os.environ.get("MESHGRESS_LAB_ROOT", "/run/meshgress-lab"))
BARE_PREFIX = "mgb-mesh-"
LEFTOVER_BARE = re.compile(rf"^{BARE_PREFIX}(\d+)-")
LAB_NAME = re.compile(r"^b(\d+)$")
IPERF_PORT = 5201
BARE_NET = "198.18.250"
UNDERLAY = "192.0.2"


def run(argv: list[str], *, check: bool = True, timeout: float = 120,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                          input=input_text, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes this run started, by PID: SIGTERM, then SIGKILL; reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if all(p.poll() is not None for p in procs):
            return


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- the two setups -------------------------------------------------------------------------


@dataclass
class Endpoints:
    """Where client and server run (argv prefixes) and the server's address."""

    name: str
    client: list[str]
    server: list[str]
    server_ip: str
    mtu: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    background: list[int] = field(default_factory=list)
    """PIDs whose CPU time is reported alongside (the lab's node agents)."""


@contextlib.contextmanager
def meshgress_lab(name: str) -> Iterator[Endpoints]:
    lab = [*MESHGRESS, "lab", "--name", name]
    try:
        run([*lab, "up", "--nodes", "2", "--gateway-nodes", "0"], timeout=240)
        status = json.loads(run([*lab, "status", "--json"]).stdout)
        pods = {(p["namespace"], p["name"]): p for p in status["pods"]}
        client = pods[("payments", "app-node1")]
        server = pods[("payments", "app-node2")]
        node_ns = next(n["netns"] for n in status["nodes"] if n["name"] == "node1")
        link = json.loads(run(["ip", "-n", node_ns, "-j", "link", "show", "meshgress0"]).stdout)
        record = json.loads((LAB_ROOT / name / "lab.json").read_text())
        yield Endpoints("mesh", ["nsenter", f"--net={NETNS_DIR / client['netns']}"],
                        ["nsenter", f"--net={NETNS_DIR / server['netns']}"],
                        server["address"], int(link[0]["mtu"]),
                        background=sorted(record["agents"].values()))
    finally:
        run([*lab, "down"], check=False, timeout=120)


def remove_bare(namespaces: list[str]) -> None:
    """Delete the namespaces' links (wireguard-go exits when its TUN goes), stop what is
    left in them by PID (only processes in namespaces this run created), delete them."""
    for ns in namespaces:
        out = run(["ip", "-n", ns, "-o", "link", "show"], check=False).stdout
        for line in out.splitlines():
            link = line.split(":")[1].strip().split("@")[0]
            if link != "lo":
                run(["ip", "-n", ns, "link", "del", link], check=False)
    for ns in namespaces:
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()
                if p.isdigit()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
                time.sleep(0.05)
        run(["ip", "netns", "delete", ns], check=False)


@contextlib.contextmanager
def bare_tunnel(prefix: str, mtu: int) -> Iterator[Endpoints]:
    sw, a, b = f"{prefix}sw", f"{prefix}a", f"{prefix}b"
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns in (sw, a, b):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", sw, "-batch", "-"], input_text="link add br0 type bridge\n"
                                                        "link set br0 up\n")
        for i, ns in enumerate((a, b), start=1):
            port = f"p{i}"
            run(["ip", "-n", sw, "-batch", "-"], input_text=(
                f"link add {port} type veth peer name eth0 netns {ns}\n"
                f"link set {port} master br0\nlink set {port} up\n"))
            run(["ip", "-n", ns, "-batch", "-"], input_text=(
                f"address add {UNDERLAY}.{i}/24 dev eth0\nlink set eth0 up\n"))
        anchors = {}
        for ns in (a, b):
            ready = workdir / f"{ns}.ready"
            script = ("set -e; mount -t tmpfs -o mode=0755,size=1m mgb-mesh /var/run/wireguard; "
                      f': > "{ready}"; exec sleep infinity')
            anchor = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / ns}", "unshare", "--mount", "--propagation",
                 "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            procs.append(anchor)
            deadline = time.monotonic() + 10
            while not ready.exists():
                if anchor.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{ns}: private mount namespace did not come up")
                time.sleep(0.02)
            anchors[ns] = anchor.pid
        keys = {}
        for ns in (a, b):
            private = run(["wg", "genkey"]).stdout.strip()
            public = run(["wg", "pubkey"], input_text=private + "\n").stdout.strip()
            (workdir / f"{ns}.key").write_text(private + "\n")
            os.chmod(workdir / f"{ns}.key", 0o600)
            keys[ns] = public
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        for i, (ns, other, other_i) in enumerate(((a, b, 2), (b, a, 1)), start=1):
            inside = ["nsenter", f"--target={anchors[ns]}", "--net", "--mount", "--"]
            wg_go = subprocess.Popen([*inside, "wireguard-go", "wg0"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(wg_go)
            deadline = time.monotonic() + 10
            while run([*inside, "wg", "show", "wg0"], check=False).returncode != 0:
                if wg_go.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{ns}: wireguard-go did not start")
                time.sleep(0.02)
            run([*inside, "wg", "set", "wg0", "private-key", str(workdir / f"{ns}.key"),
                 "listen-port", "51820", "peer", keys[other],
                 "endpoint", f"{UNDERLAY}.{other_i}:51820",
                 "allowed-ips", f"{BARE_NET}.{other_i}/32"])
            run(["ip", "-n", ns, "-batch", "-"], input_text=(
                f"address add {BARE_NET}.{i}/24 dev wg0\nlink set wg0 mtu {mtu}\n"
                "link set wg0 up\n"))
        yield Endpoints("bare", ["nsenter", f"--net={NETNS_DIR / a}"],
                        ["nsenter", f"--net={NETNS_DIR / b}"], f"{BARE_NET}.2", mtu, procs)
    finally:
        remove_bare([b, a, sw])
        stop(procs)
        shutil.rmtree(workdir, ignore_errors=True)


# --- measurements ---------------------------------------------------------------------------


def start_server(ep: Endpoints) -> None:
    server = subprocess.Popen([*ep.server, "iperf3", "-s", "-p", str(IPERF_PORT)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    ep.procs.append(server)
    deadline = time.monotonic() + 10
    while True:
        out = run([*ep.server, "ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False).stdout
        if out.strip():
            return
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{ep.name}: iperf3 server did not start")
        time.sleep(0.05)


def warm_up(ep: Endpoints) -> None:
    """Until the tunnel answers (the first packet triggers the handshake)."""
    proc = run([*ep.client, "ping", "-n", "-c", "3", "-i", "0.2", "-w", "15", ep.server_ip],
               check=False, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{ep.name}: {ep.server_ip} does not answer: {proc.stdout}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def throughput(ep: Endpoints, seconds: int) -> dict[str, float]:
    cpu_before, began = cpu_seconds(ep.background), time.monotonic()
    proc = run([*ep.client, "iperf3", "-c", ep.server_ip, "-p", str(IPERF_PORT), "-t",
                str(seconds), "-O", "1", "-J"], timeout=seconds + 60)
    background = (cpu_seconds(ep.background) - cpu_before) / (time.monotonic() - began)
    end = json.loads(proc.stdout)["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "agents_cpu": background}


def latency(ep: Endpoints, count: int) -> dict[str, float]:
    proc = run([*ep.client, "ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1",
                ep.server_ip], check=False, timeout=count * 0.05 + 60)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", proc.stdout)]
    if not rtts:
        raise RuntimeError(f"{ep.name}: no ping answers: {proc.stdout} {proc.stderr}")
    return {"p50_ms": statistics.median(rtts), "p99_ms": percentile(rtts, 99),
            "loss": 1 - len(rtts) / count}


def remove_leftovers() -> None:
    for name in sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else []:
        match = LEFTOVER_BARE.match(name)
        if match and not pid_alive(int(match.group(1))):
            remove_bare([name])
    labs = {p.name for p in LAB_ROOT.iterdir()} if LAB_ROOT.exists() else set()
    labs |= {n.split("-")[1] for n in (os.listdir(NETNS_DIR) if NETNS_DIR.exists() else [])
             if n.startswith("mg-b")}
    for lab in sorted(labs):
        match = LAB_NAME.match(lab)
        if match and not pid_alive(int(match.group(1))):
            run([*MESHGRESS, "lab", "--name", lab, "down"], check=False, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="samples of each, alternated")
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--json", help="also write the samples to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark creates network namespaces: run it as root")
    for tool in ("iperf3", "ping", "wg", "wireguard-go", "nsenter", "unshare", "ss"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    remove_leftovers()
    pid = os.getpid()
    lab_name = f"b{pid}"
    started = time.monotonic()
    load_before = loadavg()
    samples: dict[str, list[dict[str, float]]] = {"mesh": [], "bare": []}
    pings: dict[str, list[dict[str, float]]] = {"mesh": [], "bare": []}
    with meshgress_lab(lab_name) as mesh, \
            bare_tunnel(f"{BARE_PREFIX}{pid}-{secrets.token_hex(2)}-", mesh.mtu) as bare:
        try:
            for ep in (mesh, bare):
                start_server(ep)
                warm_up(ep)
            for _ in range(args.rounds):
                for ep in (mesh, bare):
                    samples[ep.name].append(throughput(ep, args.seconds))
                for ep in (mesh, bare):
                    pings[ep.name].append(latency(ep, args.pings))
        finally:
            stop(mesh.procs)
            stop([p for p in bare.procs if "iperf3" in str(p.args)])
    report(args, samples, pings, mtu=mesh.mtu, load_before=load_before,
           wall=time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": samples, "latency": pings},
                                              indent=2) + "\n")
    return 0


def report(args: argparse.Namespace, samples: dict[str, list[dict[str, float]]],
           pings: dict[str, list[dict[str, float]]], *, mtu: int, load_before: str,
           wall: float) -> None:
    print(f"WireGuard mesh data path: meshgress lab (pod → pod across two nodes) against a "
          f"hand-configured wireguard-go tunnel (bare); MTU {mtu}; wireguard-go "
          f"{_version()}; {os.cpu_count()} CPUs, kernel {platform.release()}; "
          f"load average {load_before} → {loadavg()}; {wall:.0f}s in all")
    print(f"command: .venv/bin/python tests/bench/mesh_bench.py --rounds {args.rounds} "
          f"--seconds {args.seconds} --pings {args.pings}")
    print()
    header = f"{'round':<7}{'setup':<6}{'TCP Gbit/s':>11}{'retrans':>9}" \
             f"{'rtt p50':>10}{'rtt p99':>10}{'loss':>7}{'agents CPU':>12}"
    print(header)
    print("-" * len(header))
    for i in range(args.rounds):
        for name in ("mesh", "bare"):
            t, p = samples[name][i], pings[name][i]
            print(f"{i + 1:<7}{name:<6}{t['gbps']:>11.3f}{t['retransmits']:>9.0f}"
                  f"{p['p50_ms']:>8.3f}ms{p['p99_ms']:>8.3f}ms{p['loss']:>6.1%}"
                  + (f"{t['agents_cpu']:>11.1%}" if name == "mesh" else f"{'-':>12}"))
    print("-" * len(header))
    med = {name: {"gbps": statistics.median(s["gbps"] for s in samples[name]),
                  "p50": statistics.median(p["p50_ms"] for p in pings[name]),
                  "p99": statistics.median(p["p99_ms"] for p in pings[name])}
           for name in ("mesh", "bare")}
    for name in ("mesh", "bare"):
        print(f"{'median':<7}{name:<6}{med[name]['gbps']:>11.3f}{'':>9}"
              f"{med[name]['p50']:>8.3f}ms{med[name]['p99']:>8.3f}ms")
    print()
    ratio = med["mesh"]["gbps"] / med["bare"]["gbps"]
    paired = statistics.median(m["gbps"] / b["gbps"]
                               for m, b in zip(samples["mesh"], samples["bare"], strict=True))
    print(f"mesh/bare throughput: {ratio:.3f} (median of medians; per-round pairs: "
          f"{paired:.3f})  target >= 0.95: {'ok' if ratio >= 0.95 else 'MISSED'}")
    print(f"mesh/bare latency:    p50 {med['mesh']['p50'] / med['bare']['p50']:.3f}  "
          f"p99 {med['mesh']['p99'] / med['bare']['p99']:.3f}  (above 1: the mesh is slower)")


def _version() -> str:
    with contextlib.suppress(Exception):
        out = run(["wireguard-go", "--version"], check=False).stdout
        found = re.search(r"v[\d.]+", out)
        if found:
            return found.group(0)
    return "?"


if __name__ == "__main__":
    sys.exit(main())
