"""The `meshgress` command: one entry point for every process and tool meshgress ships.

Subcommands parse their arguments here and call into the package that owns the work;
no logic lives in this module beyond turning errors into a clear message and an exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from meshgress.lab.demo import run_demo
from meshgress.lab.lab import Lab, LabError
from meshgress.lab.netns import CommandError
from meshgress.lab.topology import LabSpecError


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
    status = lab_sub.add_parser("status", help="what the lab has and whether it runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    exe = lab_sub.add_parser("exec", help="run a command inside a lab node or the outside host")
    exe.add_argument("target", help="a node name or `outside`")
    exe.add_argument("exec_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command and its arguments")
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
    outside = status["outside"]
    print(f"  outside  {outside['address']}  echo tcp/udp {outside['tcpEchoPort']}  "  # type: ignore[index]
          f"{'running' if outside['running'] else 'DOWN'}")  # type: ignore[index]


def _run_lab(args: argparse.Namespace) -> int:
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
    if args.lab_command == "demo":
        return 1 if run_demo(lab, args.nodes, args.gateway_nodes) else 0
    raise AssertionError(args.lab_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgress",
        description="Encrypted pod-to-pod traffic and stable egress IPs for Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    _lab_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "lab":
            return _run_lab(args)
    except (LabError, LabSpecError, CommandError) as exc:
        print(f"meshgress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
