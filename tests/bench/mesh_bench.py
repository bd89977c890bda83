"""Pod-to-pod throughput and latency across the meshgress WireGuard mesh, against the
same datapath built by hand.

Run as root:  .venv/bin/python tests/bench/mesh_bench.py [--rounds 3] [--seconds 10]
                  [--pings 500] [--wireguard-go PATH] [--also-wireguard-go PATH]
                  [--json FILE]

meshgress ("mesh"): a lab of two worker nodes and no gateway nodes (`meshgress lab --name
b<pid> up --nodes 2 --gateway-nodes 0 --wireguard-go PATH`); `iperf3 -s` runs in the
network namespace of pod payments/app-node2 and the client in pod payments/app-node1, so
every packet takes the production path: pod veth → node (routing, the `inet meshgress`
table) → meshgress0 (wireguard-go, MTU as the agent computed it: 1500 - 60 = 1440) →
underlay veth → the lab's bridge → the other node, and back out through its pod veth. The
node agents keep running meanwhile, as they would.

The baseline ("hand"): the same datapath built by this script with `ip`, `wg` and `nft`,
no meshgress code running. Throwaway namespaces `mgb-mesh-<pid>-<rand>-{sw,a,b,pa,pb}`
shaped like the lab: a bridge in `sw`; nodes `a` (192.0.2.1/24) and `b` (192.0.2.2/24),
each on it with a veth; in `a` and `b` the same wireguard-go program started the way the
agent starts it (foreground, in a private mount namespace so /var/run/wireguard is its
own), configured with `wg set` (keys from `wg genkey`): `wg0`, the same MTU, one peer
each; and behind each node a pod (`pa`: 198.18.250.66/32, `pb`: .130/32) wired the way
the CNI plugin wires one: a routed veth with the same MTU, a /32 route to the pod,
default route via 169.254.1.1 (on the node's loopback) answered by proxy ARP, rp_filter
strict, forwarding on.

Connection tracking is on in both, as kube-proxy has it on every Kubernetes node: each
node of both datapaths gets the same stand-in for kube-proxy's nftables (KUBE_PROXY: NAT
hooks with a Service map lookup, the masquerade-by-mark rule, a forward filter on
conntrack state) for each of its samples, removed after it. So mesh/hand is what
meshgress costs on top of a routed CNI with kube-proxy: its own table's rules, its
processes, nothing else.

Setups, all sampled in every round:
- mesh: the lab, as above;
- hand: the hand-built datapath (the target's baseline: mesh/hand >= 0.95 for TCP
  throughput, rtt p50 and p99 within 10 %);
- hand+mg: hand with the lab node's own `inet meshgress` table loaded as well (read from
  the running lab, cluster range and interface names rewritten to the baseline's): the
  breakdown, hand+mg/hand the table's cost, mesh/hand+mg what is left (the agents, the
  lab's other differences);
- bare: iperf3 and ping between the baseline's nodes `a` and `b` themselves, no pod hops,
  no nftables: the old bare-tunnel line (mesh/bare), and hand/bare the pod hops' cost;
- hand@NAME, with `--also-wireguard-go PATH`: a second hand-built datapath running that
  program (NAME its version): the two wireguard-go releases side by side.

Measurements, in rounds: each round samples every setup once, in an order rotated from
round to round (so none always runs first or last on this shared, noisy machine): TCP
throughput (iperf3, one stream, `--seconds` long, the first second omitted from the
result), then latency (`--pings` pings at 10 ms intervals; p50/p99 of the per-packet
rtt). Every tunnel is warmed up (handshake done) before the first sample. Reported: every
sample, the medians, the ratios of the medians and the median of the per-round ratios,
the CPU the lab's two node agents used during each mesh throughput sample (share of one
core, both together), the load average before every round; and last one JSON line
({"bench": "mesh", ...}) with the ratios and figures.

Everything is removed afterwards, also on failure: iperf3 servers and the baseline's
processes are stopped by PID, its namespaces deleted, the lab taken down. Leftovers of a
crashed run (its PID is gone) are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from meshgress.lab.netns import pid_alive  # noqa: E402 - after the path is set
from tests.bench.handbuilt import (  # noqa: E402
    KUBE_PROXY,
    NETNS_DIR,
    HandBuilt,
    delete_tables,
    in_netns,
    load_ruleset,
    stop,
)
from tests.bench.handbuilt import remove_leftovers as remove_hand_built_leftovers  # noqa: E402

MESHGRESS = [sys.executable, "-m", "meshgress.cli"]
LAB_ROOT = Path(os.environ.get("MESHGRESS_LAB_ROOT", "/run/meshgress-lab"))
BARE_PREFIX = "mgb-mesh-"
LAB_NAME = re.compile(r"^b(\d+)$")
IPERF_PORT = 5201
BARE_NET = "198.18.250"
ALT_NET = "198.18.251"
UNDERLAY = "192.0.2"
RTT_TARGET = 1.10
THROUGHPUT_TARGET = 0.95

def run(argv: list[str], *, check: bool = True, timeout: float = 120,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                          input=input_text, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


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
    rulesets: tuple[str, ...] = ()
    """nftables tables loaded into `ruleset_netns` for each sample of this setup, and
    deleted again afterwards."""
    ruleset_netns: list[str] = field(default_factory=list)
    """The setup's two node namespaces."""
    live_table: str | None = None
    """The lab only: node1's `inet meshgress` table as the agent programmed it."""
    wireguard_go: str = ""

    @contextlib.contextmanager
    def sample(self) -> Iterator[None]:
        for ns in self.ruleset_netns:
            for ruleset in self.rulesets:
                load_ruleset(ns, ruleset)
        try:
            yield
        finally:
            for ns in self.ruleset_netns:
                for ruleset in self.rulesets:
                    delete_tables(ns, ruleset)


@contextlib.contextmanager
def meshgress_lab(name: str, wireguard_go: str) -> Iterator[Endpoints]:
    lab = [*MESHGRESS, "lab", "--name", name]
    try:
        run([*lab, "up", "--nodes", "2", "--gateway-nodes", "0", "--wireguard-go",
             wireguard_go], timeout=240)
        status = json.loads(run([*lab, "status", "--json"]).stdout)
        pods = {(p["namespace"], p["name"]): p for p in status["pods"]}
        client = pods[("payments", "app-node1")]
        server = pods[("payments", "app-node2")]
        node_ns = next(n["netns"] for n in status["nodes"] if n["name"] == "node1")
        nodes = [n["netns"] for n in status["nodes"] if n["name"] in ("node1", "node2")]
        link = json.loads(run(["ip", "-n", node_ns, "-j", "link", "show", "meshgress0"]).stdout)
        record = json.loads((LAB_ROOT / name / "lab.json").read_text())
        table = run(["nsenter", f"--net={NETNS_DIR / node_ns}", "nft", "list", "table",
                     "inet", "meshgress"]).stdout
        yield Endpoints("mesh", ["nsenter", f"--net={NETNS_DIR / client['netns']}"],
                        ["nsenter", f"--net={NETNS_DIR / server['netns']}"],
                        server["address"], int(link[0]["mtu"]),
                        background=sorted(record["agents"].values()), live_table=table,
                        rulesets=(KUBE_PROXY,), ruleset_netns=nodes,
                        wireguard_go=record.get("wireguard_go") or wireguard_go)
    finally:
        run([*lab, "down"], check=False, timeout=120)


POD_HOST = {1: 66, 2: 130}
"""The baseline's pod address per node: .66 behind a, .130 behind b."""


@contextlib.contextmanager
def bare_tunnel(prefix: str, mtu: int, wireguard_go: str, net: str = BARE_NET
                ) -> Iterator[tuple[Endpoints, Endpoints]]:
    """The hand-built datapath; yields two ways across it: between the tunnel namespaces
    themselves ("bare", no tables) and between a pod behind each ("hand", with the
    kube-proxy stand-in)."""
    with HandBuilt(prefix) as built:
        sw = built.bridge("sw")
        a, b = built.netns("a"), built.netns("b")
        for i, ns in enumerate((a, b), start=1):
            built.attach(sw, ns, f"p{i}", f"{UNDERLAY}.{i}/24")
        keys = {ns: built.keypair(ns) for ns in (a, b)}
        for i, (ns, other, other_i) in enumerate(((a, b, 2), (b, a, 1)), start=1):
            built.wireguard(ns, "wg0", wireguard_go, key=keys[ns][0], port=51820, mtu=mtu,
                            address=f"{net}.{i}/24", peer=keys[other][1],
                            endpoint=f"{UNDERLAY}.{other_i}:51820",
                            allowed_ips=f"{net}.{other_i}/32,{net}.{POD_HOST[other_i]}/32")
        pa = built.pod(a, "pa", "pod1", f"{net}.{POD_HOST[1]}", mtu)
        pb = built.pod(b, "pb", "pod2", f"{net}.{POD_HOST[2]}", mtu)
        yield (Endpoints("bare", in_netns(a), in_netns(b), f"{net}.2", mtu, built.procs,
                         wireguard_go=wireguard_go),
               Endpoints("hand", in_netns(pa), in_netns(pb), f"{net}.{POD_HOST[2]}", mtu,
                         built.procs, rulesets=(KUBE_PROXY,), ruleset_netns=[a, b],
                         wireguard_go=wireguard_go))


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
    with ep.sample():
        proc = run([*ep.client, "iperf3", "-c", ep.server_ip, "-p", str(IPERF_PORT), "-t",
                    str(seconds), "-O", "1", "-J"], timeout=seconds + 60)
    background = (cpu_seconds(ep.background) - cpu_before) / (time.monotonic() - began)
    end = json.loads(proc.stdout)["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "agents_cpu": background}


def latency(ep: Endpoints, count: int) -> dict[str, float]:
    with ep.sample():
        proc = run([*ep.client, "ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1",
                    ep.server_ip], check=False, timeout=count * 0.05 + 60)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", proc.stdout)]
    if not rtts:
        raise RuntimeError(f"{ep.name}: no ping answers: {proc.stdout} {proc.stderr}")
    return {"p50_ms": statistics.median(rtts), "p99_ms": percentile(rtts, 99),
            "loss": 1 - len(rtts) / count}


def inotify_instances_free() -> tuple[int, int]:
    """(free, limit) inotify instances for root. wireguard-go needs one to serve its
    UAPI socket and fails with "too many open files" without it; orphaned wireguard-go
    processes (interfaces in namespaces whose names were deleted) keep theirs forever."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    used = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if proc.stat().st_uid != 0:
                continue
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == "anon_inode:inotify":
                        used += 1
    return limit - used, limit


def baseline_ruleset(table: str) -> str:
    """The lab node's `inet meshgress` table, for the baseline's nodes: the same rules,
    with the baseline's cluster range and interface names."""
    from meshgress.lab.topology import CLUSTER_POD_CIDR

    return (table.replace(str(CLUSTER_POD_CIDR), f"{BARE_NET}.0/24")
            .replace('"meshgress0"', '"wg0"').replace('"mgc*"', '"pod*"'))


def remove_leftovers() -> None:
    remove_hand_built_leftovers(BARE_PREFIX)
    labs = {p.name for p in LAB_ROOT.iterdir()} if LAB_ROOT.exists() else set()
    labs |= {n.split("-")[1] for n in (os.listdir(NETNS_DIR) if NETNS_DIR.exists() else [])
             if n.startswith("mg-b")}
    for lab in sorted(labs):
        match = LAB_NAME.match(lab)
        if match and not pid_alive(int(match.group(1))):
            run([*MESHGRESS, "lab", "--name", lab, "down"], check=False, timeout=120)


def wireguard_go_version(program: str) -> str:
    out = run([program, "--version"], check=False).stdout
    found = re.search(r"v[\d.]+", out)
    return found.group(0) if found else "?"


def main() -> int:
    from meshgress.binaries import default_wireguard_go

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each samples every setup once, in a rotated order")
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--wireguard-go", default=None, metavar="PATH",
                        help="the wireguard-go of the lab and the baselines (default: what the "
                             "agent runs by default: the cached current build, else PATH's)")
    parser.add_argument("--also-wireguard-go", metavar="PATH",
                        help="add a second hand-built datapath running this wireguard-go")
    parser.add_argument("--json", help="also write the samples to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark creates network namespaces: run it as root")
    wireguard_go = shutil.which(args.wireguard_go or default_wireguard_go())
    if wireguard_go is None:
        sys.exit(f"no wireguard-go: {args.wireguard_go or default_wireguard_go()}")
    also = shutil.which(args.also_wireguard_go) if args.also_wireguard_go else None
    if args.also_wireguard_go and also is None:
        sys.exit(f"--also-wireguard-go {args.also_wireguard_go}: no such program")
    for tool in ("iperf3", "ping", "wg", "nsenter", "unshare", "ss", "nft"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    remove_leftovers()
    free, limit = inotify_instances_free()
    if free < 8:
        orphans = run(["pgrep", "-c", "-P", "1", "-x", "wireguard-go"], check=False).stdout
        sys.exit(f"only {free} of root's {limit} inotify instances are free "
                 "(fs.inotify.max_user_instances); wireguard-go needs one per interface. "
                 f"{orphans.strip() or 0} wireguard-go processes are orphaned (parent 1): "
                 "stop the ones that are no longer wanted, then run this again")
    pid = os.getpid()
    started = time.monotonic()
    load_before = loadavg()
    loads: list[str] = []
    samples: dict[str, list[dict[str, float]]] = {}
    pings: dict[str, list[dict[str, float]]] = {}
    versions = {wireguard_go: wireguard_go_version(wireguard_go)}
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(meshgress_lab(f"b{pid}", wireguard_go))
        bare, hand = stack.enter_context(bare_tunnel(
            f"{BARE_PREFIX}{pid}-{secrets.token_hex(2)}-", mesh.mtu, wireguard_go))
        assert mesh.live_table is not None
        hand_mg = dataclasses.replace(
            hand, name="hand+mg", rulesets=(*hand.rulesets, baseline_ruleset(mesh.live_table)))
        setups = [mesh, hand, hand_mg, bare]
        servers = [mesh, hand, bare]  # one iperf3 server per pair of endpoints
        if also is not None:
            versions[also] = wireguard_go_version(also)
            _, alt = stack.enter_context(bare_tunnel(
                f"{BARE_PREFIX}{pid}-{secrets.token_hex(2)}-", mesh.mtu, also, ALT_NET))
            alt.name = f"hand@{versions[also]}"
            setups.append(alt)
            servers.append(alt)
        try:
            for ep in servers:
                start_server(ep)
            for ep in setups:
                samples[ep.name], pings[ep.name] = [], []
                warm_up(ep)
            for r in range(args.rounds):
                loads.append(loadavg())
                print(f"round {r + 1}/{args.rounds}: load average {loads[-1]}", flush=True)
                # A different order each round, so no setup always runs first or last.
                order = setups[r % len(setups):] + setups[:r % len(setups)]
                for ep in order:
                    samples[ep.name].append(throughput(ep, args.seconds))
                for ep in order:
                    pings[ep.name].append(latency(ep, args.pings))
        finally:
            for ep in setups:
                stop([p for p in ep.procs if "iperf3" in str(p.args)])
    names = [ep.name for ep in setups]
    report(args, names, samples, pings, mtu=mesh.mtu, load_before=load_before, loads=loads,
           wall=time.monotonic() - started,
           programs={ep.name: f"{ep.wireguard_go} ({versions.get(ep.wireguard_go, '?')})"
                     for ep in setups})
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": samples, "latency": pings},
                                              indent=2) + "\n")
    return 0


def report(args: argparse.Namespace, names: list[str],
           samples: dict[str, list[dict[str, float]]],
           pings: dict[str, list[dict[str, float]]], *, mtu: int, load_before: str,
           loads: list[str], wall: float, programs: dict[str, str]) -> None:
    print()
    print("WireGuard mesh data path, pod to pod across two nodes: mesh = the meshgress lab; "
          "hand = the same datapath built by hand (pod veths, /32 routes, proxy ARP, "
          "forwarding, wireguard-go, kube-proxy's conntrack); hand+mg = hand with the lab "
          "node's inet meshgress table; bare = the hand-built tunnel end to end, no pod hops "
          "and no nftables")
    print(f"MTU {mtu}; {os.cpu_count()} CPUs, kernel {platform.release()}; load average "
          f"{load_before} at start, {' / '.join(loads)} before each round, {loadavg()} at "
          f"the end; {wall:.0f}s in all")
    for name, program in programs.items():
        print(f"  {name}: wireguard-go {program}")
    print(f"command: .venv/bin/python {' '.join(sys.argv)}")
    print()
    width = max(9, *(len(n) + 2 for n in names))
    header = f"{'round':<7}{'setup':<{width}}{'TCP Gbit/s':>11}{'retrans':>9}" \
             f"{'rtt p50':>10}{'rtt p99':>10}{'loss':>7}{'agents CPU':>12}"
    print(header)
    print("-" * len(header))
    for i in range(args.rounds):
        for name in names:
            t, p = samples[name][i], pings[name][i]
            print(f"{i + 1:<7}{name:<{width}}{t['gbps']:>11.3f}{t['retransmits']:>9.0f}"
                  f"{p['p50_ms']:>8.3f}ms{p['p99_ms']:>8.3f}ms{p['loss']:>6.1%}"
                  + (f"{t['agents_cpu']:>11.1%}" if name == "mesh" else f"{'-':>12}"))
    print("-" * len(header))
    med = {name: {"gbps": statistics.median(s["gbps"] for s in samples[name]),
                  "p50_ms": statistics.median(p["p50_ms"] for p in pings[name]),
                  "p99_ms": statistics.median(p["p99_ms"] for p in pings[name])}
           for name in names}
    for name in names:
        print(f"{'median':<7}{name:<{width}}{med[name]['gbps']:>11.3f}{'':>9}"
              f"{med[name]['p50_ms']:>8.3f}ms{med[name]['p99_ms']:>8.3f}ms")
    print()
    print("ratios (throughput: of the medians, and the median of per-round pairs; latency: "
          "of the medians, above 1 = slower)")
    pairs = [("mesh", "hand", "meshgress against the same datapath built by hand"),
             ("mesh", "bare", "meshgress against the bare tunnel (no pod hops, no nftables)"),
             ("hand+mg", "hand", "breakdown: the inet meshgress table's rules"),
             ("mesh", "hand+mg", "breakdown: the rest (the agents, the lab)"),
             ("hand", "bare", "the pod hops, forwarding and kube-proxy's conntrack alone")]
    pairs += [(n, "hand", f"another wireguard-go in the hand-built datapath ({programs[n]})")
              for n in names if n.startswith("hand@")]
    ratios: dict[str, dict[str, float]] = {}
    for top, bottom, what in pairs:
        ratio = {"throughput": med[top]["gbps"] / med[bottom]["gbps"],
                 "throughput_pairs": statistics.median(
                     x["gbps"] / y["gbps"]
                     for x, y in zip(samples[top], samples[bottom], strict=True)),
                 "p50": med[top]["p50_ms"] / med[bottom]["p50_ms"],
                 "p99": med[top]["p99_ms"] / med[bottom]["p99_ms"]}
        ratios[f"{top}/{bottom}"] = ratio
        target = ""
        if (top, bottom) == ("mesh", "hand"):
            target = (f"  targets (throughput >= {THROUGHPUT_TARGET}, rtt <= {RTT_TARGET}): "
                      f"{'met' if targets_met(ratio) else 'MISSED'}")
        print(f"  {top + '/' + bottom:<18} throughput {ratio['throughput']:.3f} (pairs "
              f"{ratio['throughput_pairs']:.3f})  rtt p50 {ratio['p50']:.3f}  p99 "
              f"{ratio['p99']:.3f}  - {what}{target}")
    agents = [s["agents_cpu"] for s in samples["mesh"]]
    print(f"  the two agents' CPU during the mesh throughput samples: median "
          f"{statistics.median(agents):.2%} of a core")
    print(json.dumps({
        "bench": "mesh", "rounds": args.rounds, "seconds": args.seconds, "pings": args.pings,
        "mtu": mtu, "load": {"start": load_before, "rounds": loads, "end": loadavg()},
        "wireguard_go": programs, "median": med, "ratios": ratios,
        "agents_cpu_median": statistics.median(agents),
        "targets_met": targets_met(ratios["mesh/hand"]),
    }, sort_keys=True))


def targets_met(ratio: dict[str, float]) -> bool:
    return ratio["throughput"] >= THROUGHPUT_TARGET and ratio["p50"] <= RTT_TARGET \
        and ratio["p99"] <= RTT_TARGET


if __name__ == "__main__":
    sys.exit(main())
