"""The lab: a whole meshgress cluster in network namespaces on one Linux machine.

`Lab.up` builds the topology computed in `topology.py`: an underlay bridge in its own
namespace, one namespace per node with a veth port on that bridge, an "outside" host with
the echo service, a monitoring host the agents let scrape them, and the cluster's Node and
Namespace objects in its datastore: a file datastore, or (`datastore="kube"`) a real kube-
apiserver in a control-plane namespace of the lab, whose part lives in `kube.py`. Each
node gets a mount namespace of its own, held open by an anchor process, with a private
`/var/run/wireguard` (wireguard-go's socket folder is global otherwise) and its own state
and run directories bound onto `/var/lib/meshgress` and `/run/meshgress` (host folders, so
an agent in a container can bind them too), so node processes use production paths and
interface names unchanged. `Lab.down` removes every namespace, process and file the lab
made; it finds them by the lab's name prefix, so it also cleans up after a crashed or
killed `up`.

Everything lives inside namespaces the lab created: nothing here configures the host's
own network namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from cni.install import PLUGIN_NAME, install_plugin
from meshgress.binaries import default_wireguard_go
from meshgress.cluster import parse_slot_holder
from meshgress.config import dump_cluster_config
from meshgress.datastore import Datastore, Kind, ListResult
from meshgress.datastore.file import FileDatastore
from meshgress.lab import netns
from meshgress.lab.topology import (
    ECHO_PORT,
    LAB_KUBE_NAMESPACES,
    MONITOR_ADDRESS,
    OUTSIDE_ADDRESS,
    UNDERLAY_CIDR,
    LabNode,
    LabTopology,
    compute_cluster_objects,
    compute_egress_objects,
    compute_lab_topology,
    lab_cluster_config,
    lab_prefix,
)

if TYPE_CHECKING:  # the kube lab's module (and the kubernetes client) loads on demand
    from meshgress.lab.kube import LabKube
from meshgress.slots import SlotId

LAB_STATE_ROOT = Path(os.environ.get("MESHGRESS_LAB_ROOT", "/run/meshgress-lab"))
WIREGUARD_SOCKET_DIR = "/var/run/wireguard"
NODE_STATE_DIR = "/var/lib/meshgress"
"""The production state directory; in the lab each node's own folder is bound onto it."""
NODE_RUN_DIR = "/run/meshgress"
"""Where the agent's CNI socket lives; private per node in the lab."""
POD_IFNAME = "eth0"
AGENT_METRICS_PORT = 9820
AGENT_READY_TIMEOUT = 30.0
DATASTORES = ("file", "kube")

ANCHOR_SCRIPT = """set -e
mount -t tmpfs -o mode=0755,size=16m meshgress-lab "{wg}"
mount --bind "{node_run}" "{run}"
mount --bind "{state}" "{node_state}"
: > "{ready}"
exec sleep infinity
"""
"""Runs inside `unshare --mount --propagation slave`: mounts made here stay in the node's
mount namespace, while named network namespaces created later on the host (pods) still
appear in it."""


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why and what to do."""


class LabStore(Protocol):
    """The datastore calls the lab itself makes (a subset of `Datastore`): the file
    datastore, or the lab's control plane (`kube.LabKube`)."""

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    def patch_status(self, kind: Kind, name: str, status: dict[str, Any],
                     namespace: str = "") -> dict[str, Any]: ...

    def delete(self, kind: Kind, name: str, namespace: str = "") -> None: ...

    def list(self, kind: Kind) -> ListResult: ...

    def close(self) -> None: ...


@dataclass
class LabRecord:
    """What `lab up` wrote down, so status and down need no guessing."""

    name: str
    nodes: int
    gateway_nodes: int
    datastore: str = "file"
    complete: bool = False
    created: float = field(default_factory=time.time)
    anchors: dict[str, int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    gateways: dict[str, int] = field(default_factory=dict)
    echo_pid: int | None = None
    removed: list[str] = field(default_factory=list)
    wireguard_go: str | None = None
    """The wireguard-go program agents and gateways run (None: their own default)."""


class Lab:
    def __init__(self, name: str = "lab", state_root: Path = LAB_STATE_ROOT) -> None:
        self.name = name
        self.state_dir = state_root / name

    # Paths -----------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def datastore_dir(self) -> Path:
        return self.state_dir / "datastore"

    @property
    def cluster_config_path(self) -> Path:
        return self.state_dir / "cluster.yaml"

    @property
    def echo_log_path(self) -> Path:
        return self.state_dir / "outside" / "echo.jsonl"

    @property
    def cni_bin_dir(self) -> Path:
        return self.state_dir / "cni" / "bin"

    def node_dir(self, node: str) -> Path:
        return self.state_dir / "nodes" / node

    def node_run_dir(self, node: str) -> Path:
        """The node's /run/meshgress (the CNI socket), bound there in its mount namespace:
        a folder on the host, so an agent in a container can bind it as well."""
        return self.node_dir(node) / "run"

    def log_path(self, what: str) -> Path:
        return self.state_dir / "logs" / f"{what}.log"

    # Record ----------------------------------------------------------------------------

    def load_record(self) -> LabRecord | None:
        try:
            data = json.loads(self.record_path.read_text())
            return LabRecord(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _save_record(self, record: LabRecord) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(self.record_path)

    def topology(self) -> LabTopology:
        record = self.load_record()
        if record is None:
            raise LabError(f"lab {self.name!r} is not up (run `meshgress lab up`)")
        return self._topology(record)

    @staticmethod
    def _topology(record: LabRecord) -> LabTopology:
        full = compute_lab_topology(record.name, record.nodes, record.gateway_nodes)
        return dataclasses.replace(
            full, nodes=tuple(n for n in full.nodes if n.name not in record.removed))

    def _running_record(self) -> LabRecord:
        record = self.load_record()
        if record is None or not record.complete:
            raise LabError(f"lab {self.name!r} is not up (run `meshgress lab up`)")
        return record

    def datastore(self) -> FileDatastore:
        return FileDatastore(self.datastore_dir)

    def admin_datastore(self) -> Datastore:
        """The whole Datastore on the lab's store, with every right: the file datastore,
        or the kube backend as the lab's admin (through the loopback forwarder). For
        people and tests that change objects as an administrator would."""
        record = self._running_record()
        if record.datastore == "kube":
            from meshgress.datastore.kube import KubeDatastore

            return KubeDatastore.from_kubeconfig(self.kube().host_kubeconfig)
        return self.datastore()

    def kube(self) -> LabKube:
        """The lab's control plane (a handle: whether it runs is the record's business)."""
        from meshgress.lab.kube import LabKube

        return LabKube(self.name, self.state_dir)

    def _store(self, record: LabRecord) -> LabStore:
        """Where the lab writes the cluster's objects: its file datastore, or its API
        server (as admin: the lab plays kubelet and scheduler)."""
        return self.kube() if record.datastore == "kube" else self.datastore()

    # Up --------------------------------------------------------------------------------

    def up(self, nodes: int = 2, gateway_nodes: int = 2, datastore: str = "file",
           wireguard_go: str | None = None) -> LabTopology:
        """`wireguard_go`: the program agents and gateways run (default: the cached current
        build when it is there, else `wireguard-go` on PATH)."""
        topology = compute_lab_topology(self.name, nodes, gateway_nodes)
        wireguard_go = self._check_up(datastore, wireguard_go)
        self.down()  # leftovers of a crashed or killed run
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = LabRecord(name=self.name, nodes=nodes, gateway_nodes=gateway_nodes,
                           datastore=datastore, wireguard_go=wireguard_go)
        self._save_record(record)
        try:
            self._bring_up(topology, record)
        except BaseException:
            self.down()
            raise
        record.complete = True
        self._save_record(record)
        return topology

    def _check_up(self, datastore: str, wireguard_go: str | None) -> str:
        """Refuse a bad `lab up` before anything is touched; the wireguard-go path."""
        if datastore not in DATASTORES:
            raise LabError(f"--datastore {datastore!r}: one of {', '.join(DATASTORES)}")
        wireguard_go = wireguard_go or default_wireguard_go()
        path = shutil.which(wireguard_go)
        if path is None:
            raise LabError(f"--wireguard-go {wireguard_go}: no such program (`make binaries` "
                           "builds the current release; Debian's is `apt-get install "
                           "wireguard-go`)")
        existing = self.load_record()
        if existing and existing.complete and self._is_running(existing):
            raise LabError(f"lab {self.name!r} is already up; run `meshgress lab down` first")
        return path

    def _bring_up(self, topology: LabTopology, record: LabRecord) -> None:
        """Everything of `up` after the checks, recorded as it starts (so `down` finds it)."""
        self._build_network(topology)
        for node in topology.nodes:
            record.anchors[node.name] = self._start_anchor(node)
            self._save_record(record)
        record.echo_pid = self._start_echo(topology)
        self._save_record(record)
        if record.datastore == "kube":
            self._start_control_plane(topology)
        self._write_cluster(topology, record)
        self._wait_ready(topology, record)
        install_plugin(self.cni_bin_dir)
        for node in topology.nodes:
            self._issue_identities(record, node)
        for node in topology.nodes:
            self._start_agent(record, node.name)
        for node in topology.nodes:
            self._wait_agent(record, node.name)
        self._start_egress(topology, record)
        for node in topology.nodes:
            if node.role == "worker":
                for namespace in (ns for ns, _ in LAB_KUBE_NAMESPACES):
                    self.add_pod(namespace, f"app-{node.name}", node.name, record=record)

    def _build_network(self, topology: LabTopology) -> None:
        for name in (topology.underlay_netns, topology.outside_netns, topology.monitor_netns):
            netns.add_netns(name)
        # A plain L2 segment, as a datacentre's underlay looks to the nodes: with multicast
        # snooping on, the bridge itself would join 224.0.0.106 and send IGMP reports
        # whenever a port comes up — packets no node sent, on the capture that proves
        # only WireGuard crosses the underlay.
        netns.ip_batch(topology.underlay_netns,
                       [f"link add {topology.bridge} type bridge mcast_snooping 0",
                        f"link set {topology.bridge} up"])
        self._attach(topology, "outside", topology.outside_netns, OUTSIDE_ADDRESS,
                     default_route=False)
        self._attach(topology, "monitor", topology.monitor_netns, MONITOR_ADDRESS,
                     default_route=False)
        for node in topology.nodes:
            self._build_node(topology, node)

    def _start_control_plane(self, topology: LabTopology) -> None:
        """The kube lab's control plane: its own namespace on the underlay, then etcd, the
        API server, the CRDs and the chart's RBAC (kube.py)."""
        from meshgress.lab.kube import CONTROL_PLANE_ADDRESS, control_plane_netns

        cp_netns = control_plane_netns(self.name)
        netns.add_netns(cp_netns)
        self._attach(topology, "cp", cp_netns, CONTROL_PLANE_ADDRESS, default_route=False)
        self.kube().start()

    def _build_node(self, topology: LabTopology, node: LabNode) -> None:
        netns.add_netns(node.netns)
        # The outside host stands for the internet: nodes route to it by default, as
        # real nodes have a default route (proxy ARP for pods relies on one).
        self._attach(topology, node.underlay_ifname, node.netns, node.underlay_address,
                     default_route=True)
        netns.sysctl(node.netns, {"net.ipv4.ip_forward": "1"})

    def _attach(self, topology: LabTopology, port: str, member_ns: str, address: object, *,
                default_route: bool) -> None:
        netns.ip_batch(topology.underlay_netns, [
            f"link add {port} type veth peer name eth0 netns {member_ns}",
            f"link set {port} master {topology.bridge}",
            f"link set {port} up",
        ])
        commands = [f"address add {address}/{UNDERLAY_CIDR.prefixlen} dev eth0",
                    "link set eth0 up"]
        if default_route:
            commands.append(f"route add default via {OUTSIDE_ADDRESS}")
        netns.ip_batch(member_ns, commands)

    def add_node(self) -> tuple[LabNode, dict[str, Any]]:
        """Join one more worker node to a running lab: namespaces, mount namespace, Node
        object, agent, and its two pods. Returns the node and when (wall clock) its agent
        was started, was ready, and its pods were wired."""
        record = self._running_record()
        record.nodes += 1
        topology = self._topology(record)
        node = topology.node(f"node{record.nodes}")
        self._save_record(record)
        self._build_node(topology, node)
        record.anchors[node.name] = self._start_anchor(node)
        self._save_record(record)
        self._wait_ready(topology, record)
        store = self._store(record)
        try:
            for obj in compute_cluster_objects(topology):
                if obj["kind"] == "Node" and obj["metadata"]["name"] == node.name:
                    store.apply(obj)
        finally:
            store.close()
        self._issue_identities(record, node)
        timings = {"agentStarted": time.time()}
        self._start_agent(record, node.name)
        self._wait_agent(record, node.name)
        timings["agentReady"] = time.time()
        # Both pods at once, as a kubelet starts pods in parallel.
        with ThreadPoolExecutor(max_workers=len(LAB_KUBE_NAMESPACES)) as pool:
            futures = {f"{ns}/app-{node.name}": pool.submit(
                self.add_pod, ns, f"app-{node.name}", node.name, record=record)
                for ns, _ in LAB_KUBE_NAMESPACES}
            pods = {key: future.result() for key, future in futures.items()}
        timings["podsWired"] = time.time()
        return node, {**timings, "pods": pods}

    def remove_node(self, name: str) -> None:
        """Take a node out of a running lab, as a decommissioned machine leaves: its
        processes stop, its Node and Pod objects are deleted, its namespaces removed."""
        record = self._running_record()
        topology = self._topology(record)
        node = topology.node(name)
        pods = [p for p in self.pods() if p["node"] == name]
        netns.stop_pids(netns.netns_pids(node.netns))
        for pod in pods:
            netns.delete_netns(pod["netns"])
        netns.delete_netns(node.netns)
        record.removed.append(name)
        record.anchors.pop(name, None)
        record.agents.pop(name, None)
        self._save_record(record)
        store = self._store(record)
        try:
            for pod in pods:
                store.delete(Kind.POD, pod["name"], pod["namespace"])
            store.delete(Kind.NODE, name)
        finally:
            store.close()
        if record.datastore == "kube":
            self.kube().remove_identities(name)

    def _start_anchor(self, node: LabNode) -> int:
        node_dir = self.node_dir(node.name)
        state = node_dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        self.node_run_dir(node.name).mkdir(mode=0o755, exist_ok=True)
        ready = node_dir / "anchor.ready"
        ready.unlink(missing_ok=True)
        # Mount points must exist on the host before a private mount can sit on them.
        Path(WIREGUARD_SOCKET_DIR).mkdir(parents=True, exist_ok=True)
        Path(NODE_STATE_DIR).mkdir(parents=True, exist_ok=True)
        Path(NODE_RUN_DIR).mkdir(parents=True, exist_ok=True)
        script = ANCHOR_SCRIPT.format(wg=WIREGUARD_SOCKET_DIR, run=NODE_RUN_DIR, state=state,
                                      node_state=NODE_STATE_DIR, ready=ready,
                                      node_run=self.node_run_dir(node.name))
        argv = ["nsenter", f"--net={netns.netns_path(node.netns)}",
                "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script]
        return netns.spawn_detached(argv, self.log_path(f"{node.name}-anchor"))

    def _start_echo(self, topology: LabTopology) -> int:
        self.echo_log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["nsenter", f"--net={netns.netns_path(topology.outside_netns)}",
                _python(), "-m", "meshgress.lab.echo", "serve",
                "--port", str(ECHO_PORT), "--log", str(self.echo_log_path)]
        return netns.spawn_detached(argv, self.log_path("outside-echo"))

    def _write_cluster(self, topology: LabTopology, record: LabRecord) -> None:
        self.cluster_config_path.write_text(yaml.safe_dump(dump_cluster_config(
            lab_cluster_config())))
        store = self._store(record)
        try:
            for obj in compute_cluster_objects(topology):
                store.apply(obj)
        finally:
            store.close()
        if record.datastore == "kube":
            self.kube().ensure_default_service_accounts(ns for ns, _ in LAB_KUBE_NAMESPACES)

    def _issue_identities(self, record: LabRecord, node: LabNode) -> None:
        """On kube: the node's agent (and on a gateway node, its gateway) gets a Pod
        object, a token bound to it and a kubeconfig in the node's state folder."""
        if record.datastore != "kube":
            return
        kube = self.kube()
        components = ("agent", "gateway") if node.role == "gateway" else ("agent",)
        for component in components:
            kube.issue_identity(component, node.name, node.underlay_address,
                                self.node_dir(node.name) / "state")

    def _datastore_args(self, record: LabRecord, component: str) -> list[str]:
        """How an agent or gateway process on a node reaches the lab's datastore."""
        if record.datastore == "kube":
            from meshgress.lab.kube import NODE_KUBECONFIG_DIR

            return ["--datastore", "kube", "--kubeconfig",
                    f"{NODE_STATE_DIR}/{NODE_KUBECONFIG_DIR}/{component}.kubeconfig"]
        return ["--datastore", str(self.datastore_dir)]

    def _wait_ready(self, topology: LabTopology, record: LabRecord, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        pending = {n.name for n in topology.nodes}
        while pending and time.monotonic() < deadline:
            for node_name in sorted(pending):
                if (self.node_dir(node_name) / "anchor.ready").exists():
                    pending.discard(node_name)
                elif not netns.pid_alive(record.anchors[node_name]):
                    log = self.log_path(f"{node_name}-anchor").read_text(errors="replace")
                    raise LabError(f"node {node_name}: mount namespace setup failed: {log}")
            time.sleep(0.02)
        if pending:
            raise LabError(f"nodes {sorted(pending)}: mount namespace not ready in {timeout}s")
        echo_ready = False
        while not echo_ready and time.monotonic() < deadline:
            out = netns.run(["nsenter", f"--net={netns.netns_path(topology.outside_netns)}",
                             "ss", "-Hltn", f"sport = :{ECHO_PORT}"], check=False).stdout
            echo_ready = bool(out.strip())
            if not echo_ready:
                if record.echo_pid is None or not netns.pid_alive(record.echo_pid):
                    log = self.log_path("outside-echo").read_text(errors="replace")
                    raise LabError(f"outside echo service did not start: {log}")
                time.sleep(0.05)
        if not echo_ready:
            raise LabError(f"outside echo service not listening in {timeout}s")

    def _has_datastore(self, record: LabRecord) -> bool:
        """Whether the lab's datastore can be read now (exists; on kube: answers)."""
        if record.datastore == "kube":
            return self.kube().running()
        return self.datastore_dir.exists()

    def _is_running(self, record: LabRecord) -> bool:
        topology = self._topology(record)
        present = set(netns.list_netns())
        return (all(ns in present for ns in topology.netns_names)
                and all(netns.pid_alive(pid) for pid in record.anchors.values())
                and (record.datastore != "kube" or self.kube().running()))

    # Agents ----------------------------------------------------------------------------

    def _node_argv(self, record: LabRecord, node: str, command: list[str]) -> list[str]:
        anchor = record.anchors.get(node)
        if anchor is None or not netns.pid_alive(anchor):
            raise LabError(f"node {node}: its mount namespace is gone; run lab down/up")
        return ["nsenter", f"--target={anchor}", "--net", "--mount", "--", *command]

    def _wireguard_args(self, record: LabRecord, process: str) -> list[str]:
        """The lab's wireguard-go, and its own log, verbose (handshakes, keepalives), next
        to its process's."""
        return [*(["--wireguard-go", record.wireguard_go] if record.wireguard_go else []),
                "--wireguard-log", str(self.log_path(f"{process}-wireguard-go")),
                "--wireguard-log-level", "verbose"]

    def _start_agent(self, record: LabRecord, node: str) -> int:
        argv = self._node_argv(record, node, [
            _python(), "-m", "meshgress.cli", "agent", "--node", node,
            *self._datastore_args(record, "agent"),
            "--cluster-config", str(self.cluster_config_path),
            "--node-grace", "5", "--resync-interval", "5",
            "--metrics-allow-from", f"{MONITOR_ADDRESS}/32",
            *self._wireguard_args(record, f"{node}-agent")])
        pid = netns.spawn_detached(argv, self.log_path(f"{node}-agent"))
        record.agents[node] = pid
        self._save_record(record)
        return pid

    def _wait_agent(self, record: LabRecord, node: str,
                    timeout: float = AGENT_READY_TIMEOUT) -> None:
        """Ready = the agent's readiness probe answers 200 (synced, applied, published,
        serving CNI)."""
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{AGENT_METRICS_PORT}/readyz",
                                            timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        while time.monotonic() < deadline:
            pid = record.agents.get(node)
            if pid is None or not netns.pid_alive(pid):
                log = self.log_path(f"{node}-agent").read_text(errors="replace")[-3000:]
                raise LabError(f"node {node}: the agent exited:\n{log}")
            if netns.call_in_netns(f"/proc/{pid}/ns/net", ready):
                return
            time.sleep(0.02)
        raise LabError(f"node {node}: the agent was not ready within {timeout:.0f}s "
                       f"(log: {self.log_path(f'{node}-agent')})")

    def agent(self, action: str, node: str) -> None:
        """Stop, start or restart one node's agent (the dataplane stays in place)."""
        record = self._running_record()
        if node not in record.anchors:
            raise LabError(f"lab agent: unknown node {node!r}")
        if action in ("stop", "restart"):
            pid = record.agents.pop(node, None)
            if pid is not None:
                netns.stop_pids([pid], grace=10)
            self._save_record(record)
        if action in ("start", "restart"):
            if record.agents.get(node) and netns.pid_alive(record.agents[node]):
                raise LabError(f"node {node}: the agent is already running")
            self._start_agent(record, node)
            self._wait_agent(record, node)

    # Underlay links --------------------------------------------------------------------

    def link(self, node: str, state: str, *, carrier: bool = False) -> None:
        """Take a node's underlay link down or bring it back, as a failing NIC or cable.

        down: `ip link set eth0 down` inside the node (the kernel removes the routes
        through it, its default route included); with `carrier`, the switch side of its
        cable goes down instead: eth0 stays up without a carrier, and its routes stay.
        up: the link comes back and, as a host's network manager would, the node's default
        route is put back (meshgress never manages the host's own routes)."""
        if state not in ("down", "up"):
            raise LabError(f"lab link: the state is `down` or `up`, not {state!r}")
        record = self._running_record()
        topology = self._topology(record)
        try:
            member = topology.node(node)
        except KeyError:
            names = ", ".join(n.name for n in topology.nodes)
            raise LabError(f"lab link: unknown node {node!r} (one of: {names})") from None
        if carrier:
            netns.ip_batch(topology.underlay_netns,
                           [f"link set {member.underlay_ifname} {state}"])
        else:
            netns.ip_batch(member.netns, [f"link set eth0 {state}"])
        if state == "up":
            netns.ip_batch(member.netns, ["link set eth0 up",
                                          f"route replace default via {OUTSIDE_ADDRESS}"])

    # Egress gateways -------------------------------------------------------------------

    def _start_egress(self, topology: LabTopology, record: LabRecord) -> None:
        objects = compute_egress_objects(topology)
        if not objects:
            return
        store = self._store(record)
        try:
            for obj in objects:
                store.apply(obj)
        finally:
            store.close()
        for node in topology.nodes:
            if node.role == "gateway":
                self._start_gateway(record, node.name)
        self._wait_slots(record)

    def _start_gateway(self, record: LabRecord, node: str) -> int:
        identity: list[str] = []
        if record.datastore == "kube":
            from meshgress.lab.kube import GATEWAY, component_pod_name

            # As in the chart: the lease holder is the pod its token is bound to, which the
            # chart's admission policy holds every lease write to.
            identity = ["--identity", component_pod_name(GATEWAY, node)]
        argv = self._node_argv(record, node, [
            _python(), "-m", "meshgress.cli", "gateway", "--node", node,
            *self._datastore_args(record, "gateway"), *identity,
            "--cluster-config", str(self.cluster_config_path),
            *self._wireguard_args(record, f"{node}-gateway")])
        pid = netns.spawn_detached(argv, self.log_path(f"{node}-gateway"))
        record.gateways[node] = pid
        self._save_record(record)
        return pid

    def slots(self) -> list[dict[str, Any]]:
        """Every egress IP slot with its holder (from the slot leases)."""
        record = self.load_record()
        if record is None or not self._has_datastore(record):
            return []
        store = self._store(record)
        try:
            gateways = store.list(Kind.EGRESS_GATEWAY).items
            leases = store.list(Kind.LEASE).items
        finally:
            store.close()
        now = time.time()
        holders = {h.slot: h for h in (parse_slot_holder(o, now) for o in leases) if h}
        out = []
        for gw in gateways:
            ips = (gw.get("spec") or {}).get("egressIPs") or []
            for index, ip in enumerate(ips):
                slot = SlotId(gw["metadata"]["name"], index)
                holder = holders.get(slot)
                out.append({"gateway": slot.gateway, "index": index, "egressIP": ip,
                            "holder": holder.holder if holder else None,
                            "node": holder.node if holder else None})
        return out

    def _wait_slots(self, record: LabRecord, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            slots = self.slots()
            if slots and all(s["holder"] for s in slots):
                return
            for node, pid in record.gateways.items():
                if not netns.pid_alive(pid):
                    log = self.log_path(f"{node}-gateway").read_text(errors="replace")[-3000:]
                    raise LabError(f"node {node}: the gateway exited:\n{log}")
            time.sleep(0.1)
        raise LabError(f"egress slots not all held within {timeout:.0f}s: {self.slots()}")

    def gateway(self, action: str, node: str) -> None:
        """Stop (SIGTERM: drain), kill (SIGKILL: a crash), or start a gateway process."""
        record = self._running_record()
        if node not in record.anchors or not node.startswith("gw"):
            raise LabError(f"lab gateway: {node!r} is not a gateway node of the lab")
        if action in ("stop", "kill"):
            pid = record.gateways.pop(node, None)
            if pid is not None:
                if action == "kill":
                    # A crashed gateway pod loses every process of its container: the
                    # gateway and the wireguard-go of its slot tunnels. Kernel state (its
                    # address, with a lifetime; its table) stays, as on a real node.
                    victims = [pid, *self._gateway_tunnel_pids(node)]
                    for victim in victims:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim, signal.SIGKILL)
                    netns.stop_pids(victims, grace=5)
                else:
                    netns.stop_pids([pid], grace=10)
            self._save_record(record)
        if action == "start":
            if record.gateways.get(node) and netns.pid_alive(record.gateways[node]):
                raise LabError(f"node {node}: the gateway is already running")
            self._start_gateway(record, node)

    def _gateway_tunnel_pids(self, node: str) -> list[int]:
        """wireguard-go processes serving a gateway's slot tunnels (`mgeg…`) on `node`."""
        found = []
        for pid in netns.netns_pids(self._topology(self._running_record()).node(node).netns):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[0].endswith(b"wireguard-go") \
                    and argv[1].startswith(b"mgeg"):
                found.append(pid)
        return found

    # Pods ------------------------------------------------------------------------------

    def pod_netns(self, namespace: str, name: str) -> str:
        return f"{lab_prefix(self.name)}pod-{namespace}-{name}"

    def add_pod(self, namespace: str, name: str, node: str, *,
                labels: dict[str, str] | None = None,
                record: LabRecord | None = None) -> str:
        """Create a pod the way kubelet and a runtime would: the Pod object first, then
        a network namespace wired by the real CNI plugin on its node. Returns its IP.
        A pod that cannot be wired leaves nothing behind (object and namespace go)."""
        record = record or self.load_record()
        if record is None:
            raise LabError(f"lab {self.name!r} is not up (run `meshgress lab up`)")
        pod_ns = self.pod_netns(namespace, name)
        store = self._store(record)
        try:
            if any(p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == name
                   for p in store.list(Kind.POD).items):
                raise LabError(f"pod {namespace}/{name} already exists")
            store.apply({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": labels or {"app": name.split("-", maxsplit=1)[0]},
                             "annotations": {"meshgress.io/lab-netns": pod_ns}},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": "none"}]},
                "status": {"phase": "Pending"},
            })
            try:
                address = self._wire_pod(record, store, namespace=namespace, name=name,
                                         node=node, pod_ns=pod_ns)
            except BaseException:
                netns.delete_netns(pod_ns)
                store.delete(Kind.POD, name, namespace)
                raise
        finally:
            store.close()
        return address

    def _wire_pod(self, record: LabRecord, store: LabStore, *, namespace: str, name: str,
                  node: str, pod_ns: str) -> str:
        """The runtime's part: the pod's network namespace, CNI ADD on its node, and the
        Pod's status as kubelet reports it."""
        container_id = hashlib.sha256(f"{self.name}/{namespace}/{name}".encode()).hexdigest()
        netns.add_netns(pod_ns)
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container_id,
               "CNI_NETNS": str(netns.netns_path(pod_ns)), "CNI_IFNAME": POD_IFNAME,
               "CNI_PATH": str(self.cni_bin_dir),
               "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"}
        argv = self._node_argv(record, node, [
            "env", *(f"{k}={v}" for k, v in env.items()),
            str(self.cni_bin_dir / PLUGIN_NAME)])
        config = json.dumps({"cniVersion": "1.0.0", "name": "meshgress",
                             "type": PLUGIN_NAME, "socket": f"{NODE_RUN_DIR}/cni.sock"})
        proc = netns.run(argv, input_text=config, check=False, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"CNI ADD of pod {namespace}/{name} on {node} failed: "
                           f"{proc.stdout.strip()} {proc.stderr.strip()}")
        address = str(json.loads(proc.stdout)["ips"][0]["address"]).split("/")[0]
        store.patch_status(Kind.POD, name, {
            "phase": "Running", "podIP": address, "podIPs": [{"ip": address}],
            "hostIP": str(self._topology(record).node(node).underlay_address),
        }, namespace=namespace)
        return address

    def pods(self) -> list[dict[str, Any]]:
        """The lab's workload pods (the Pods standing for meshgress's own processes on
        kube are not among them: they have no namespace of their own)."""
        record = self.load_record()
        if record is None or not self._has_datastore(record):
            return []
        store = self._store(record)
        try:
            items = [p for p in store.list(Kind.POD).items
                     if not (p.get("spec") or {}).get("hostNetwork")]
        finally:
            store.close()
        return [{
            "namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"],
            "node": p["spec"].get("nodeName"), "address": (p.get("status") or {}).get("podIP"),
            "netns": self.pod_netns(p["metadata"]["namespace"], p["metadata"]["name"]),
        } for p in items]

    # Down ------------------------------------------------------------------------------

    def leftover_netns(self) -> list[str]:
        prefix = lab_prefix(self.name)
        return [ns for ns in netns.list_netns() if ns.startswith(prefix)]

    def down(self) -> dict[str, Any]:
        """Remove everything of this lab; safe to run at any time, also twice."""
        namespaces = self.leftover_netns()
        stopped: list[int] = []
        # Until nothing runs in them: a process being stopped can still start another
        # (an agent mid-pass starting wireguard-go). Names are deleted only after that —
        # a process in a namespace without a name could no longer be found.
        for _ in range(5):
            pids = sorted({pid for ns in namespaces for pid in netns.netns_pids(ns)})
            if not pids:
                break
            stopped += netns.stop_pids(pids)
        else:
            left = sorted({pid for ns in namespaces for pid in netns.netns_pids(ns)})
            if left:
                raise LabError(f"processes {left} keep running in the lab's namespaces; "
                               "nothing was deleted (run `lab down` again)")
        for ns in namespaces:
            netns.delete_netns(ns)
        removed_files = self.state_dir.exists()
        if removed_files:
            _remove_tree(self.state_dir)
        still = self.leftover_netns()
        if still:
            raise LabError(f"could not delete network namespaces {still}")
        return {"namespaces": namespaces, "processes": stopped, "state_dir": removed_files}

    # Status and exec -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        record = self.load_record()
        if record is None:
            return {"name": self.name, "up": False}
        topology = self._topology(record)
        present = set(netns.list_netns())
        nodes = []
        for node in topology.nodes:
            anchor = record.anchors.get(node.name)
            nodes.append({
                "name": node.name,
                "role": node.role,
                "underlayAddress": str(node.underlay_address),
                "podCIDR": str(node.pod_cidr),
                "netns": node.netns,
                "running": node.netns in present and anchor is not None
                and netns.pid_alive(anchor),
            })
        return {
            "name": self.name,
            "up": record.complete and self._is_running(record),
            "complete": record.complete,
            "stateDir": str(self.state_dir),
            "datastore": self._datastore_status(record),
            "clusterConfig": str(self.cluster_config_path),
            "underlay": {"cidr": str(UNDERLAY_CIDR), "netns": topology.underlay_netns},
            "nodes": nodes,
            "pods": self.pods(),
            "slots": self.slots(),
            "outside": {
                "address": str(OUTSIDE_ADDRESS),
                "netns": topology.outside_netns,
                "tcpEchoPort": ECHO_PORT,
                "udpEchoPort": ECHO_PORT,
                "running": record.echo_pid is not None and netns.pid_alive(record.echo_pid),
            },
            "monitor": {"address": str(MONITOR_ADDRESS), "netns": topology.monitor_netns},
        }

    def _datastore_status(self, record: LabRecord) -> dict[str, Any]:
        if record.datastore != "kube":
            return {"kind": "file", "path": str(self.datastore_dir)}
        from meshgress.lab.kube import control_plane_netns

        kube = self.kube()
        return {"kind": "kube", "server": kube.server_url,
                "netns": control_plane_netns(self.name), "running": kube.running(),
                "kubeconfig": str(kube.host_kubeconfig),
                "labKubeconfig": str(kube.lab_kubeconfig)}

    def kubectl_argv(self, args: list[str]) -> list[str]:
        """The argv of kubectl as the lab's admin (a lab on kube only)."""
        record = self._running_record()
        if record.datastore != "kube":
            raise LabError(f"lab {self.name!r} runs on the file datastore: kubectl needs "
                           "`lab up --datastore kube` (on file: `meshgress get/apply/delete`)")
        return self.kube().kubectl_argv(args)

    def _exec_datastore_env(self, record: LabRecord) -> list[str]:
        if record.datastore == "kube":
            return ["MESHGRESS_DATASTORE=kube", f"KUBECONFIG={self.kube().lab_kubeconfig}"]
        return [f"MESHGRESS_DATASTORE={self.datastore_dir}"]

    def exec_argv(self, target: str, command: list[str]) -> list[str]:
        """The argv that runs `command` inside TARGET: a node (its network and mount
        namespaces), `outside` or `monitor` (the monitoring host)."""
        if not command:
            raise LabError("lab exec: give a command after `--`")
        record = self.load_record()
        if record is None or not record.complete:
            raise LabError(f"lab {self.name!r} is not up (run `meshgress lab up`)")
        topology = self.topology()
        hosts = {"outside": topology.outside_netns, "monitor": topology.monitor_netns}
        if target in hosts:
            return ["nsenter", f"--net={netns.netns_path(hosts[target])}", "--", *command]
        if target in {n.name for n in topology.nodes}:
            # The node's name and datastore come along, so `meshgress status` just works
            # (on kube as the lab's admin, as an operator on the node would run it).
            return self._node_argv(record, target, [
                "env", f"MESHGRESS_NODE={target}", *self._exec_datastore_env(record),
                f"MESHGRESS_CLUSTER_CONFIG={self.cluster_config_path}",
                f"PATH={Path(_python()).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                *command])
        if "/" in target:
            namespace, _, name = target.partition("/")
            if not any(p["namespace"] == namespace and p["name"] == name for p in self.pods()):
                raise LabError(f"lab exec: no pod {target} in the lab")
            return ["nsenter", f"--net={netns.netns_path(self.pod_netns(namespace, name))}",
                    "--", *command]
        names = ", ".join([*hosts, *(n.name for n in topology.nodes), "NAMESPACE/POD"])
        raise LabError(f"lab exec: unknown target {target!r} (one of: {names})")


def _python() -> str:
    return sys.executable


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
