"""A real control plane for the `kube` datastore tests: etcd and kube-apiserver in a
throwaway network namespace, meshgress's CRDs installed, LEASE_NAMESPACE created, and
`KubeDatastore`s whose connections are made inside that namespace (tests/kube_netns.py).

Names carry this run's PID (tests.run_owned), so sessions run side by side; a crashed
run's leftovers (its namespaces and state folders) are removed first.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgress.datastore import LEASE_NAMESPACE, AlreadyExists
from meshgress.datastore.kube import KubeDatastore
from meshgress.lab import netns as lab_netns
from meshgress.lab.controlplane import ControlPlane, ControlPlaneConfig, cleanup_state_dir
from tests.kube_netns import api_client_in_netns
from tests.privileged.conftest import delete_netns, list_netns, require_root, run
from tests.run_owned import OWNER, is_crashed_runs, owned

NETNS_PREFIX = "mgt-kube-"
STATE_ROOT = Path("/tmp/mgt-kube")
RUN_STATE = STATE_ROOT / str(OWNER)
CRDS = Path(__file__).resolve().parents[2] / "charts" / "meshgress" / "crds"
SERVICE_RANGE = "10.96.0.0/16"


def clear_crashed_runs() -> None:
    require_root()
    for leftover in sorted(STATE_ROOT.glob("*")):
        if is_crashed_runs(f"{leftover.name}-", ""):
            for state_dir in sorted(leftover.glob("*")):
                cleanup_state_dir(state_dir)
            with contextlib.suppress(OSError):
                leftover.rmdir()
    for name in list_netns(NETNS_PREFIX):
        if is_crashed_runs(name, NETNS_PREFIX):
            lab_netns.stop_pids(lab_netns.netns_pids(name))
            delete_netns(name)


class KubeCluster:
    """A running control plane and the way to reach it from the host namespace."""

    def __init__(self, plane: ControlPlane, netns: str) -> None:
        self.plane = plane
        self.netns = netns

    def store(self, **options: Any) -> KubeDatastore:
        return KubeDatastore(api_client_in_netns(self.plane.kubeconfig, self.netns), **options)

    def kubectl(self, *args: str, **options: Any) -> Any:
        return self.plane.kubectl(*args, **options)


@contextlib.contextmanager
def kube_cluster(role: str, *, logs: Path, **options: Any) -> Iterator[KubeCluster]:
    """A control plane (ControlPlaneConfig `options`) with meshgress's CRDs established and
    LEASE_NAMESPACE created; stopped and removed afterwards (its logs copied to `logs`)."""
    clear_crashed_runs()
    name = f"{owned(NETNS_PREFIX)}{role}-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    plane = ControlPlane(ControlPlaneConfig(
        state_dir=RUN_STATE / name, netns=name, service_cluster_ip_range=SERVICE_RANGE,
        **options))
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        plane.start()
        cluster = KubeCluster(plane, name)
        cluster.kubectl("apply", "-f", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/egressgateways.meshgress.io", "crd/egresspolicies.meshgress.io")
        store = cluster.store()
        try:
            with contextlib.suppress(AlreadyExists):
                store.create({"kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}})
            wait_until_served(store)
        finally:
            store.close()
        yield cluster
    finally:
        plane.stop(keep_logs_in=logs)
        delete_netns(name)
        with contextlib.suppress(OSError):
            RUN_STATE.rmdir()
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()


def wait_until_served(store: KubeDatastore, timeout: float = 30.0) -> None:
    """An Established CRD is served a moment later; wait until a list answers."""
    from meshgress.datastore import DatastoreError, Kind

    deadline = time.monotonic() + timeout
    while True:
        try:
            store.list(Kind.EGRESS_GATEWAY)
            store.list(Kind.EGRESS_POLICY)
            return
        except DatastoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def store_factory(cluster: KubeCluster, **options: Any
                  ) -> tuple[Callable[[], KubeDatastore], list[KubeDatastore]]:
    opened: list[KubeDatastore] = []

    def open_another() -> KubeDatastore:
        opened.append(cluster.store(**options))
        return opened[-1]

    return open_another, opened


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """One control plane (watch cache on, as in production) for a whole test module."""
    with kube_cluster("main", logs=tmp_path_factory.mktemp("kube-logs")) as cluster:
        yield cluster
