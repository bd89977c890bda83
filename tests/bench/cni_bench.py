"""CNI ADD/DEL latency and throughput: meshgress-cni against Debian's bridge + host-local.

Run as root:  .venv/bin/python tests/bench/cni_bench.py [--pods 200] [--concurrency 20]
              [--rounds 1]

Both plugins are invoked exactly the same way, the way a container runtime does it: a
new plugin process per operation, CNI_* environment variables, the network configuration
on stdin, the result read from stdout, timed from spawn to exit with time.perf_counter.
meshgress-cni is the installed launcher (`cni.install.install_plugin`) talking to a CNI
server (`python -m cni.server`) that runs for the whole benchmark, as the agent would;
bridge delegates to host-local (its data directory in a temporary directory).

Both plugins run side by side in one throwaway "node" namespace (`mgb-<run>-node`,
entered by re-executing this script under `nsenter --net=`, so the plugins' host side
lands there; meshgress uses 198.18.0.0/24 and mgc* veths, bridge 198.19.0.0/16 on
mgbbr0); pods are throwaway namespaces created before timing. The plugins' operations
are interleaved so both see the same machine (this one is shared and noisy): after a short
warm-up, pod i of each plugin is ADDed in turn, one at a time, then DELeted the same way;
then batches of C pods are ADDed (and DELeted) at once, alternating plugins batch by
batch. Reported: p50/p99 latency per operation and pods per second (N / summed wall time
of the plugin's ADDs); with `--rounds N`, all of it N times (each round in a fresh node
namespace with a fresh server), then each round's ADD p50 ratio and their median.
Everything is removed afterwards, also on failure; leftover `mgb-` namespaces of a crashed
run are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PREFIX = "mgb-"
NETNS_DIR = Path("/run/netns")
CNI_BIN = Path("/usr/lib/cni")
PATH_ENV = "/usr/sbin:/usr/bin:/sbin:/bin"
WARMUP = 5


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stderr or proc.stdout}")
    return proc


def list_netns(prefix: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    return []


def delete_netns(names: list[str]) -> None:
    if names:
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns delete {n}\n" for n in names),
                       capture_output=True, text=True, check=False)


def create_netns(names: list[str]) -> None:
    run_batch = subprocess.run(["ip", "-batch", "-"],
                               input="".join(f"netns add {n}\n" for n in names),
                               capture_output=True, text=True, check=False)
    if run_batch.returncode != 0:
        raise RuntimeError(f"creating namespaces: {run_batch.stderr}")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Phase:
    plugin: str
    phase: str
    add: list[float]
    delete: list[float]
    add_wall: float

    @property
    def pods_per_second(self) -> float:
        return len(self.add) / self.add_wall

    def row(self) -> dict[str, float | str]:
        return {
            "plugin": self.plugin, "phase": self.phase, "pods": len(self.add),
            "add_p50_ms": statistics.median(self.add) * 1e3,
            "add_p99_ms": percentile(self.add, 99) * 1e3,
            "del_p50_ms": statistics.median(self.delete) * 1e3,
            "del_p99_ms": percentile(self.delete, 99) * 1e3,
            "pods_per_s": self.pods_per_second,
        }


class Plugin:
    """One CNI plugin as a runtime sees it: a binary, a configuration, an environment."""

    def __init__(self, name: str, binary: Path, config: dict) -> None:
        self.name = name
        self.binary = str(binary)
        self.config = json.dumps(config).encode()

    def invoke(self, command: str, container_id: str, netns: str) -> float:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": str(NETNS_DIR / netns), "CNI_IFNAME": "eth0",
               "CNI_PATH": str(CNI_BIN), "PATH": PATH_ENV,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container_id}"}
        start = time.perf_counter()
        proc = subprocess.run([self.binary], input=self.config, env=env, capture_output=True,
                              check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} {command} {container_id}: {proc.stdout!r} "
                               f"{proc.stderr!r}")
        return elapsed


@dataclass
class Run:
    """One plugin's share of a phase: its pods and latencies."""

    plugin: Plugin
    pods: list[str]
    tag: str
    add: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)
    add_wall: float = 0.0

    def ids(self) -> list[str]:
        return [f"{self.tag}-{i}" for i in range(len(self.pods))]


def interleaved_sequential(runs: list[Run]) -> None:
    """Pod i of every plugin, then pod i+1 of every plugin: both see the same machine."""
    for command in ("ADD", "DEL"):
        for i in range(len(runs[0].pods)):
            for run_ in runs:
                elapsed = run_.plugin.invoke(command, run_.ids()[i], run_.pods[i])
                if command == "ADD":
                    run_.add.append(elapsed)
                    run_.add_wall += elapsed
                else:
                    run_.delete.append(elapsed)


def interleaved_concurrent(runs: list[Run], workers: int) -> None:
    """Batches of `workers` pods at once, alternating between plugins batch by batch."""
    with ThreadPoolExecutor(workers) as pool:
        for command in ("ADD", "DEL"):
            for start in range(0, len(runs[0].pods), workers):
                for run_ in runs:
                    batch = list(zip(run_.ids()[start:start + workers],
                                     run_.pods[start:start + workers], strict=True))
                    began = time.perf_counter()
                    samples = list(pool.map(
                        lambda cp, r=run_, c=command: r.plugin.invoke(c, *cp), batch))
                    wall = time.perf_counter() - began
                    if command == "ADD":
                        run_.add += samples
                        run_.add_wall += wall
                    else:
                        run_.delete += samples


@contextlib.contextmanager
def meshgress_server(workdir: Path) -> Iterator[Plugin]:
    from cni.install import install_plugin

    launcher = install_plugin(workdir / "bin")
    socket_path = workdir / "cni.sock"
    log = (workdir / "server.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "cni.server", "--socket", str(socket_path),
         "--pod-cidr", "198.18.0.0/24", "--state-dir", str(workdir / "state")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                log_text = (workdir / "server.log").read_text()
                raise RuntimeError(f"CNI server did not start: {log_text}")
            time.sleep(0.02)
        yield Plugin("meshgress", launcher, {"cniVersion": "1.0.0", "name": "mgbench",
                                             "type": "meshgress-cni", "socket": str(socket_path),
                                             "deleteQueue": str(workdir / "state" /
                                                                "delete-queue")})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@contextlib.contextmanager
def reference_plugin(workdir: Path) -> Iterator[Plugin]:
    yield Plugin("bridge+host-local", CNI_BIN / "bridge", {
        "cniVersion": "1.0.0", "name": "mgbref", "type": "bridge", "bridge": "mgbbr0",
        "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": "198.19.0.0/16",
                 "dataDir": str(workdir / "host-local"), "routes": [{"dst": "0.0.0.0/0"}]},
    })


PLUGINS: dict[str, Callable[[Path], contextlib.AbstractContextManager[Plugin]]] = {
    "meshgress": meshgress_server,
    "reference": reference_plugin,
}


def inner(args: argparse.Namespace) -> int:
    """Inside the node namespace: measure both plugins, interleaved; print rows as JSON."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{args.run}-"))
    pods = {name: [f"{PREFIX}{args.run}-{name[:3]}-p{i}" for i in range(args.pods)]
            for name in PLUGINS}
    try:
        create_netns([pod for names in pods.values() for pod in names])
        with contextlib.ExitStack() as stack:
            plugins = {name: stack.enter_context(make(workdir)) for name, make in PLUGINS.items()}

            def runs(tag: str, count: int) -> list[Run]:
                return [Run(plugin, pods[name][:count], tag) for name, plugin in plugins.items()]

            interleaved_sequential(runs("w", WARMUP))
            sequential, concurrent = runs("s", args.pods), runs("c", args.pods)
            interleaved_sequential(sequential)
            interleaved_concurrent(concurrent, args.concurrency)
        rows = [Phase(r.plugin.name, "sequential", r.add, r.delete, r.add_wall).row()
                for r in sequential]
        rows += [Phase(r.plugin.name, f"{args.concurrency}-way", r.add, r.delete,
                       r.add_wall).row() for r in concurrent]
        print(json.dumps(rows))
    finally:
        delete_netns([pod for names in pods.values() for pod in names])
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit("the benchmark creates network namespaces: run it as root")
    delete_netns(list_netns(PREFIX))  # leftovers of a crashed run
    rounds = []
    for number in range(1, args.rounds + 1):
        rows = measure(args)
        report(rows, args, f"round {number} of {args.rounds}" if args.rounds > 1 else "")
        rounds.append(rows)
    if args.rounds > 1:
        summarise(rounds, args)
    phases = ("sequential", f"{args.concurrency}-way")
    per_round = {phase: [compute_ratios(rows, phase)["add_p50_ms"] for rows in rounds]
                 for phase in phases}
    print(json.dumps({"bench": "cni", "pods": args.pods, "concurrency": args.concurrency,
                      "add_p50_ratio_rounds": per_round,
                      "add_p50_ratio_median": {p: statistics.median(r)
                                               for p, r in per_round.items()},
                      "rows": rounds[-1]}, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rounds if args.rounds > 1 else rounds[0],
                                              indent=2) + "\n")
    return 0


def measure(args: argparse.Namespace) -> list[dict]:
    """One round: a fresh node namespace, both plugins measured by the inner process."""
    run_id = secrets.token_hex(2)
    node = f"{PREFIX}{run_id}-node"
    try:
        create_netns([node])
        run(["ip", "-n", node, "link", "set", "lo", "up"])
        proc = subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / node}", sys.executable, __file__, "--inner",
             "--run", run_id, "--pods", str(args.pods), "--concurrency", str(args.concurrency)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        delete_netns(list_netns(f"{PREFIX}{run_id}-"))


def compute_ratios(rows: list[dict], phase: str) -> dict[str, float]:
    by = {(r["plugin"], r["phase"]): r for r in rows}
    ours, ref = by[("meshgress", phase)], by[("bridge+host-local", phase)]
    return {k: ours[k] / ref[k] for k in ("add_p50_ms", "add_p99_ms", "del_p50_ms",
                                          "pods_per_s")}


def report(rows: list[dict], args: argparse.Namespace, title: str = "") -> None:
    from cni.install import _default_python

    shim_python = Path(_default_python()).resolve().name
    print(f"CNI benchmark{' (' + title + ')' if title else ''}: {args.pods} pods, sequential "
          f"and {args.concurrency}-way concurrent; {os.cpu_count()} CPUs, kernel "
          f"{platform.release()}; server on Python {platform.python_version()}, shim on "
          f"{shim_python}")
    header = (f"{'plugin':<19}{'phase':<12}{'ADD p50':>9}{'ADD p99':>9}{'DEL p50':>9}"
              f"{'DEL p99':>9}{'pods/s':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['plugin']:<19}{row['phase']:<12}{row['add_p50_ms']:>7.2f}ms"
              f"{row['add_p99_ms']:>7.2f}ms{row['del_p50_ms']:>7.2f}ms{row['del_p99_ms']:>7.2f}ms"
              f"{row['pods_per_s']:>8.1f}")
    print()
    for phase in ("sequential", f"{args.concurrency}-way"):
        ratio = compute_ratios(rows, phase)
        print(f"meshgress/reference {phase:<11}: ADD p50 {ratio['add_p50_ms']:.2f}"
              f"  ADD p99 {ratio['add_p99_ms']:.2f}  DEL p50 {ratio['del_p50_ms']:.2f}"
              f"  pods/s {ratio['pods_per_s']:.2f}")
    print()


def summarise(rounds: list[list[dict]], args: argparse.Namespace) -> None:
    """Each round's ADD p50 ratios, then their median: one round on a shared machine can
    be off by 10% either way."""
    for phase in ("sequential", f"{args.concurrency}-way"):
        ratios = [compute_ratios(rows, phase)["add_p50_ms"] for rows in rounds]
        print(f"ADD p50 meshgress/reference {phase:<11}: rounds "
              + " ".join(f"{r:.2f}" for r in ratios)
              + f"; median {statistics.median(ratios):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole measurement; report each round and the median")
    parser.add_argument("--json", help="also write the rows (a list per round) to this file")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
