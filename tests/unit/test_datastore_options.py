"""`--datastore kube|DIR` and `--kubeconfig` on the agent and the gateway, and the store the
composition root opens for them (no API server needed: a client connects lazily)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from gateway.options import add_arguments as add_gateway_arguments
from meshgress.assembly import StartError, _open_datastore
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.kube import KubeDatastore
from nodeagent.options import add_arguments as add_agent_arguments


def parse(add: object, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)  # type: ignore[operator]
    return parser.parse_args(["--node", "n1", *argv])


def kubeconfig(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://192.0.2.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


@pytest.mark.parametrize("add", [add_agent_arguments, add_gateway_arguments],
                         ids=["agent", "gateway"])
def test_kube_or_a_directory(add: object, tmp_path: Path) -> None:
    assert parse(add, "--datastore", "kube").datastore == "kube"
    assert parse(add, "--datastore", "./kube").datastore == Path("kube")
    args = parse(add, "--datastore", "kube", "--kubeconfig", str(tmp_path / "k"))
    assert args.kubeconfig == tmp_path / "k"


def test_the_composition_root_opens_what_is_named(tmp_path: Path) -> None:
    args = parse(add_gateway_arguments, "--datastore", "kube", "--kubeconfig",
                 str(kubeconfig(tmp_path / "kubeconfig")), "--identity", "gw-pod-1")
    store = _open_datastore(args, "gateway")
    try:
        assert isinstance(store, KubeDatastore)
        assert (store.reporting_controller, store.reporting_instance) == (
            "meshgress.io/gateway", "gw-pod-1")
    finally:
        store.close()
    store = _open_datastore(parse(add_agent_arguments, "--datastore", str(tmp_path / "s")),
                            "agent")
    assert isinstance(store, FileDatastore)
    store.close()


def test_bad_datastore_options_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(StartError, match="--kubeconfig goes with --datastore kube"):
        _open_datastore(parse(add_agent_arguments, "--datastore", str(tmp_path / "s"),
                              "--kubeconfig", str(tmp_path / "k")), "agent")
    with pytest.raises(StartError, match="no usable Kubernetes client configuration"):
        _open_datastore(parse(add_agent_arguments, "--datastore", "kube", "--kubeconfig",
                              str(tmp_path / "missing")), "agent")
