"""`meshgress lab graph`: each lab node's mesh as its kernel has it, for the picture.

In a real cluster `meshgress graph` can only ask each agent (its /metrics); in the lab
every node's namespaces are at hand, so each node is asked directly: `meshgress status
--json` runs inside the node's network and mount namespaces (as `lab exec` would run it)
and reads the WireGuard device itself. That works whether or not the node's agent runs,
and it also tells the key the node's own interface has. Whether the agent runs comes
from the lab's record. A node whose namespaces are gone, or whose status cannot be read,
is reported as not reached, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from meshgress.config import load_cluster_config
from meshgress.graph import (
    ClusterGraph,
    NodeObservation,
    collect_graph,
    not_reached,
    parse_status_observation,
)
from meshgress.lab import netns
from meshgress.lab.lab import Lab, LabError

STATUS_TIMEOUT = 30.0


def observe_lab_nodes(lab: Lab, names: Iterable[str],
                      timeout: float = STATUS_TIMEOUT) -> dict[str, NodeObservation]:
    """One observation per node name, all nodes at once."""
    record = lab.load_record()
    if record is None or not record.complete:
        raise LabError(f"lab {lab.name!r} is not up (run `meshgress lab up`)")
    members = {n.name for n in lab.topology().nodes}

    def observe(name: str) -> NodeObservation:
        if name not in members:
            return not_reached("not a node of this lab")
        try:
            argv = lab.exec_argv(name, [sys.executable, "-m", "meshgress.cli", "status",
                                        "--json"])
            proc = netns.run(argv, check=False, timeout=timeout)
        except (LabError, netns.CommandError) as exc:
            return not_reached(str(exc))
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return not_reached(f"meshgress status exited {proc.returncode}: {detail[0]}")
        pid = record.agents.get(name)
        return dataclasses.replace(parse_status_observation(doc),
                                   agent_running=pid is not None and netns.pid_alive(pid))

    wanted = sorted(set(names))
    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
        return dict(zip(wanted, pool.map(observe, wanted), strict=True))


def lab_graph(lab: Lab, now: float | None = None) -> ClusterGraph:
    """The lab's cluster, with every node observed from inside."""
    record = lab.load_record()
    if record is None or not record.complete:
        raise LabError(f"lab {lab.name!r} is not up (run `meshgress lab up`)")
    cluster = load_cluster_config(lab.cluster_config_path)
    store = lab.datastore()
    try:
        return collect_graph(store, cluster,
                             lambda nodes: observe_lab_nodes(lab, (n.name for n in nodes)),
                             now=time.time() if now is None else now)
    finally:
        store.close()
