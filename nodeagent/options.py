"""The agent's command-line options and defaults, apart from the agent itself.

The CLI builds its parser for every command; keeping these here means `meshgress lab ...`
does not pay for importing the agent's kernel libraries just to describe `agent`'s flags.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from meshgress.binaries import add_wireguard_arguments
from meshgress.datastore.options import add_datastore_arguments

DEFAULT_STATE_DIR = Path("/var/lib/meshgress")
DEFAULT_CNI_SOCKET = Path("/run/meshgress/cni.sock")
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9820,node-ip:9820"
"""Loopback for the kubelet's probes, the node's InternalIP for Prometheus."""
DEFAULT_ENDPOINT_PORTS = (9820, 9821)
"""The agent's and the gateway's default metrics ports."""


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_ports(text: str) -> tuple[int, ...]:
    """"9820,9821" as ports; argparse's type for --endpoint-ports."""
    ports = []
    for item in _items(text):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise argparse.ArgumentTypeError(f"{item!r} is not a TCP port")
        ports.append(int(item))
    return tuple(ports)


def parse_cidrs(text: str) -> tuple[ipaddress.IPv4Network, ...]:
    """"10.0.0.0/8,192.0.2.7" as IPv4 networks; argparse's type for --metrics-allow-from."""
    nets = []
    for item in _items(text):
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise argparse.ArgumentTypeError(f"{item}: only IPv4 sources are supported")
        nets.append(net)
    return tuple(nets)


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(_items(text))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="this node's name (its Node object)")
    add_datastore_arguments(parser)
    parser.add_argument("--cluster-config", type=Path,
                        help="YAML with clusterPodCIDRs and serviceCIDRs "
                             "(default: 10.244.0.0/16 and 10.96.0.0/12)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where the agent keeps its WireGuard private key and the CNI "
                             f"plugin's address allocations (default {DEFAULT_STATE_DIR})")
    parser.add_argument("--cni-socket", type=Path, default=DEFAULT_CNI_SOCKET,
                        help="the unix socket the CNI plugin sends its requests to "
                             f"(default {DEFAULT_CNI_SOCKET})")
    parser.add_argument("--cni-conf-dir", type=Path,
                        help="the container runtime's CNI configuration folder: the agent "
                             "writes 10-meshgress.conflist there once it serves CNI requests, "
                             "and touches no other file (default: none is written)")
    add_wireguard_arguments(parser)
    parser.add_argument("--mtu", type=int, help="mesh MTU (default: underlay MTU - 60/80)")
    parser.add_argument(
        "--metrics-address", default=DEFAULT_METRICS_ADDRESS,
        help="where /metrics, /healthz and /readyz listen: HOST:PORT[,HOST:PORT...], HOST "
             "an IP address or `node-ip` (this node's InternalIP, read from its Node "
             f"object); default {DEFAULT_METRICS_ADDRESS}: loopback for the kubelet's "
             "probes, the internal address for Prometheus. They have no authentication: "
             "0.0.0.0 would offer them on every interface. '' = off")
    parser.add_argument(
        "--endpoint-ports", type=parse_ports, default=DEFAULT_ENDPOINT_PORTS,
        help="TCP ports of meshgress's endpoints on every node, guarded by this node's "
             "nftables table: pods never reach them (here or on another node), other "
             "sources only when they are a node of the cluster or in --metrics-allow-from, "
             "loopback always ('' = no guard). Default: the agent's and the gateway's "
             "(9820,9821); list yours when you change their --metrics-address (the "
             "agent's own ports are always added)")
    parser.add_argument(
        "--metrics-allow-from", type=parse_cidrs, default=(), metavar="CIDR[,CIDR...]",
        help="more sources that may reach the endpoints: a monitoring network outside "
             "the cluster (default: none)")
    parser.add_argument(
        "--metrics-allow-namespaces", type=parse_names, default=(),
        metavar="NAMESPACE[,NAMESPACE...]",
        help="pods of these namespaces may reach the endpoints: where an in-cluster "
             "Prometheus runs (default: none; from another node its scrapes arrive with "
             "that node's address and pass anyway, but on its own node they come from its "
             "pod address)")
    parser.add_argument("--resync-interval", type=float, default=10.0,
                        help="seconds between full reconciles, which read the whole dataplane "
                             "from the kernel and repair drift (default 10)")
    parser.add_argument("--node-grace", type=float, default=30.0,
                        help="seconds a vanished node keeps its peer (default 30)")
