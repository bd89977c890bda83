"""The gateway's command-line options and defaults, apart from the gateway itself.

The CLI builds its parser for every command; keeping these here (standard library only)
means `meshgress lab ...` does not pay for importing the gateway's kernel libraries just
to describe `gateway`'s flags. `--log-level` is not defined here: the CLI adds it to every
long-running command the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meshgress.binaries import add_wireguard_arguments
from meshgress.datastore.options import add_datastore_arguments

DEFAULT_STATE_DIR = Path("/var/lib/meshgress/gateway")
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9821,node-ip:9821"
"""Loopback for the kubelet's probes, the node's InternalIP for Prometheus."""
DEFAULT_MAX_SLOTS = 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True,
                        help="this node's name (its Node object: labels, InternalIP)")
    add_datastore_arguments(parser)
    parser.add_argument("--cluster-config", type=Path,
                        help="YAML with clusterPodCIDRs and serviceCIDRs "
                             "(default: 10.244.0.0/16 and 10.96.0.0/12)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where the gateway keeps its WireGuard private key "
                             f"(default {DEFAULT_STATE_DIR})")
    parser.add_argument("--max-slots", type=_positive_int, default=DEFAULT_MAX_SLOTS,
                        help="egress IP slots to hold normally; a slot nobody else serves "
                             "is taken over beyond this (default 1)")
    add_wireguard_arguments(parser)
    parser.add_argument("--identity",
                        help="lease holder identity; must be unique among gateway processes "
                             "(e.g. the pod name; default NODE/PID)")
    parser.add_argument(
        "--metrics-address", default=DEFAULT_METRICS_ADDRESS,
        help="where /metrics, /healthz and /readyz listen: HOST:PORT[,HOST:PORT...], HOST "
             "an IP address or `node-ip` (this node's InternalIP, read from its Node "
             f"object); default {DEFAULT_METRICS_ADDRESS}: loopback for the kubelet's "
             "probes, the internal address for Prometheus. They have no authentication: "
             "0.0.0.0 would offer them on every interface (the node agent's table keeps "
             "pods away from this port: see its --endpoint-ports). '' = off")
    parser.add_argument("--flow-log", type=Path,
                        help="append one JSON line per new SNATed flow to this file")
    parser.add_argument("--resync-interval", type=float, default=10.0,
                        help="seconds between full reconciles when nothing changes")
