"""The agent's command-line options and defaults, apart from the agent itself.

The CLI builds its parser for every command; keeping these here means `meshgress lab ...`
does not pay for importing the agent's kernel libraries just to describe `agent`'s flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshgress.datastore.options import add_datastore_arguments

DEFAULT_STATE_DIR = Path("/var/lib/meshgress")
DEFAULT_CNI_SOCKET = Path("/run/meshgress/cni.sock")
DEFAULT_METRICS_ADDRESS = "0.0.0.0:9820"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="this node's name (its Node object)")
    add_datastore_arguments(parser)
    parser.add_argument("--cluster-config", type=Path,
                        help="YAML with clusterPodCIDRs and serviceCIDRs "
                             "(default: 10.244.0.0/16 and 10.96.0.0/12)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--cni-socket", type=Path, default=DEFAULT_CNI_SOCKET)
    parser.add_argument("--wireguard-backend", choices=("auto", "kernel", "userspace"),
                        default="auto")
    parser.add_argument("--wireguard-log", type=Path,
                        help="append wireguard-go's own log to this file (userspace backend; "
                             "default: kept only to explain a failed start)")
    parser.add_argument("--wireguard-log-level", choices=("silent", "error", "verbose"),
                        default="error", help="wireguard-go's LOG_LEVEL (default error)")
    parser.add_argument("--mtu", type=int, help="mesh MTU (default: underlay MTU - 60/80)")
    parser.add_argument("--metrics-address", default=DEFAULT_METRICS_ADDRESS,
                        help="host:port for /metrics, /healthz and /readyz ('' = off)")
    parser.add_argument("--resync-interval", type=float, default=10.0)
    parser.add_argument("--node-grace", type=float, default=30.0,
                        help="seconds a vanished node keeps its peer")
