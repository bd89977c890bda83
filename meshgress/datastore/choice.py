"""Which datastore a command runs on, and opening it, the same way for every tool.

The agent and the gateway take `--datastore kube|DIR` and `--kubeconfig` (options.py);
the tools a person runs — `status`, `explain`, `apply`, `get`, `delete` — take the same
options with a default from $MESHGRESS_DATASTORE, so a shell (or `meshgress lab exec`) sets
it once. `open_datastore` opens what they name.

Standard library only at import time: the command-line parsers are built for every
command, and the kubernetes client (a third of a second to import) loads only when a
command opens the kube datastore.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meshgress.datastore import Datastore, Invalid
from meshgress.datastore.options import KUBE, datastore_location


def add_tool_datastore_arguments(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("MESHGRESS_DATASTORE")
    parser.add_argument("--datastore", type=datastore_location,
                        default=datastore_location(default) if default else None,
                        metavar="kube|DIR",
                        help="'kube' for the Kubernetes API, else a file datastore directory "
                             "(default: $MESHGRESS_DATASTORE)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="with --datastore kube: the kubeconfig to use (default: "
                             "$KUBECONFIG or ~/.kube/config)")


def open_datastore(datastore: str | Path, kubeconfig: Path | None = None) -> Datastore:
    """The store `--datastore` names; raises DatastoreError (or OSError) when it cannot be
    opened."""
    if datastore == KUBE:
        from meshgress.datastore.kube import KubeDatastore  # noqa: PLC0415 - see docstring

        return KubeDatastore.from_kubeconfig(kubeconfig)
    if kubeconfig is not None:
        raise Invalid("--kubeconfig goes with --datastore kube")
    from meshgress.datastore.file import FileDatastore  # noqa: PLC0415 - see docstring

    return FileDatastore(Path(datastore))
