"""The `meshgress` command: one entry point for every process and tool meshgress ships.

Subcommands parse their arguments here and call into the package that owns the work;
no logic lives in this module beyond turning errors into a clear message and an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from meshgress.binaries import WIREGUARD_BACKENDS
from meshgress.config import ConfigError
from meshgress.datastore import NAMESPACED, DatastoreError
from meshgress.datastore.choice import add_tool_datastore_arguments, open_datastore
from meshgress.datastore.options import KUBE
from meshgress.kernel_ids import WIREGUARD_INTERFACE
from meshgress.lab.netns import CommandError
from meshgress.lab.topology import LabSpecError
from meshgress.manifests import ManifestError

if TYPE_CHECKING:
    from meshgress.graph import ClusterGraph
    from meshgress.lab.lab import Lab

# Node-side commands import pyroute2 and friends (~0.3 s); they are imported only when
# one of them runs, so `meshgress lab ...` stays quick to start.


def _lab_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a whole cluster in network namespaces on this machine")
    lab.add_argument("--name", default=os.environ.get("MESHGRESS_LAB", "lab"),
                     help="lab name; its network namespaces are named mg-NAME-* "
                          "(default: lab, or $MESHGRESS_LAB)")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", help="build the lab")
    _lab_size_options(up)
    up.add_argument("--wireguard-go", metavar="PATH",
                    help="the wireguard-go the agents and gateways run (default: the current "
                         "release `make binaries` caches when it is there, else wireguard-go "
                         "on PATH)")
    _datastore_option(up)
    lab_sub.add_parser("down", help="remove every namespace, process and file of the lab")
    gw = lab_sub.add_parser("gateway", help="stop (drain), kill (crash) or start a gateway")
    gw.add_argument("action", choices=("stop", "kill", "start"),
                    help="stop (SIGTERM: it gives its slots up), kill (SIGKILL: a crash) or "
                         "start")
    gw.add_argument("node", metavar="NODE", help="a gateway node of the lab (gw1, gw2, ...)")
    link = lab_sub.add_parser(
        "link", help="take a node's underlay link down or bring it back (its default route "
                     "is restored on up, as a host's network manager would)")
    link.add_argument("node", metavar="NODE", help="a node of the lab (node1, gw1, ...)")
    link.add_argument("state", choices=("down", "up"), help="down or up")
    link.add_argument("--carrier", action="store_true",
                      help="flap the switch side of the cable instead: the node's eth0 stays "
                           "up and loses its carrier")
    status = lab_sub.add_parser("status", help="what the lab has and whether it runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    exe = lab_sub.add_parser(
        "exec", help="run a command inside a lab node, a pod, the outside or the monitoring host")
    exe.add_argument("target", metavar="TARGET",
                     help="a node name, `outside`, `monitor`, or a pod as NAMESPACE/NAME")
    exe.add_argument("exec_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command and its arguments")
    agent = lab_sub.add_parser("agent", help="stop, start or restart a node's agent")
    agent.add_argument("action", choices=("stop", "start", "restart"),
                       help="stop, start or restart (the node's dataplane stays in place)")
    agent.add_argument("node", metavar="NODE", help="a node of the lab (node1, gw1, ...)")
    add_node = lab_sub.add_parser("add-node", help="join one more worker node to the lab")
    add_node.add_argument("--json", action="store_true",
                          help="print the node and the times its agent started and was ready")
    remove = lab_sub.add_parser("remove-node", help="take a node out of the running lab")
    remove.add_argument("node", metavar="NODE", help="a node of the lab (node1, ...)")
    pod = lab_sub.add_parser("add-pod", help="create a pod through the CNI plugin")
    pod.add_argument("pod", metavar="NAMESPACE/NAME", help="the pod's namespace and name")
    pod.add_argument("--node", required=True, help="the node the pod runs on")
    pod.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="a label of the pod (repeat for more)")
    lab_graph = lab_sub.add_parser(
        "graph", help="the lab's cluster as Graphviz, each node observed from inside",
        description="The lab's cluster as Graphviz (see `meshgress graph`). Each node is "
                    "observed from inside: `meshgress status --json` runs in its "
                    "namespaces and reads its WireGuard device, so a node whose agent is "
                    "stopped still shows what it has configured.")
    _add_graph_output(lab_graph)
    demo = lab_sub.add_parser("demo", help="bring the lab up and show what it proves")
    _lab_size_options(demo)
    _datastore_option(demo)
    _object_commands(lab_sub, in_lab=True)
    kubectl = lab_sub.add_parser(
        "kubectl", help="run kubectl as the lab's admin (a lab up with --datastore kube)")
    kubectl.add_argument("kubectl_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                         help="kubectl's arguments")


def _cluster_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster-config", type=Path,
                        default=os.environ.get("MESHGRESS_CLUSTER_CONFIG"),
                        help="cluster ranges YAML (default: $MESHGRESS_CLUSTER_CONFIG)")


def _lab_size_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--gateway-nodes", type=int, default=2,
                        help="dedicated egress gateway nodes (default 2)")


def _object_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], *,
                     in_lab: bool = False) -> None:
    """apply/get/delete: for the file datastore (or, under `lab`, the lab's datastore,
    whichever it is)."""
    where = "the lab's datastore" if in_lab else "a file datastore"
    apply = sub.add_parser("apply", help=f"create or update EgressGateways and EgressPolicies "
                                         f"in {where}, as kubectl apply")
    apply.add_argument("-f", "--filename", required=True, action="append",
                       help="a YAML file (several documents allowed), or - for stdin")
    get = sub.add_parser("get", help=f"show objects of {where}, as kubectl get")
    get.add_argument("resource", metavar="KIND",
                     help="egressgateways (egw), egresspolicies (egp), nodes, pods, "
                          "namespaces, leases")
    # Not `name`: under `lab`, args.name is the lab's.
    get.add_argument("object_name", nargs="?", metavar="NAME",
                     help="one object (default: every object of the kind)")
    get.add_argument("-o", "--output", choices=("table", "wide", "yaml", "json", "name"),
                     default="table", help="as kubectl: a table (default), wide, yaml, json "
                                           "or name")
    get.add_argument("-n", "--namespace", default=None,
                     help="for pods and leases: the namespace (default: default)")
    get.add_argument("-A", "--all-namespaces", action="store_true",
                     help="for pods and leases: every namespace")
    delete = sub.add_parser("delete", help=f"delete an EgressGateway or EgressPolicy from "
                                           f"{where}")
    delete.add_argument("resource", metavar="KIND",
                        help="egressgateways (egw) or egresspolicies (egp)")
    delete.add_argument("object_name", metavar="NAME", help="the object's name")
    if in_lab:
        return
    for parser in (apply, get, delete):
        add_tool_datastore_arguments(parser)
    apply.add_argument("--cluster-config", type=Path,
                       default=os.environ.get("MESHGRESS_CLUSTER_CONFIG"),
                       help="cluster ranges YAML, which no egress IP may fall in "
                            "(default: $MESHGRESS_CLUSTER_CONFIG)")


def _read_manifests(filenames: list[str]) -> list[tuple[str, str]]:
    """(source, text) of each -f argument, as kubectl names them in messages."""
    out = []
    for name in filenames:
        if name == "-":
            out.append(("STDIN", sys.stdin.read()))
        else:
            try:
                out.append((name, Path(name).read_text()))
            except OSError as exc:
                raise ManifestError(f'error: the path "{name}" does not exist'
                                    if isinstance(exc, FileNotFoundError)
                                    else f"error: {name}: {exc.strerror}") from None
    return out


def _run_object_command(args: argparse.Namespace, datastore: str | Path | None,
                        cluster_config: Path | None, kubeconfig: Path | None = None) -> int:
    from meshgress.config import DEFAULT_CLUSTER_CONFIG, load_cluster_config
    from meshgress.manifests import (
        DEFAULT_NAMESPACE,
        apply_manifests,
        check_manifest,
        delete_object,
        format_objects,
        get_objects,
        parse_manifests,
        resolve_resource,
    )

    command = args.lab_command if args.command == "lab" else args.command
    if datastore is None:
        raise UsageError(f"{command}: give --datastore (or set $MESHGRESS_DATASTORE)")
    if str(datastore) != KUBE and not Path(datastore).is_dir():
        raise UsageError(f"{command}: no datastore at {datastore}")
    if command == "apply":
        cluster = load_cluster_config(cluster_config) if cluster_config \
            else DEFAULT_CLUSTER_CONFIG
        manifests, errors = [], []
        for source, text in _read_manifests(args.filename):
            for doc in parse_manifests(text, source):
                try:
                    manifests.append(check_manifest(doc, source, cluster))
                except ManifestError as exc:
                    errors.append(str(exc))
        if errors:  # one bad document: nothing is written
            raise ManifestError("\n".join(errors))
        if not manifests:
            raise ManifestError("error: no objects passed to apply")
        store = open_datastore(datastore, kubeconfig)
        try:
            print("\n".join(apply_manifests(store, manifests)))
        finally:
            store.close()
        return 0
    resource = resolve_resource(args.resource)
    store = open_datastore(datastore, kubeconfig)
    try:
        if command == "delete":
            print(delete_object(store, resource, args.object_name))
            return 0
        namespace = None if args.all_namespaces else (args.namespace or DEFAULT_NAMESPACE)
        objects = get_objects(store, resource, args.object_name, namespace)
    finally:
        store.close()
    if not objects:
        print("No resources found" + (f" in {namespace} namespace." if namespace and
                                      resource.kind in NAMESPACED else "."), file=sys.stderr)
        return 0
    sys.stdout.write(format_objects(resource, objects, args.output,
                                    named=bool(args.object_name),
                                    all_namespaces=args.all_namespaces))
    return 0


def _datastore_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", choices=("file", "kube"), default="file",
                        help="file: the embedded file datastore (default); kube: a real "
                             "kube-apiserver and etcd in the lab, agents and gateways under "
                             "their own ServiceAccounts")


def _print_status(status: dict[str, object]) -> None:
    if not status.get("complete"):
        print(f"lab {status['name']}: not up")
        return
    datastore: dict[str, object] = status["datastore"]  # type: ignore[assignment]
    where = (datastore["path"] if datastore["kind"] == "file"
             else f"{datastore['server']} (kubeconfig {datastore['kubeconfig']})")
    print(f"lab {status['name']}: {'up' if status['up'] else 'DEGRADED'}   "
          f"datastore {datastore['kind']}: {where}")
    for node in status["nodes"]:  # type: ignore[attr-defined]
        print(f"  {node['name']:<6} {node['role']:<8} {node['underlayAddress']:<12} "
              f"pod CIDR {node['podCIDR']:<16} {'running' if node['running'] else 'DOWN'}")
    outside: dict[str, object] = status["outside"]  # type: ignore[assignment]
    print(f"  outside  {outside['address']}  echo tcp/udp {outside['tcpEchoPort']}  "
          f"{'running' if outside['running'] else 'DOWN'}")
    monitor: dict[str, object] = status["monitor"]  # type: ignore[assignment]
    print(f"  monitor  {monitor['address']}  may scrape every node's endpoints")
    for pod in status.get("pods") or []:  # type: ignore[attr-defined]
        print(f"  pod {pod['namespace']}/{pod['name']:<16} on {pod['node']:<6} {pod['address']}")
    for slot in status.get("slots") or []:  # type: ignore[attr-defined]
        holder = f"held by {slot['holder']} on {slot['node']}" if slot["holder"] else "NOT HELD"
        print(f"  egress slot {slot['gateway']}/{slot['index']} {slot['egressIP']:<12} {holder}")


def _lab_up(lab: Lab, args: argparse.Namespace) -> int:
    topology = lab.up(nodes=args.nodes, gateway_nodes=args.gateway_nodes,
                      datastore=args.datastore, wireguard_go=args.wireguard_go)
    if args.datastore == "kube":
        kube = lab.kube()
        print(f"lab {lab.name} up: {len(topology.nodes)} nodes, datastore kube: API server "
              f"{kube.server_url} in network namespace {kube.netns}")
        print("use it from this shell with kubectl (or `meshgress lab kubectl -- ...`):")
        print(f"export KUBECONFIG={kube.host_kubeconfig}")
    else:
        print(f"lab {lab.name} up: {len(topology.nodes)} nodes, "
              f"datastore {lab.datastore_dir}")
    return 0


def _after_dashes(command: Sequence[str]) -> list[str]:
    command = list(command)
    return command[1:] if command and command[0] == "--" else command


def _lab_kubectl(lab: Lab, args: argparse.Namespace) -> int:
    argv = lab.kubectl_argv(_after_dashes(args.kubectl_args))
    os.execvp(argv[0], argv)


def _lab_down(lab: Lab, args: argparse.Namespace) -> int:
    report = lab.down()
    print(f"lab {lab.name} down: removed {len(report['namespaces'])} network namespaces, "
          f"stopped {len(report['processes'])} processes")
    return 0


def _lab_status(lab: Lab, args: argparse.Namespace) -> int:
    status = lab.status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0 if status.get("up") else 1


def _lab_exec(lab: Lab, args: argparse.Namespace) -> int:
    argv = lab.exec_argv(args.target, _after_dashes(args.exec_command))
    os.execvp(argv[0], argv)


def _lab_agent(lab: Lab, args: argparse.Namespace) -> int:
    lab.agent(args.action, args.node)
    print(f"lab {lab.name}: agent on {args.node}: {args.action} done")
    return 0


def _lab_gateway(lab: Lab, args: argparse.Namespace) -> int:
    lab.gateway(args.action, args.node)
    print(f"lab {lab.name}: gateway on {args.node}: {args.action} done")
    return 0


def _lab_link(lab: Lab, args: argparse.Namespace) -> int:
    lab.link(args.node, args.state, carrier=args.carrier)
    print(f"lab {lab.name}: {args.node} underlay link {args.state}"
          f"{' (carrier)' if args.carrier else ''}")
    return 0


def _lab_add_node(lab: Lab, args: argparse.Namespace) -> int:
    node, timings = lab.add_node()
    print(json.dumps({"node": node.name, **timings}) if args.json else node.name)
    return 0


def _lab_remove_node(lab: Lab, args: argparse.Namespace) -> int:
    lab.remove_node(args.node)
    return 0


def _lab_add_pod(lab: Lab, args: argparse.Namespace) -> int:
    namespace, sep, name = args.pod.partition("/")
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    if not sep or not namespace or not name or len(labels) != len(args.label):
        raise UsageError("lab add-pod: give NAMESPACE/NAME and labels as KEY=VALUE")
    print(lab.add_pod(namespace, name, args.node, labels=labels or None))
    return 0


def _lab_graph(lab: Lab, args: argparse.Namespace) -> int:
    from meshgress.lab.observe import lab_graph

    return _write_graph(lab_graph(lab), args)


def _lab_demo(lab: Lab, args: argparse.Namespace) -> int:
    from meshgress.lab.demo import run_demo

    return 1 if run_demo(lab, args.nodes, args.gateway_nodes, datastore=args.datastore) else 0


def _run_lab_object_command(lab: Lab, args: argparse.Namespace) -> int:
    """On a file lab: the file datastore's apply/get/delete; on a kube lab: kubectl (the
    API server validates)."""
    record = lab.load_record()
    if record is None or not record.complete:
        raise UsageError(f"lab {lab.name!r} is not up (run `meshgress lab up`)")
    if record.datastore == "file":
        return _run_object_command(args, lab.datastore_dir, lab.cluster_config_path)
    if args.lab_command == "apply":
        kubectl_args = ["apply", *(f"--filename={f}" for f in args.filename)]
    elif args.lab_command == "delete":
        kubectl_args = ["delete", args.resource, args.object_name]
    else:
        kubectl_args = ["get", args.resource, *([args.object_name] if args.object_name else []),
                        *(["-o", args.output] if args.output != "table" else []),
                        *(["-n", args.namespace] if args.namespace else []),
                        *(["-A"] if args.all_namespaces else [])]
    argv = lab.kubectl_argv(kubectl_args)
    os.execvp(argv[0], argv)


_LAB_COMMANDS: dict[str, Callable[[Lab, argparse.Namespace], int]] = {
    "up": _lab_up, "kubectl": _lab_kubectl, "down": _lab_down, "status": _lab_status,
    "exec": _lab_exec, "agent": _lab_agent, "gateway": _lab_gateway, "link": _lab_link,
    "add-node": _lab_add_node, "remove-node": _lab_remove_node, "add-pod": _lab_add_pod,
    "apply": _run_lab_object_command, "get": _run_lab_object_command,
    "delete": _run_lab_object_command,
    "graph": _lab_graph, "demo": _lab_demo,
}


def _run_lab(args: argparse.Namespace) -> int:
    from meshgress.lab.lab import Lab

    return _LAB_COMMANDS[args.lab_command](Lab(args.name), args)


def _node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from nodeagent.options import add_arguments as add_agent_arguments

    agent = sub.add_parser("agent", help="run the node agent (one per node)")
    add_agent_arguments(agent)
    _log_level_option(agent)
    from gateway.options import add_arguments as add_gateway_arguments

    gateway = sub.add_parser("gateway", help="run an egress gateway (on a gateway node)")
    add_gateway_arguments(gateway)
    _log_level_option(gateway)
    status = sub.add_parser(
        "status", help="this node's mesh and egress slots, checked against the cluster; "
                       "exits 1 on any problem")
    status.add_argument("--node", default=os.environ.get("MESHGRESS_NODE"),
                        help="this node's name (default: $MESHGRESS_NODE)")
    add_tool_datastore_arguments(status)
    _cluster_config_option(status)
    _wireguard_backend_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    explain = sub.add_parser("explain", help="which egress path a pod's traffic takes, and why")
    explain.add_argument("pod", metavar="NAMESPACE/NAME", help="the pod's namespace and name")
    explain.add_argument("--to", metavar="IP", help="a destination address")
    add_tool_datastore_arguments(explain)
    _cluster_config_option(explain)
    wg = sub.add_parser("wg-config", help="export the live mesh interface as a wg-quick file")
    wg.add_argument("--interface", default=WIREGUARD_INTERFACE,
                    help=f"the WireGuard interface (default {WIREGUARD_INTERFACE})")
    _wireguard_backend_option(wg)
    wg.add_argument("--no-private-key", action="store_true",
                    help="leave PrivateKey out (for sharing the file)")


def _log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def _wireguard_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wireguard-backend", default="auto", choices=WIREGUARD_BACKENDS,
                        help="how to read this node's WireGuard interface: kernel, userspace "
                             "(wireguard-go) or auto, as the agent chose (default auto)")


def _run_status(args: argparse.Namespace) -> int:
    from meshgress.config import DEFAULT_CLUSTER_CONFIG, load_cluster_config
    from nodeagent.host import NodeHost
    from nodeagent.status import collect_status, format_status
    from wireguard.backend import detect_backend

    if not args.node or not args.datastore:
        raise UsageError("status: give --node and --datastore (or set $MESHGRESS_NODE and "
                         "$MESHGRESS_DATASTORE)")
    cluster = (load_cluster_config(Path(args.cluster_config)) if args.cluster_config
               else DEFAULT_CLUSTER_CONFIG)
    store = open_datastore(args.datastore, args.kubeconfig)
    try:
        report = collect_status(args.node, store, detect_backend(args.wireguard_backend),
                                NodeHost().underlay_mtu, cluster=cluster)
    finally:
        store.close()
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_status(report))
    return 0 if report.healthy else 1


def _run_explain(args: argparse.Namespace) -> int:
    from meshgress.config import DEFAULT_CLUSTER_CONFIG, load_cluster_config
    from meshgress.explain import collect_and_explain

    if not args.datastore:
        raise UsageError("explain: give --datastore (or set $MESHGRESS_DATASTORE)")
    cluster = (load_cluster_config(Path(args.cluster_config)) if args.cluster_config
               else DEFAULT_CLUSTER_CONFIG)
    store = open_datastore(args.datastore, args.kubeconfig)
    try:
        print("\n".join(collect_and_explain(store, cluster, args.pod, args.to)))
    finally:
        store.close()
    return 0


def _run_wg_config(args: argparse.Namespace) -> int:
    from wireguard.backend import detect_backend
    from wireguard.export import export_wg_quick

    device = detect_backend(args.wireguard_backend).read(args.interface)
    if device is None:
        raise UsageError(f"wg-config: no WireGuard interface {args.interface} on this node")
    sys.stdout.write(export_wg_quick(device, include_private_key=not args.no_private_key))
    return 0


GRAPH_HELP = """\
The cluster as Graphviz: nodes with their pod CIDRs, a WireGuard edge per pair of nodes
coloured by the latest handshake and dashed where one end has configured a key for the
other that is not the key the other publishes (or no peer at all), the egress gateways
with their slots, egress IPs and holders, and which policies send which namespaces
through which gateway.

Where the nodes' side comes from: each node's agent is asked directly, on its /metrics
(per peer: the key configured for it and the age of its latest handshake). Not a
Prometheus server: one may not be set up, its series are a scrape old, and how it labels
targets (which node an instance is) depends on its configuration; asking the agents shows
the cluster as it is now, at the price of reaching every node's agent from where this
command runs (the node's InternalIP and the agent's metrics port: --metrics-url). A node
whose agent does not answer is drawn as not reached, with the reason. Output is sorted:
the same cluster gives byte-identical dot."""


def _add_graph_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--format", choices=("dot", "svg", "png"), default="dot",
                        help="dot (text), or svg/png rendered by Graphviz's dot (default dot)")
    parser.add_argument("--output", type=Path,
                        help="write to this file (default: standard output)")


def _graph_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from nodeagent.options import DEFAULT_METRICS_ADDRESS

    agent_port = DEFAULT_METRICS_ADDRESS.rpartition(":")[2]
    graph = sub.add_parser("graph", help="the cluster as Graphviz (nodes, WireGuard links, "
                                         "egress gateways and policies)",
                           description=GRAPH_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tool_datastore_arguments(graph)
    graph.add_argument("--cluster-config", type=Path,
                       default=os.environ.get("MESHGRESS_CLUSTER_CONFIG"),
                       help="cluster ranges YAML (default: $MESHGRESS_CLUSTER_CONFIG)")
    graph.add_argument("--metrics-url",
                       default=f"http://{{address}}:{agent_port}/metrics",
                       help="each agent's /metrics URL: {address} is the node's InternalIP, "
                            "{node} its name (default: %(default)s)")
    graph.add_argument("--timeout", type=float, default=3.0,
                       help="seconds to wait for each agent (default 3)")
    _add_graph_output(graph)


def _run_graph(args: argparse.Namespace) -> int:
    from functools import partial

    from meshgress.config import DEFAULT_CLUSTER_CONFIG, load_cluster_config
    from meshgress.graph import check_metrics_url, collect_graph, scrape_agents

    if not args.datastore:
        raise UsageError("graph: give --datastore (or set $MESHGRESS_DATASTORE)")
    if args.timeout <= 0:
        raise UsageError("graph: --timeout must be positive")
    check_metrics_url(args.metrics_url)
    cluster = (load_cluster_config(Path(args.cluster_config)) if args.cluster_config
               else DEFAULT_CLUSTER_CONFIG)
    store = open_datastore(args.datastore, args.kubeconfig)
    try:
        graph = collect_graph(store, cluster, partial(
            scrape_agents, url_template=args.metrics_url, timeout=args.timeout))
    finally:
        store.close()
    return _write_graph(graph, args)


def _write_graph(graph: ClusterGraph, args: argparse.Namespace) -> int:
    from meshgress.graph import render_dot, render_image

    data = render_image(render_dot(graph), args.format)
    if args.output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        args.output.write_bytes(data)
    return 0


class UsageError(RuntimeError):
    """The command line asks for something impossible; the message says what to give."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgress",
        description="Encrypted pod-to-pod traffic and stable egress IPs for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    _node_commands(sub)
    _object_commands(sub)
    _graph_command(sub)
    _lab_commands(sub)
    return parser


def _run_process(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meshgress.assembly import run_agent, run_gateway

    return run_agent(args) if args.command == "agent" else run_gateway(args)


def _run_object(args: argparse.Namespace) -> int:
    return _run_object_command(args, args.datastore, getattr(args, "cluster_config", None),
                               args.kubeconfig)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "lab": _run_lab, "agent": _run_process, "gateway": _run_process, "status": _run_status,
    "wg-config": _run_wg_config, "explain": _run_explain, "apply": _run_object,
    "get": _run_object, "delete": _run_object, "graph": _run_graph,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ManifestError as exc:
        print(exc, file=sys.stderr)  # already in kubectl's words
        return 1
    except (LabSpecError, CommandError, UsageError, ConfigError, DatastoreError,
            RuntimeError, ValueError, OSError) as exc:
        # Every error type of ours derives from one of these; a traceback helps nobody
        # at the command line, the message does.
        print(f"meshgress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
