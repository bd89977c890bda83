"""The command-line options that pick a datastore, shared by `meshgress agent` and
`meshgress gateway` (the composition root opens the store they name).

Standard library only: describing the options must not import the Kubernetes client.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

KUBE: Final = "kube"
"""`--datastore kube`: the Kubernetes API (any other value is a file datastore directory)."""


def datastore_location(text: str) -> str | Path:
    """`kube`, or the file datastore's directory (write ./kube for a directory of that name:
    it is kept as given)."""
    if text == KUBE:
        return KUBE
    if not text:
        raise argparse.ArgumentTypeError("must be 'kube' or a directory")
    return Path(text)


def add_datastore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", type=datastore_location, required=True,
                        metavar="kube|DIR",
                        help="'kube' for the Kubernetes API, else the file datastore directory")
    parser.add_argument("--kubeconfig", type=Path,
                        help="with --datastore kube: the kubeconfig to use (default: the "
                             "pod's ServiceAccount when running in a pod, else $KUBECONFIG "
                             "or ~/.kube/config)")
