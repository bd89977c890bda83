"""Control-plane scale: the agent's mesh reconcile against 1,000 and 5,000 simulated nodes.

Run as root:  .venv/bin/python tests/bench/scale_bench.py [--sizes 1000,5000]
                  [--datastore file|kube|file,kube] [--timeout 240] [--profile DIR]
                  [--json FILE]

With `--datastore kube` the nodes live in a real etcd + kube-apiserver (watch cache on),
started in the run's own network namespace and populated before the run through the kube
backend; the agent's side reads them through `KubeDatastore` (list, then a watch with
bookmarks), exactly as on the file backend. The variant column then reads `as-is/kube`.

What is measured is the node agent's own mesh path, with the real code at every step:
a FileDatastore holding N Node objects (spec.podCIDRs: one /28 each out of 198.18.0.0/15,
which has 8,192 of them; a valid WireGuard public key and an endpoint in 203.0.113.0/24 in
the annotations — nothing is ever sent there: no keepalive, no traffic) is read by the
real `Informer` (list, then watch), the objects go through the agent's `NodeParseCache`
(`parse_node` for the ones that changed), `compute_mesh` computes the device and routes,
and `nodeagent.tracker.apply_device_tracked` (the userspace backend
`detect_backend("userspace")` returns: wireguard-go over its UAPI socket) and
`nodeagent.routes.apply_routes` (`NetlinkRoutes`, rtnetlink), each with its
`TrackedDataplane`, program them — the same calls, in the same order, with the same
resync interval (10 s), as `Agent._reconcile`'s mesh part (the nftables, egress and
publish steps are left out).

Every size runs in a process of its own (so its peak RSS is its own) inside a throwaway
network namespace `mgb-scale-<pid>-…` and a private mount namespace whose
/var/run/wireguard is a fresh tmpfs, so the interface is `meshgress0` as in production and
nothing touches the host's network namespace or its wireguard-go sockets (the host only
gets an empty /var/run/wireguard as the mount point, as `meshgress lab` does). Per size:

- full sync: from starting the informer (datastore list) to all N-1 peers and N-1 routes
  (+ the unreachable fallback) in the kernel, checked afterwards with `wg` and `ip`;
- endpoint change: one node's endpoint annotation is patched in the datastore; timed from
  the patch to the reconcile that follows it done (the plan must update exactly that
  peer's endpoint and change no route). "reconcile" is the part after the watch event
  reached the cache; the rest is the datastore write and its watch event (inotify on the
  file datastore);
- node added: a new Node object is created; the same timing (one peer and one route
  added, nothing else). Both changes are event-triggered passes: they plan against the
  tracked dataplane, as the agent's do between resyncs ("read" says whether a pass read
  the kernel);
- resync: the periodic full read (the trackers' resync is made due), which must find
  the kernel exactly as tracked: both plans empty, or the run fails;
- peak RSS of the process (ru_maxrss) and of its wireguard-go (VmHWM).

A run (one size, one variant) that exceeds --timeout (default 240 s; all four runs take
under a minute together on a quiet machine, several minutes when it is busy) is stopped
(SIGTERM: it still removes what it made) and the phases it did not reach are reported as
such, so `make bench` stays bounded.

Each reconcile is broken down by stage — list (informer), write (the datastore change),
parse (NodeParseCache), compute (compute_mesh), wg link (link get), uapi get (the socket
exchange), parse+plan (parse_uapi_get + plan_device + building the set request),
uapi set, wg mtu/up, rt dump (NetlinkRoutes.read), rt ifindex (link lookups), rt replace,
rt delete — so a slow stage is named.

There is one variant, `as-is` (the code unchanged); `--variants` stays for the report's
column. The earlier `proposed` variant (a struct-parsed route dump and batched writes) is
now the product's `NetlinkRoutes`.

Everything is removed afterwards, also on failure: the inner process deletes meshgress0
(wireguard-go then exits by itself); the outer one stops whatever is still in the
namespace by PID, deletes the namespace and the datastore folder (under /dev/shm, a tmpfs,
so populating it is not a disk benchmark). Leftovers of a crashed run (its PID is gone)
are removed first.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ipaddress
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from meshgress.lab.netns import netns_pids, pid_alive, stop_pids  # noqa: E402 - after the path is set

PREFIX = "mgb-scale-"
RUN = f"{PREFIX}{os.getpid()}-"
LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")
NETNS_DIR = Path("/run/netns")
DATA_ROOT = Path("/dev/shm")
WG_SOCKET_DIR = "/var/run/wireguard"
POD_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
POD_PREFIX = 28
SERVICE_RANGE = ipaddress.IPv4Network("198.51.100.0/24")
SELF = "node-00000"
MTU = 1440
CHANGED = "node-00042"
TARGETS = {"full_sync_s": 10.0, "change_e2e_ms": 100.0, "add_e2e_ms": 100.0, "rss_mb": 200.0}

# The mount namespace for the inner process: a private /var/run/wireguard, then exec.
MOUNT_SCRIPT = ('set -e; mount -t tmpfs -o mode=0755,size=16m mgb-scale-wg "$1"; shift; '
                'exec "$@"')


def run(argv: list[str], check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr or proc.stdout}")
    return proc.stdout


# --- the cluster ------------------------------------------------------------------------


def endpoint_ip(i: int) -> str:
    # Documentation range only (TEST-NET-3); simulated nodes share its 254 addresses and
    # differ by port. Nothing is ever sent to them: the namespace has no route there.
    return str(ipaddress.IPv4Address("203.0.113.1") + i % 254)


def endpoint_port(i: int) -> int:
    return 20000 + i // 254


def node_object(i: int, cidr: ipaddress.IPv4Network, key: str) -> dict[str, Any]:
    from meshgress.cluster import ENDPOINT_ANNOTATION, PUBLIC_KEY_ANNOTATION

    name = f"node-{i:05d}"
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name,
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                     "annotations": {PUBLIC_KEY_ANNOTATION: key,
                                     ENDPOINT_ANNOTATION: f"{endpoint_ip(i)}:{endpoint_port(i)}"}},
        "spec": {"podCIDR": str(cidr), "podCIDRs": [str(cidr)]},
        "status": {"addresses": [{"type": "InternalIP", "address": endpoint_ip(i)},
                                 {"type": "Hostname", "address": name}]},
    }


def populate(root: Path, nodes: int, store: Any = None) -> float:
    """N Node objects through the datastore's own create (not timed as part of a sync):
    into the file datastore at `root`, or into `store` when given."""
    from meshgress.datastore.file import FileDatastore
    from wireguard.keys import generate_private_key, public_key

    started = time.perf_counter()
    store = store if store is not None else FileDatastore(root)
    try:
        cidrs = POD_RANGE.subnets(new_prefix=POD_PREFIX)
        for i in range(nodes):
            store.create(node_object(i, next(cidrs), public_key(generate_private_key())))
    finally:
        store.close()
    return time.perf_counter() - started


# --- timing -----------------------------------------------------------------------------


class Clock:
    """Accumulates time per stage name; `wrap` times a callable under a name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs) if callable(name) else name
            with self.stage(label):
                return fn(*args, **kwargs)
        return timed


def instrument(clock: Clock, backend: Any, routes: Any) -> None:
    """Time the kernel-facing calls inside the real adapters, without changing them
    (instance attributes shadow the methods they wrap)."""
    backend.request = clock.wrap(lambda _name, text: "wg.uapi_" + text.split("=", 1)[0],
                                 backend.request)
    backend.links.get = clock.wrap("wg.link_get", backend.links.get)
    backend.links.configure = clock.wrap("wg.link_set", backend.links.configure)
    routes.ifindex = clock.wrap("routes.link_lookup", routes.ifindex)
    routes.read = clock.wrap("routes.dump", routes.read)
    routes.replace = clock.wrap("routes.replace", routes.replace)
    routes.delete = clock.wrap("routes.delete", routes.delete)


# --- inside the namespaces: the measurement -----------------------------------------------


class Body:
    def __init__(self, args: argparse.Namespace) -> None:
        from meshgress.cluster import NodeParseCache
        from meshgress.config import ClusterConfig
        from meshgress.datastore import Kind
        from meshgress.datastore.file import FileDatastore
        from meshgress.datastore.informer import Informer
        from meshgress.datastore.kube import KubeDatastore
        from nodeagent.agent import AgentConfig
        from nodeagent.routes import NetlinkRoutes
        from nodeagent.tracker import TrackedDataplane
        from wireguard.backend import detect_backend
        from wireguard.keys import generate_private_key

        self.args = args
        self.clock = Clock()
        self.store: Any = (KubeDatastore.from_kubeconfig(Path(args.kubeconfig))
                           if args.kubeconfig else FileDatastore(Path(args.store_dir)))
        self.poke = threading.Event()
        self.informer = Informer(self.store, Kind.NODE, on_change=self.poke.set)
        self.backend = detect_backend("userspace")
        self.routes = NetlinkRoutes()
        instrument(self.clock, self.backend, self.routes)
        # As the agent has them (AgentConfig's resync interval).
        self.node_cache = NodeParseCache()
        resync = AgentConfig.resync_interval
        self.skew = 0.0  # added to the trackers' clock, to make a resync due on purpose
        self.wg_tracked: Any = TrackedDataplane("wireguard", resync_interval=resync,
                                                clock=self.tracker_clock)
        self.routes_tracked: Any = TrackedDataplane("routes", resync_interval=resync,
                                                    clock=self.tracker_clock)
        self.private_key = generate_private_key()
        self.cluster = ClusterConfig(pod_cidrs=(POD_RANGE,), service_cidrs=(SERVICE_RANGE,))
        self.profile = cProfile.Profile() if args.profile else None

    def tracker_clock(self) -> float:
        return time.monotonic() + self.skew

    def reconcile(self) -> dict[str, Any]:
        """The mesh part of Agent._reconcile, stage by stage."""
        from nodeagent.mesh import MeshInputs, compute_mesh
        from nodeagent.routes import apply_routes
        from nodeagent.tracker import apply_device_tracked

        clock = self.clock
        with clock.stage("parse"):
            nodes = tuple(self.node_cache.parse_all(self.informer.snapshot().values()))
        with clock.stage("compute"):
            mesh = compute_mesh(MeshInputs(self_name=SELF, nodes=nodes,
                                           private_key=self.private_key, mtu=MTU,
                                           cluster=self.cluster))
        with clock.stage("wireguard"):
            wg_plan = apply_device_tracked(self.backend, mesh.device, self.wg_tracked)
        with clock.stage("routes"):
            route_plan = apply_routes(self.routes, mesh.routes, self.routes_tracked)
        return {"peers": len(mesh.device.peers), "routes": len(mesh.routes),
                "read": {"wireguard": self.wg_tracked.last_pass_read,
                         "routes": self.routes_tracked.last_pass_read},
                "skipped": len(mesh.skipped),
                "wg_plan": {"add": len(wg_plan.add_peers), "update": len(wg_plan.update_peers),
                            "remove": len(wg_plan.remove_peers), "create": wg_plan.create,
                            "updated_fields": sorted(
                                {f for u in wg_plan.update_peers for f in
                                 ("endpoint", "allowed_ips", "persistent_keepalive")
                                 if getattr(u, f) is not None})},
                "route_plan": {"add": len(route_plan.add), "remove": len(route_plan.remove)}}

    def timed(self, label: str, write: Callable[[], object] | None) -> dict[str, Any]:
        """One reconcile; with `write`, first make that datastore change and wait for the
        informer to deliver it (timed from just before the write)."""
        self.clock.reset()
        self.poke.clear()
        started = time.perf_counter()
        if write is not None:
            with self.clock.stage("datastore_write"):
                write()
            if not self.poke.wait(10):
                raise RuntimeError(f"{label}: the informer never delivered the change")
        seen = time.perf_counter()
        if self.profile is not None:
            self.profile.enable()
        try:
            result = self.reconcile()
        finally:
            if self.profile is not None:
                self.profile.disable()
        done = time.perf_counter()
        return {"phase": label, "total_s": done - started, "reconcile_s": done - seen,
                "stages": dict(self.clock.seconds), "calls": dict(self.clock.calls), **result}

    def full_sync(self) -> dict[str, Any]:
        self.clock.reset()
        if self.profile is not None:
            self.profile.enable()
        started = time.perf_counter()
        with self.clock.stage("datastore_list"):
            self.informer.start()
            if not self.informer.synced.wait(120):
                raise RuntimeError("the informer did not sync")
        listed = time.perf_counter()
        result = self.reconcile()
        done = time.perf_counter()
        if self.profile is not None:
            self.profile.disable()
        return {"phase": "full sync", "total_s": done - started, "reconcile_s": done - listed,
                "stages": dict(self.clock.seconds), "calls": dict(self.clock.calls), **result}

    def kernel_counts(self) -> tuple[int, int]:
        """Peers and meshgress routes as the stock tools see them."""
        peers = run(["wg", "show", "meshgress0", "peers"]).split()
        routes = run(["ip", "-4", "route", "show", "proto", "109"]).splitlines()
        return len(peers), len(routes)

    def emit(self, phase: dict[str, Any]) -> None:
        """One finished phase, as a JSON line (so a run stopped by its time limit still
        reports what it measured), with the peak RSS so far."""
        phase["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"type": "phase", **phase}), flush=True)

    def measure(self) -> None:
        from meshgress.cluster import ENDPOINT_ANNOTATION
        from meshgress.datastore import Kind
        from wireguard.keys import generate_private_key, public_key

        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        full = self.full_sync()
        peers, routes = self.kernel_counts()
        expected = self.args.nodes - 1
        if (peers, routes) != (expected, expected + 1):
            raise RuntimeError(f"after the full sync the kernel has {peers} peers and "
                               f"{routes} routes, not {expected} and {expected + 1}")
        self.emit(full)
        change = self.timed("endpoint change", lambda: self.store.patch_annotations(
            Kind.NODE, CHANGED,
            {ENDPOINT_ANNOTATION: f"{endpoint_ip(42)}:{endpoint_port(42) + 10000}"}))
        self.emit(change)
        expect(change, wg=(0, 1, 0), routes=(0, 0), read=False)
        if change["wg_plan"]["updated_fields"] != ["endpoint"]:
            raise RuntimeError(f"endpoint change: updated {change['wg_plan']}")
        cidr = list(POD_RANGE.subnets(new_prefix=POD_PREFIX))[self.args.nodes]
        added = self.timed("node added", lambda: self.store.create(node_object(
            self.args.nodes, cidr, public_key(generate_private_key()))))
        self.emit(added)
        expect(added, wg=(1, 0, 0), routes=(1, 0), read=False)
        # The periodic resync: a full read, which must find the kernel as tracked.
        self.skew += self.wg_tracked.resync_interval
        resync = self.timed("resync", None)
        self.emit(resync)
        expect(resync, wg=(0, 0, 0), routes=(0, 0), read=True)
        peers_after, routes_after = self.kernel_counts()
        wg_pid = getattr(self.backend, "pid", lambda _name: None)("meshgress0")
        wg_hwm = 0
        if wg_pid is not None:
            status = Path(f"/proc/{wg_pid}/status").read_text()
            wg_hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        if self.profile is not None:
            self.profile.dump_stats(os.path.join(self.args.profile,
                                                 f"scale-{self.args.nodes}-{self.args.variant}"
                                                 ".prof"))
        print(json.dumps({
            "type": "summary",
            "kernel": {"peers": peers, "routes": routes, "peers_after": peers_after,
                       "routes_after": routes_after},
            "rss_start_mb": rss_start / 1024,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wireguard_go_hwm_mb": wg_hwm / 1024}), flush=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.informer.stop()
        with contextlib.suppress(Exception):
            self.backend.delete("meshgress0")
        with contextlib.suppress(Exception):
            self.routes.close()
        self.store.close()


def expect(phase: dict[str, Any], *, wg: tuple[int, int, int], routes: tuple[int, int],
           read: bool) -> None:
    """The plans a phase must have made (peers added/updated/removed, routes added/removed)
    and whether it must have read the kernel; anything else fails the run."""
    got_wg = (phase["wg_plan"]["add"], phase["wg_plan"]["update"], phase["wg_plan"]["remove"])
    got_routes = (phase["route_plan"]["add"], phase["route_plan"]["remove"])
    got_read = phase["read"]["wireguard"] and phase["read"]["routes"]
    got_none = not (phase["read"]["wireguard"] or phase["read"]["routes"])
    if got_wg != wg or got_routes != routes or not (got_read if read else got_none):
        raise RuntimeError(f"{phase['phase']}: planned peers +/~/- {got_wg}, routes +/- "
                           f"{got_routes}, read {phase['read']}; expected {wg}, {routes}, "
                           f"read {read}")


def inner(args: argparse.Namespace) -> int:
    # Stopped at its time limit: SIGTERM, so the finally below still removes meshgress0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    body = Body(args)
    try:
        body.measure()
    finally:
        body.close()
    return 0


# --- outside: namespaces, datastore, the report ---------------------------------------------


def netns_list() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(NETNS_DIR))
    return []


def remove_netns(ns: str) -> None:
    """Stop what still runs in the namespace (by PID: processes in a namespace this run
    created), delete its links (wireguard-go exits when its TUN goes), then the name."""
    for line in run(["ip", "-n", ns, "-o", "link", "show"], check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            run(["ip", "-n", ns, "link", "del", name], check=False)
    stop_pids(netns_pids(ns))
    run(["ip", "netns", "delete", ns], check=False)


def remove_leftovers() -> None:
    for ns in netns_list():
        match = LEFTOVER.match(ns)
        if match and not pid_alive(int(match.group(1))):
            remove_netns(ns)
    for path in DATA_ROOT.glob(f"{PREFIX}*"):
        match = LEFTOVER.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def start_control_plane(ns: str, state_dir: Path, nodes: int) -> tuple[Any, float]:
    """A real etcd and kube-apiserver in the run's namespace (watch cache on, as in
    production), holding N Node objects; returns it and the time populating took."""
    from meshgress.datastore.kube import KubeDatastore
    from meshgress.lab.controlplane import ControlPlane, ControlPlaneConfig
    from tests.kube_netns import api_client_in_netns

    plane = ControlPlane(ControlPlaneConfig(state_dir=state_dir, netns=ns,
                                            service_cluster_ip_range=str(SERVICE_RANGE)))
    plane.start()
    try:
        store = KubeDatastore(api_client_in_netns(plane.kubeconfig, ns))
        return plane, populate(state_dir, nodes, store)
    except BaseException:
        plane.stop()
        raise


def measure_size(nodes: int, variant: str, datastore: Path | None,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One run; `datastore` is the file datastore's directory, or None for kube."""
    ns = f"{RUN}{nodes}-{variant}-{'file' if datastore else 'kube'}"
    plane = None
    try:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        if datastore is None:
            plane, took = start_control_plane(ns, DATA_ROOT / f"{ns}-cp", nodes)
            print(f"  {nodes} nodes, kube: control plane up, populated in {took:.1f}s",
                  file=sys.stderr, flush=True)
            store_args = ["--kubeconfig", str(plane.kubeconfig)]
        else:
            store_args = ["--store-dir", str(datastore)]
        argv = ["nsenter", f"--net={NETNS_DIR / ns}",
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", MOUNT_SCRIPT, "mgb-scale", WG_SOCKET_DIR,
                sys.executable, str(Path(__file__).resolve()), "--inner",
                "--nodes", str(nodes), "--variant", variant, *store_args]
        if args.profile:
            argv += ["--profile", str(Path(args.profile).resolve())]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
        stopped = None
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            stopped = f"stopped at the {args.timeout:.0f}s limit"
            proc.terminate()  # our child, by PID: it removes meshgress0 and exits
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
        if stopped is None and proc.returncode != 0:
            raise RuntimeError(f"{nodes} nodes, {variant}: the measurement failed:\n"
                               f"{err[-4000:]}")
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        phases = [line for line in lines if line["type"] == "phase"]
        summary: dict[str, Any] = next(
            (line for line in lines if line["type"] == "summary"), {})
        if not phases and stopped is None:
            raise RuntimeError(f"{nodes} nodes, {variant}: no phase finished:\n{err[-4000:]}")
        label = f"{variant}/{'file' if datastore else 'kube'}"
        return {"nodes": nodes, "variant": label, "phases": phases, "stopped": stopped,
                "kernel": summary.get("kernel"),
                "rss_peak_mb": summary.get("rss_peak_mb",
                                           phases[-1]["rss_peak_mb"] if phases else None),
                "rss_start_mb": summary.get("rss_start_mb"),
                "wireguard_go_hwm_mb": summary.get("wireguard_go_hwm_mb")}
    finally:
        if plane is not None:
            plane.stop()
        remove_netns(ns)


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.exit("the benchmark creates network namespaces: run it as root")
    for tool in ("wireguard-go", "wg", "ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    remove_leftovers()
    Path(WG_SOCKET_DIR).mkdir(parents=True, exist_ok=True)  # the mount point (as the lab)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    backends = args.datastore.split(",")
    if not set(backends) <= {"file", "kube"}:
        sys.exit(f"--datastore: {args.datastore!r} is not file, kube or file,kube")
    rows: list[dict[str, Any]] = []
    populated: dict[int, float] = {}
    started = time.monotonic()
    load_before = loadavg()
    try:
        for nodes in sizes:
            if not 2 <= nodes < 2 ** (POD_PREFIX - POD_RANGE.prefixlen):
                sys.exit(f"--sizes: {nodes} does not fit in {POD_RANGE} as /{POD_PREFIX}s")
            if "kube" in backends:
                print(f"  {nodes} nodes, kube: measuring", file=sys.stderr, flush=True)
                for variant in variants:
                    rows.append(measure_size(nodes, variant, None, args))
            if "file" not in backends:
                continue
            template = DATA_ROOT / f"{RUN}{nodes}"
            try:
                populated[nodes] = populate(template, nodes)
                print(f"  {nodes} nodes: datastore populated in {populated[nodes]:.1f}s",
                      file=sys.stderr, flush=True)
                for variant in variants:
                    # A fresh copy per run: each run writes a change and adds a node.
                    datastore = DATA_ROOT / f"{RUN}{nodes}-{variant}"
                    try:
                        shutil.copytree(template, datastore)
                        print(f"  {nodes} nodes, {variant}: measuring", file=sys.stderr,
                              flush=True)
                        rows.append(measure_size(nodes, variant, datastore, args))
                    finally:
                        shutil.rmtree(datastore, ignore_errors=True)
            finally:
                shutil.rmtree(template, ignore_errors=True)
    finally:
        for ns in netns_list():
            if ns.startswith(RUN):
                remove_netns(ns)
    report(rows, args, time.monotonic() - started, load_before)
    print(json.dumps({"bench": "scale", "runs": [
        {"nodes": row["nodes"], "variant": row["variant"], "rss_peak_mb": row["rss_peak_mb"],
         "total_s": {p["phase"]: p["total_s"] for p in row["phases"]},
         "stopped": row["stopped"]} for row in rows]}, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


STAGES = (("datastore_list", "list"), ("datastore_write", "write"), ("parse", "parse"),
          ("compute", "compute"), ("wg.link_get", "wg link"), ("wg.uapi_get", "uapi get"),
          ("wg.read_parse", "parse+plan"), ("wg.uapi_set", "uapi set"),
          ("wg.link_set", "wg mtu/up"), ("routes.dump", "rt dump"),
          ("routes.link_lookup", "rt ifindex"), ("routes.replace", "rt replace"),
          ("routes.delete", "rt delete"))


def stage_values(phase: dict[str, Any]) -> dict[str, float]:
    s = dict(phase["stages"])
    # apply_device = link get + UAPI get + parse + plan + UAPI set + link set: what is left
    # after the timed calls is parsing the answer (and planning, which is small).
    wg_known = sum(v for k, v in s.items() if k.startswith("wg."))
    s["wg.read_parse"] = max(0.0, s.get("wireguard", 0.0) - wg_known)
    return s


def fmt_s(value: float) -> str:
    return f"{value * 1e3:.0f}ms" if value < 10 else f"{value:.1f}s"


PHASES = ("full sync", "endpoint change", "node added", "resync")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float,
           load_before: str) -> None:
    print("Mesh control-plane scale: datastore (file or kube) → Informer → parse_node → "
          "compute_mesh → apply_device_tracked (wireguard-go UAPI) → apply_routes (rtnetlink), "
          "both "
          "against the tracked dataplane between full reads")
    print(f"{os.cpu_count()} CPUs, kernel {platform.release()}, Python "
          f"{platform.python_version()}; load average {load_before} → {loadavg()}; "
          f"{wall:.0f}s in all")
    print(f"command: .venv/bin/python tests/bench/scale_bench.py --sizes {args.sizes} "
          f"--variants {args.variants} --datastore {args.datastore} --timeout {args.timeout:g}")
    print("total = from the datastore list (full sync) or write (changes) to the kernel "
          "programmed; reconcile = compute + plan + apply after the cache has it; read = the "
          "pass read the kernel in full (start, resync) rather than the tracked state")
    print()
    header = (f"{'nodes':>6} {'variant':<11}{'phase':<16}{'total':>9}{'reconcile':>10}"
              f"{'wg plan +/~/-':>16}{'routes +/-':>12}{'read':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        done = {p["phase"] for p in row["phases"]}
        for p in row["phases"]:
            wg, rp = p["wg_plan"], p["route_plan"]
            print(f"{row['nodes']:>6} {row['variant']:<11}{p['phase']:<16}"
                  f"{fmt_s(p['total_s']):>9}{fmt_s(p['reconcile_s']):>10}"
                  f"{wg['add']:>10}/{wg['update']}/{wg['remove']:<3}"
                  f"{rp['add']:>8}/{rp['remove']:<3}"
                  f"{'yes' if any(p.get('read', {}).values()) else 'no':>6}")
        if row["stopped"]:
            missing = [ph for ph in PHASES if ph not in done]
            print(f"{row['nodes']:>6} {row['variant']:<11}{', '.join(missing)}: not reached "
                  f"({row['stopped']})")
    print()
    print("where the time goes (ms per stage):")
    names = [label for _, label in STAGES]
    header = f"{'nodes':>6} {'variant':<11}{'phase':<16}" + "".join(f"{n:>11}" for n in names)
    print(header)
    print("-" * len(header))
    for row in rows:
        for p in row["phases"]:
            values = stage_values(p)
            print(f"{row['nodes']:>6} {row['variant']:<11}{p['phase']:<16}"
                  + "".join(f"{values.get(key, 0.0) * 1e3:>11.1f}" for key, _ in STAGES))
    print()
    print("memory and kernel state:")
    header = (f"{'nodes':>6} {'variant':<11}{'RSS at start':>13}{'peak RSS':>10}"
              f"{'wireguard-go':>13}{'peers':>7}{'routes':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        k = row["kernel"] or {}
        start = f"{row['rss_start_mb']:.0f}MB" if row["rss_start_mb"] is not None else "?"
        wg_go = (f"{row['wireguard_go_hwm_mb']:.0f}MB"
                 if row["wireguard_go_hwm_mb"] is not None else "?")
        peak = f"{row['rss_peak_mb']:.0f}MB" if row["rss_peak_mb"] is not None else "?"
        print(f"{row['nodes']:>6} {row['variant']:<11}{start:>13}{peak:>10}"
              f"{wg_go:>13}{k.get('peers_after', '?'):>7}{k.get('routes_after', '?'):>7}")
    print()
    print("targets: full sync of 5,000 < 10 s, one change < 100 ms, RSS < 200 MB")
    for row in rows:
        by = {p["phase"]: p for p in row["phases"]}
        limits = {"full sync": TARGETS["full_sync_s"],
                  "endpoint change": TARGETS["change_e2e_ms"] / 1e3,
                  "node added": TARGETS["add_e2e_ms"] / 1e3}
        verdict = [f"{ph} {'ok' if by[ph]['total_s'] < limit else 'MISSED'}" if ph in by
                   else f"{ph} MISSED (not reached)" for ph, limit in limits.items()]
        if row["rss_peak_mb"] is not None:
            verdict.append(f"RSS {'ok' if row['rss_peak_mb'] < TARGETS['rss_mb'] else 'MISSED'}")
        print(f"  {row['nodes']:>5} {row['variant']:<11}" + "  ".join(verdict))
    by_variant: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_variant[row["variant"]][row["nodes"]] = row
    for variant, sized in by_variant.items():
        if len(sized) < 2:
            continue
        small, large = min(sized), max(sized)
        print(f"growth {small}→{large} nodes (x{large / small:g}), {variant}:", end="")
        for phase in ("full sync", "endpoint change", "node added"):
            a = next((p for p in sized[small]["phases"] if p["phase"] == phase), None)
            b = next((p for p in sized[large]["phases"] if p["phase"] == phase), None)
            if a and b:
                print(f"  {phase} x{b['total_s'] / a['total_s']:.1f}", end="")
        if sized[large]["rss_peak_mb"] and sized[small]["rss_peak_mb"]:
            print(f"  peak RSS x{sized[large]['rss_peak_mb'] / sized[small]['rss_peak_mb']:.1f}",
                  end="")
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--variants", default="as-is", choices=("as-is",),
                        help="as-is: the code unchanged (the only variant left; see the "
                             "module docstring)")
    parser.add_argument("--profile", help="write a cProfile of each run's reconciles here")
    parser.add_argument("--timeout", type=float, default=240,
                        help="per run (one size, one variant), seconds; the phases not "
                             "reached by then are reported as such")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--datastore", default="file",
                        help="file, kube or file,kube: kube starts a real etcd and "
                             "kube-apiserver in the run's namespace and reads the nodes "
                             "through the kube backend")
    parser.add_argument("--store-dir", help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
