"""The lab: a whole meshgress cluster in network namespaces on one Linux machine.

`Lab.up` builds the topology computed in `topology.py`: an underlay bridge in its own
namespace, one namespace per node with a veth port on that bridge, an "outside" host with
the echo service, and the cluster's Node and Namespace objects in a file datastore. Each
node gets a mount namespace of its own, held open by an anchor process, with a private
`/var/run/wireguard` (wireguard-go's socket folder is global otherwise) and its own state
directory bound onto `/var/lib/meshgress`, so node processes use production paths and
interface names unchanged. `Lab.down` removes every namespace, process and file the lab
made; it finds them by the lab's name prefix, so it also cleans up after a crashed or
killed `up`.

Everything lives inside namespaces the lab created: nothing here configures the host's
own network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshgress.config import dump_cluster_config
from meshgress.datastore.file import FileDatastore
from meshgress.lab import netns
from meshgress.lab.topology import (
    ECHO_PORT,
    OUTSIDE_ADDRESS,
    UNDERLAY_CIDR,
    LabNode,
    LabTopology,
    compute_cluster_objects,
    compute_lab_topology,
    lab_cluster_config,
    lab_prefix,
)

LAB_STATE_ROOT = Path(os.environ.get("MESHGRESS_LAB_ROOT", "/run/meshgress-lab"))
WIREGUARD_SOCKET_DIR = "/var/run/wireguard"
NODE_STATE_DIR = "/var/lib/meshgress"
"""The production state directory; in the lab each node's own folder is bound onto it."""

ANCHOR_SCRIPT = """set -e
mount -t tmpfs -o mode=0755,size=16m meshgress-lab "{wg}"
mount --bind "{state}" "{node_state}"
: > "{ready}"
exec sleep infinity
"""
"""Runs inside `unshare --mount --propagation slave`: mounts made here stay in the node's
mount namespace, while named network namespaces created later on the host (pods) still
appear in it."""


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why and what to do."""


@dataclass
class LabRecord:
    """What `lab up` wrote down, so status and down need no guessing."""

    name: str
    nodes: int
    gateway_nodes: int
    complete: bool = False
    created: float = field(default_factory=time.time)
    anchors: dict[str, int] = field(default_factory=dict)
    echo_pid: int | None = None


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

    def node_dir(self, node: str) -> Path:
        return self.state_dir / "nodes" / node

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
        return compute_lab_topology(record.name, record.nodes, record.gateway_nodes)

    def datastore(self) -> FileDatastore:
        return FileDatastore(self.datastore_dir)

    # Up --------------------------------------------------------------------------------

    def up(self, nodes: int = 2, gateway_nodes: int = 2) -> LabTopology:
        topology = compute_lab_topology(self.name, nodes, gateway_nodes)
        existing = self.load_record()
        if existing and existing.complete and self._is_running(existing):
            raise LabError(f"lab {self.name!r} is already up; run `meshgress lab down` first")
        self.down()  # leftovers of a crashed or killed run
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = LabRecord(name=self.name, nodes=nodes, gateway_nodes=gateway_nodes)
        self._save_record(record)
        try:
            self._build_network(topology)
            for node in topology.nodes:
                record.anchors[node.name] = self._start_anchor(node)
                self._save_record(record)
            record.echo_pid = self._start_echo(topology)
            self._save_record(record)
            self._write_cluster(topology)
            self._wait_ready(topology, record)
        except BaseException:
            self.down()
            raise
        record.complete = True
        self._save_record(record)
        return topology

    def _build_network(self, topology: LabTopology) -> None:
        for name in topology.netns_names:
            netns.add_netns(name)
        underlay = topology.underlay_netns
        netns.ip_batch(underlay, [f"link add {topology.bridge} type bridge",
                                  f"link set {topology.bridge} up"])
        plen = UNDERLAY_CIDR.prefixlen
        attach: list[tuple[str, str, str]] = [
            (node.underlay_ifname, node.netns, f"{node.underlay_address}/{plen}")
            for node in topology.nodes
        ]
        attach.append(("outside", topology.outside_netns, f"{OUTSIDE_ADDRESS}/{plen}"))
        for port, member_ns, address in attach:
            netns.ip_batch(underlay, [
                f"link add {port} type veth peer name eth0 netns {member_ns}",
                f"link set {port} master {topology.bridge}",
                f"link set {port} up",
            ])
            commands = [f"address add {address} dev eth0", "link set eth0 up"]
            if member_ns != topology.outside_netns:
                # The outside host stands for the internet: nodes route to it by default,
                # as real nodes have a default route (proxy ARP for pods relies on one).
                commands.append(f"route add default via {OUTSIDE_ADDRESS}")
            netns.ip_batch(member_ns, commands)
        for node in topology.nodes:
            netns.sysctl(node.netns, {"net.ipv4.ip_forward": "1"})

    def _start_anchor(self, node: LabNode) -> int:
        node_dir = self.node_dir(node.name)
        state = node_dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        ready = node_dir / "anchor.ready"
        ready.unlink(missing_ok=True)
        # Mount points must exist on the host before a private mount can sit on them.
        Path(WIREGUARD_SOCKET_DIR).mkdir(parents=True, exist_ok=True)
        Path(NODE_STATE_DIR).mkdir(parents=True, exist_ok=True)
        script = ANCHOR_SCRIPT.format(wg=WIREGUARD_SOCKET_DIR, state=state,
                                      node_state=NODE_STATE_DIR, ready=ready)
        argv = ["nsenter", f"--net={netns.netns_path(node.netns)}",
                "unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script]
        return netns.spawn_detached(argv, self.log_path(f"{node.name}-anchor"))

    def _start_echo(self, topology: LabTopology) -> int:
        self.echo_log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["nsenter", f"--net={netns.netns_path(topology.outside_netns)}",
                _python(), "-m", "meshgress.lab.echo", "serve",
                "--port", str(ECHO_PORT), "--log", str(self.echo_log_path)]
        return netns.spawn_detached(argv, self.log_path("outside-echo"))

    def _write_cluster(self, topology: LabTopology) -> None:
        self.cluster_config_path.write_text(yaml.safe_dump(dump_cluster_config(
            lab_cluster_config())))
        store = self.datastore()
        try:
            for obj in compute_cluster_objects(topology):
                store.apply(obj)
        finally:
            store.close()

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

    def _is_running(self, record: LabRecord) -> bool:
        topology = compute_lab_topology(record.name, record.nodes, record.gateway_nodes)
        present = set(netns.list_netns())
        return (all(ns in present for ns in topology.netns_names)
                and all(netns.pid_alive(pid) for pid in record.anchors.values()))

    # Down ------------------------------------------------------------------------------

    def leftover_netns(self) -> list[str]:
        prefix = lab_prefix(self.name)
        return [ns for ns in netns.list_netns() if ns.startswith(prefix)]

    def down(self) -> dict[str, Any]:
        """Remove everything of this lab; safe to run at any time, also twice."""
        namespaces = self.leftover_netns()
        pids: set[int] = set()
        for ns in namespaces:
            pids.update(netns.netns_pids(ns))
        stopped = netns.stop_pids(sorted(pids))
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
        topology = compute_lab_topology(record.name, record.nodes, record.gateway_nodes)
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
            "datastore": str(self.datastore_dir),
            "clusterConfig": str(self.cluster_config_path),
            "underlay": {"cidr": str(UNDERLAY_CIDR), "netns": topology.underlay_netns},
            "nodes": nodes,
            "pods": [],
            "outside": {
                "address": str(OUTSIDE_ADDRESS),
                "netns": topology.outside_netns,
                "tcpEchoPort": ECHO_PORT,
                "udpEchoPort": ECHO_PORT,
                "running": record.echo_pid is not None and netns.pid_alive(record.echo_pid),
            },
        }

    def exec_argv(self, target: str, command: list[str]) -> list[str]:
        """The argv that runs `command` inside TARGET: a node (its network and mount
        namespaces) or `outside`."""
        if not command:
            raise LabError("lab exec: give a command after `--`")
        record = self.load_record()
        if record is None or not record.complete:
            raise LabError(f"lab {self.name!r} is not up (run `meshgress lab up`)")
        topology = self.topology()
        if target == "outside":
            return ["nsenter", f"--net={netns.netns_path(topology.outside_netns)}", "--",
                    *command]
        if target in {n.name for n in topology.nodes}:
            anchor = record.anchors.get(target)
            if anchor is None or not netns.pid_alive(anchor):
                raise LabError(f"node {target}: its mount namespace is gone; run lab down/up")
            return ["nsenter", f"--target={anchor}", "--net", "--mount", "--", *command]
        names = ", ".join(["outside", *(n.name for n in topology.nodes)])
        raise LabError(f"lab exec: unknown target {target!r} (one of: {names})")


def _python() -> str:
    return sys.executable


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
