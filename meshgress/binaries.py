"""Where the real programs meshgress runs are found, and which wireguard-go it starts.

`make binaries` builds pinned programs once into a cache keyed by version
(`${MESHGRESS_CACHE:-/var/cache/meshgress}/bin/<tool>-<version>/<binary>`, see
tests/infra/README.md). The lab's control plane finds kube-apiserver and etcd there
(`meshgress.lab.controlplane`); the node agent and the gateway find wireguard-go there.

Why not simply `wireguard-go` on PATH: Debian's (0.0.20220316) predates the TUN segmentation
offloads (GSO/GRO) that later releases use to move 64 KB at a time between the kernel and
wireguard-go; on the project's machines the current release carries more than five times the
TCP throughput of Debian's through the same datapath (README, Benchmarks). So unless told
(`--wireguard-go PATH`), agent and gateway run the cached current build when it is there and
`wireguard-go` on PATH otherwise (an image ships the build as /usr/local/bin/wireguard-go,
which comes first on PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

WIREGUARD_GO_VERSION = "v0.0.0-20260522210424-ecfc5a8d5446"
"""golang.zx2c4.com/wireguard as tests/infra/wireguard-go/go.mod pins it (release
0.0.20250522; the module proxy knows release tags only as pseudo-versions)."""
WIREGUARD_GO_ON_PATH = "wireguard-go"


def cache_root() -> Path:
    return Path(os.environ.get("MESHGRESS_CACHE", "/var/cache/meshgress"))


def cached_binary(tool: str, version: str, binary: str | None = None) -> Path:
    """Where `make binaries` puts `tool` at `version` (whether or not it is there)."""
    return cache_root() / "bin" / f"{tool}-{version}" / (binary or tool)


def cached_wireguard_go() -> Path:
    return cached_binary("wireguard-go", WIREGUARD_GO_VERSION)


def default_wireguard_go() -> str:
    """The wireguard-go to run when none is named: the cached current build if it is
    there, else `wireguard-go` (found on PATH when it is started)."""
    cached = cached_wireguard_go()
    return str(cached) if os.access(cached, os.X_OK) else WIREGUARD_GO_ON_PATH


def describe_wireguard_go(command: str) -> str:
    """`command` as a person wants to see it in a log: its resolved path."""
    found = shutil.which(command)
    return found if found is not None else f"{command} (not found)"


WIREGUARD_BACKENDS = ("auto", "kernel", "userspace")
"""What `--wireguard-backend` accepts, wherever a command takes it."""


def add_wireguard_arguments(parser: argparse.ArgumentParser) -> None:
    """The WireGuard options the agent and the gateway share: backend, program, log."""
    parser.add_argument("--wireguard-backend", choices=WIREGUARD_BACKENDS,
                        default="auto",
                        help="kernel (the WireGuard module), userspace (wireguard-go) or "
                             "auto: the kernel module when the node has it, else "
                             "wireguard-go (default auto)")
    parser.add_argument(
        "--wireguard-go", metavar="PATH",
        help="the wireguard-go program the userspace backend starts (default: the current "
             "release `make binaries` caches, /var/cache/meshgress/bin/wireguard-go-<version>/"
             "wireguard-go, when it is there, else wireguard-go on PATH)")
    parser.add_argument("--wireguard-log", type=Path,
                        help="append wireguard-go's own log to this file (userspace backend; "
                             "default: kept only to explain a failed start)")
    parser.add_argument("--wireguard-log-level", choices=("silent", "error", "verbose"),
                        default="error", help="wireguard-go's LOG_LEVEL (default error)")
