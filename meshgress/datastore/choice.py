"""Which datastore a command runs on, chosen on its command line the same way everywhere.

Every meshgress command that reads or writes the cluster (`agent`, `gateway`, `status`,
`explain`, `apply`, `get`, `delete`) takes `--datastore`: a directory means the embedded
file datastore, the word `kube` means the Kubernetes API (with `--kubeconfig`, else
in-cluster when running in a pod, else $KUBECONFIG). The default comes from
$MESHGRESS_DATASTORE, so a shell (or `meshgress lab exec`) sets it once.

Standard library only at import time: the command-line parsers are built for every
command, and the kubernetes client (a third of a second to import) loads only when a
command opens the kube datastore.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meshgress.datastore import Datastore, Invalid

KUBE = "kube"
"""The `--datastore` value that means the Kubernetes API."""


def add_datastore_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    default = os.environ.get("MESHGRESS_DATASTORE")
    parser.add_argument("--datastore", required=required and default is None, default=default,
                        metavar="DIR|kube",
                        help="a file datastore directory, or `kube` for the Kubernetes API "
                             "(default: $MESHGRESS_DATASTORE)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="with --datastore kube: the kubeconfig to use (default: "
                             "in-cluster in a pod, else $KUBECONFIG or ~/.kube/config)")


def open_datastore(datastore: str | os.PathLike[str], kubeconfig: Path | None = None
                   ) -> Datastore:
    """The store `--datastore` names; raises DatastoreError (or OSError) when it cannot be
    opened."""
    if kubeconfig is not None and str(datastore) != KUBE:
        raise Invalid(f"--kubeconfig is for --datastore kube, not the file datastore "
                      f"{datastore}")
    if str(datastore) == KUBE:
        from meshgress.datastore.kube import KubeDatastore  # noqa: PLC0415 - see docstring

        return KubeDatastore.from_kubeconfig(kubeconfig)
    from meshgress.datastore.file import FileDatastore  # noqa: PLC0415 - see docstring

    return FileDatastore(Path(datastore))
