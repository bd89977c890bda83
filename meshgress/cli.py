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
from collections.abc import Sequence
from pathlib import Path

from meshgress.config import ConfigError
from meshgress.datastore import DatastoreError
from meshgress.datastore.file import FileDatastore
from meshgress.kernel_ids import WIREGUARD_INTERFACE
from meshgress.lab.netns import CommandError
from meshgress.lab.topology import LabSpecError

# Node-side commands import pyroute2 and friends (~0.3 s); they are imported only when
# one of them runs, so `meshgress lab ...` stays quick to start.


def _lab_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a whole cluster in network namespaces on this machine")
    lab.add_argument("--name", default=os.environ.get("MESHGRESS_LAB", "lab"),
                     help="lab name; its network namespaces are named mg-NAME-* "
                          "(default: lab, or $MESHGRESS_LAB)")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", help="build the lab")
    up.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--gateway-nodes", type=int, default=2,
                    help="dedicated egress gateway nodes (default 2)")
    lab_sub.add_parser("down", help="remove every namespace, process and file of the lab")
    gw = lab_sub.add_parser("gateway", help="stop (drain), kill (crash) or start a gateway")
    gw.add_argument("action", choices=("stop", "kill", "start"))
    gw.add_argument("node")
    link = lab_sub.add_parser(
        "link", help="take a node's underlay link down or bring it back (its default route "
                     "is restored on up, as a host's network manager would)")
    link.add_argument("node")
    link.add_argument("state", choices=("down", "up"))
    link.add_argument("--carrier", action="store_true",
                      help="flap the switch side of the cable instead: the node's eth0 stays "
                           "up and loses its carrier")
    status = lab_sub.add_parser("status", help="what the lab has and whether it runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    exe = lab_sub.add_parser("exec", help="run a command inside a lab node or the outside host")
    exe.add_argument("target", help="a node name, `outside`, or a pod as NAMESPACE/NAME")
    exe.add_argument("exec_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command and its arguments")
    agent = lab_sub.add_parser("agent", help="stop, start or restart a node's agent")
    agent.add_argument("action", choices=("stop", "start", "restart"))
    agent.add_argument("node")
    add_node = lab_sub.add_parser("add-node", help="join one more worker node to the lab")
    add_node.add_argument("--json", action="store_true",
                          help="print the node and the times its agent started and was ready")
    remove = lab_sub.add_parser("remove-node", help="take a node out of the running lab")
    remove.add_argument("node")
    pod = lab_sub.add_parser("add-pod", help="create a pod through the CNI plugin")
    pod.add_argument("pod", metavar="NAMESPACE/NAME")
    pod.add_argument("--node", required=True)
    pod.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    demo = lab_sub.add_parser("demo", help="bring the lab up and show what it proves")
    demo.add_argument("--nodes", type=int, default=2)
    demo.add_argument("--gateway-nodes", type=int, default=2)


def _print_status(status: dict[str, object]) -> None:
    if not status.get("complete"):
        print(f"lab {status['name']}: not up")
        return
    print(f"lab {status['name']}: {'up' if status['up'] else 'DEGRADED'}   "
          f"datastore {status['datastore']}")
    for node in status["nodes"]:  # type: ignore[attr-defined]
        print(f"  {node['name']:<6} {node['role']:<8} {node['underlayAddress']:<12} "
              f"pod CIDR {node['podCIDR']:<16} {'running' if node['running'] else 'DOWN'}")
    outside: dict[str, object] = status["outside"]  # type: ignore[assignment]
    print(f"  outside  {outside['address']}  echo tcp/udp {outside['tcpEchoPort']}  "
          f"{'running' if outside['running'] else 'DOWN'}")
    for pod in status.get("pods") or []:  # type: ignore[attr-defined]
        print(f"  pod {pod['namespace']}/{pod['name']:<16} on {pod['node']:<6} {pod['address']}")
    for slot in status.get("slots") or []:  # type: ignore[attr-defined]
        holder = f"held by {slot['holder']} on {slot['node']}" if slot["holder"] else "NOT HELD"
        print(f"  egress slot {slot['gateway']}/{slot['index']} {slot['egressIP']:<12} {holder}")


def _run_lab(args: argparse.Namespace) -> int:
    from meshgress.lab.demo import run_demo
    from meshgress.lab.lab import Lab

    lab = Lab(args.name)
    if args.lab_command == "up":
        topology = lab.up(nodes=args.nodes, gateway_nodes=args.gateway_nodes)
        print(f"lab {lab.name} up: {len(topology.nodes)} nodes, datastore {lab.datastore_dir}")
        return 0
    if args.lab_command == "down":
        report = lab.down()
        print(f"lab {lab.name} down: removed {len(report['namespaces'])} network namespaces, "
              f"stopped {len(report['processes'])} processes")
        return 0
    if args.lab_command == "status":
        status = lab.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0 if status.get("up") else 1
    if args.lab_command == "exec":
        command = list(args.exec_command)
        if command and command[0] == "--":
            command = command[1:]
        argv = lab.exec_argv(args.target, command)
        os.execvp(argv[0], argv)
    if args.lab_command == "agent":
        lab.agent(args.action, args.node)
        print(f"lab {lab.name}: agent on {args.node}: {args.action} done")
        return 0
    if args.lab_command == "gateway":
        lab.gateway(args.action, args.node)
        print(f"lab {lab.name}: gateway on {args.node}: {args.action} done")
        return 0
    if args.lab_command == "link":
        lab.link(args.node, args.state, carrier=args.carrier)
        print(f"lab {lab.name}: {args.node} underlay link {args.state}"
              f"{' (carrier)' if args.carrier else ''}")
        return 0
    if args.lab_command == "add-node":
        node, timings = lab.add_node()
        print(json.dumps({"node": node.name, **timings}) if args.json else node.name)
        return 0
    if args.lab_command == "remove-node":
        lab.remove_node(args.node)
        return 0
    if args.lab_command == "add-pod":
        namespace, sep, name = args.pod.partition("/")
        labels = dict(item.split("=", 1) for item in args.label if "=" in item)
        if not sep or not namespace or not name or len(labels) != len(args.label):
            raise UsageError("lab add-pod: give NAMESPACE/NAME and labels as KEY=VALUE")
        print(lab.add_pod(namespace, name, args.node, labels=labels or None))
        return 0
    if args.lab_command == "demo":
        return 1 if run_demo(lab, args.nodes, args.gateway_nodes) else 0
    raise AssertionError(args.lab_command)


def _node_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from nodeagent.options import add_arguments as add_agent_arguments

    agent = sub.add_parser("agent", help="run the node agent (one per node)")
    add_agent_arguments(agent)
    agent.add_argument("--log-level", default="INFO")
    from gateway.options import add_arguments as add_gateway_arguments

    gateway = sub.add_parser("gateway", help="run an egress gateway (on a gateway node)")
    add_gateway_arguments(gateway)
    gateway.add_argument("--log-level", default="INFO")
    status = sub.add_parser("status", help="this node's mesh, checked against the cluster")
    status.add_argument("--node", default=os.environ.get("MESHGRESS_NODE"),
                        help="this node's name (default: $MESHGRESS_NODE)")
    status.add_argument("--datastore", type=Path,
                        default=os.environ.get("MESHGRESS_DATASTORE"),
                        help="the file datastore directory (default: $MESHGRESS_DATASTORE)")
    status.add_argument("--wireguard-backend", default="auto")
    status.add_argument("--json", action="store_true")
    explain = sub.add_parser("explain", help="which egress path a pod's traffic takes, and why")
    explain.add_argument("pod", metavar="NAMESPACE/NAME")
    explain.add_argument("--to", metavar="IP", help="a destination address")
    explain.add_argument("--datastore", type=Path,
                         default=os.environ.get("MESHGRESS_DATASTORE"),
                         help="the file datastore directory (default: $MESHGRESS_DATASTORE)")
    explain.add_argument("--cluster-config", type=Path,
                         default=os.environ.get("MESHGRESS_CLUSTER_CONFIG"),
                         help="cluster ranges YAML (default: $MESHGRESS_CLUSTER_CONFIG)")
    wg = sub.add_parser("wg-config", help="export the live mesh interface as a wg-quick file")
    wg.add_argument("--interface", default=WIREGUARD_INTERFACE)
    wg.add_argument("--wireguard-backend", default="auto")
    wg.add_argument("--no-private-key", action="store_true",
                    help="leave PrivateKey out (for sharing the file)")


def _run_status(args: argparse.Namespace) -> int:
    from nodeagent.host import NodeHost
    from nodeagent.status import collect_status, format_status
    from wireguard.backend import detect_backend

    if not args.node or not args.datastore:
        raise UsageError("status: give --node and --datastore (or set $MESHGRESS_NODE and "
                         "$MESHGRESS_DATASTORE)")
    store = FileDatastore(Path(args.datastore))
    try:
        report = collect_status(args.node, store, detect_backend(args.wireguard_backend),
                                NodeHost().underlay_mtu)
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
    store = FileDatastore(Path(args.datastore))
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


class UsageError(RuntimeError):
    """The command line asks for something impossible; the message says what to give."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgress",
        description="Encrypted pod-to-pod traffic and stable egress IPs for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    _node_commands(sub)
    _lab_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "lab":
            return _run_lab(args)
        if args.command == "agent":
            logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            from meshgress.assembly import run_agent

            return run_agent(args)
        if args.command == "gateway":
            logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            from meshgress.assembly import run_gateway

            return run_gateway(args)
        if args.command == "status":
            return _run_status(args)
        if args.command == "wg-config":
            return _run_wg_config(args)
        if args.command == "explain":
            return _run_explain(args)
    except (LabSpecError, CommandError, UsageError, ConfigError, DatastoreError,
            RuntimeError, ValueError, OSError) as exc:
        # Every error type of ours derives from one of these; a traceback helps nobody
        # at the command line, the message does.
        print(f"meshgress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
