"""The lab's real control plane (etcd + kube-apiserver of the pinned release), run in a
throwaway network namespace: it answers as the pinned version, kubectl works against its
admin kubeconfig, a pod-bound service-account token names its pod and node as a kubelet's
projected token would, the API server comes back after a restart, etcd can be compacted on
demand, and stopping it leaves no process, namespace or state folder behind.

Needs the binaries of `make binaries` (the test fails naming it when they are missing).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from meshgress.lab import netns as lab_netns
from meshgress.lab.controlplane import (
    PINNED_VERSIONS,
    ControlPlane,
    ControlPlaneConfig,
    cleanup_state_dir,
    jwt_claims,
)
from tests.privileged.conftest import delete_netns, list_netns, require_root, run
from tests.run_owned import OWNER, is_crashed_runs, owned

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

NETNS_PREFIX = "mgt-cp-"
STATE_ROOT = Path("/tmp/mgt-controlplane")
RUN_STATE = STATE_ROOT / str(OWNER)
"""This run's control planes keep their state here, one folder each."""
SERVICE_RANGE = "10.96.0.0/16"
POD_BOUND_EXTRA = {
    "authentication.kubernetes.io/pod-name",
    "authentication.kubernetes.io/pod-uid",
    "authentication.kubernetes.io/node-name",
    "authentication.kubernetes.io/node-uid",
    "authentication.kubernetes.io/credential-id",
}
NO_FORBIDDEN_CONFIGMAPS = """
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: no-forbidden-keys}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [configmaps]}
  validations:
  - expression: "!has(object.data) || !('forbidden' in object.data)"
    message: no forbidden keys
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: no-forbidden-keys}
spec:
  policyName: no-forbidden-keys
  validationActions: [Deny]
"""


@contextlib.contextmanager
def throwaway_netns(role: str) -> Iterator[str]:
    name = f"{owned(NETNS_PREFIX)}{role}-{secrets.token_hex(3)}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        delete_netns(name)


@pytest.fixture(scope="module")
def _clean_slate() -> Iterator[None]:
    require_root()
    for leftover in sorted(STATE_ROOT.glob("*")):
        if is_crashed_runs(f"{leftover.name}-", ""):
            for state_dir in sorted(leftover.glob("*")):
                cleanup_state_dir(state_dir)
            with contextlib.suppress(OSError):
                leftover.rmdir()
    for name in list_netns(NETNS_PREFIX):
        if is_crashed_runs(name, NETNS_PREFIX):
            # Whatever still runs in a crashed run's namespace is that run's.
            lab_netns.stop_pids(lab_netns.netns_pids(name))
            delete_netns(name)
    yield
    with contextlib.suppress(OSError):
        RUN_STATE.rmdir()
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()


def control_plane_in(namespace: str, name: str, **options: Any) -> ControlPlane:
    return ControlPlane(ControlPlaneConfig(
        state_dir=RUN_STATE / name, netns=namespace, service_cluster_ip_range=SERVICE_RANGE,
        **options))


@pytest.fixture(scope="module")
def control_plane(_clean_slate: None, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ControlPlane]:
    with throwaway_netns("api") as namespace:
        plane = control_plane_in(namespace, f"shared-{namespace}")
        try:
            plane.start()
            yield plane
        finally:
            plane.stop(keep_logs_in=tmp_path_factory.mktemp("controlplane-logs"))


def test_reports_the_pinned_version(control_plane: ControlPlane) -> None:
    assert control_plane.version()["gitVersion"] == PINNED_VERSIONS["kube-apiserver"]


def test_kubectl_lists_namespaces(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert {"namespace/default", "namespace/kube-system"} <= set(out)
    client_version = control_plane.kubectl("version", "--client", "-o", "json").stdout
    assert PINNED_VERSIONS["kubectl"] in client_version


def test_pod_bound_token_names_pod_and_node(control_plane: ControlPlane) -> None:
    uids = control_plane.create_pod_on_node("tokens", "agent-abc", "node-1",
                                            service_account="meshgress-agent")
    token = control_plane.pod_bound_token("tokens", "agent-abc")

    user = control_plane.whoami(token)

    assert user["username"] == "system:serviceaccount:tokens:meshgress-agent"
    assert set(user["extra"]) == POD_BOUND_EXTRA
    extra = user["extra"]
    assert extra["authentication.kubernetes.io/pod-name"] == ["agent-abc"]
    assert extra["authentication.kubernetes.io/pod-uid"] == [uids["pod_uid"]]
    assert extra["authentication.kubernetes.io/node-name"] == ["node-1"]
    assert extra["authentication.kubernetes.io/node-uid"] == [uids["node_uid"]]
    claims = jwt_claims(token)["kubernetes.io"]
    assert claims["pod"]["name"] == "agent-abc"
    assert claims["node"] == {"name": "node-1", "uid": uids["node_uid"]}


def test_token_of_a_deleted_pod_is_refused(control_plane: ControlPlane) -> None:
    control_plane.create_pod_on_node("tokens", "short-lived", "node-1")
    token = control_plane.pod_bound_token("tokens", "short-lived")
    control_plane.kubectl("delete", "pod", "-n", "tokens", "short-lived", "--grace-period=0",
                          "--force", "--wait=false")
    with pytest.raises(ApiException, match=r"401|Unauthorized"):
        control_plane.whoami(token)


def test_apiserver_restart_keeps_the_data(control_plane: ControlPlane) -> None:
    control_plane.kubectl("create", "configmap", "survivor", "--from-literal=k=v")
    etcd_before = control_plane.pids()["etcd"]
    apiserver_before = control_plane.pids()["kube-apiserver"]

    control_plane.restart_apiserver()

    assert control_plane.pids()["etcd"] == etcd_before
    assert control_plane.pids()["kube-apiserver"] != apiserver_before
    out = control_plane.kubectl("get", "configmap", "survivor", "-o", "jsonpath={.data.k}")
    assert out.stdout == "v"


def test_validating_admission_policy_is_enforced(control_plane: ControlPlane) -> None:
    control_plane.kubectl("apply", "-f", "-", input_text=NO_FORBIDDEN_CONFIGMAPS)
    deadline = time.monotonic() + 30
    while True:  # the policy is enforced once the API server has loaded and checked it
        refused = control_plane.kubectl("create", "configmap", f"probe-{secrets.token_hex(2)}",
                                        "--from-literal=forbidden=yes", check=False)
        if refused.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "no forbidden keys" in refused.stderr
    control_plane.kubectl("create", "configmap", "allowed", "--from-literal=fine=yes")


def test_compaction_forces_gone_without_watch_cache(_clean_slate: None) -> None:
    """With the watch cache off, lists and watches go to etcd: after a forced compaction a
    watch from an older resourceVersion ends in 410 Gone, as a controller must handle."""
    with throwaway_netns("gone") as namespace:
        plane = control_plane_in(namespace, f"gone-{namespace}", watch_cache=False)
        try:
            plane.start()
            plane.kubectl("create", "configmap", "first")
            listed_then = plane.kubectl("get", "--raw", "/api/v1/namespaces/default/configmaps")
            old = json.loads(listed_then.stdout)["metadata"]["resourceVersion"]
            plane.kubectl("create", "configmap", "second")
            plane.kubectl("create", "configmap", "third")
            # Compaction at R keeps R itself: a watch from `old` starts at old + 1 < R.
            assert plane.compact_etcd() > int(old) + 1

            watch = plane.kubectl("get", "--raw", "/api/v1/namespaces/default/configmaps"
                                  f"?watch=1&resourceVersion={old}&timeoutSeconds=5")
            assert '"code":410' in watch.stdout
            listed = plane.kubectl("get", "--raw", "/api/v1/namespaces/default/configmaps"
                                   f"?resourceVersion={old}&resourceVersionMatch=Exact",
                                   check=False)
            assert listed.returncode != 0
            assert "(Expired)" in listed.stderr  # kubectl's words for a 410
        finally:
            plane.stop()


def test_stop_leaves_nothing_behind(_clean_slate: None) -> None:
    with throwaway_netns("stop") as namespace:
        plane = control_plane_in(namespace, f"stop-{namespace}")
        try:
            plane.start()
        except BaseException:
            plane.stop()
            raise
        started = plane.pids()
        assert set(started) == {"etcd", "kube-apiserver"}
        assert set(started.values()) <= set(lab_netns.netns_pids(namespace))

        plane.stop()

        assert not any(lab_netns.pid_alive(pid) for pid in started.values())
        assert lab_netns.netns_pids(namespace) == []
        assert not plane.state_dir.exists()
    assert namespace not in list_netns(owned(NETNS_PREFIX))


def test_leftovers_of_a_crashed_run_are_cleared(_clean_slate: None) -> None:
    """A stale state folder: its recorded process is stopped (its command line names the
    folder), a recorded PID that is someone else's is left alone, and the folder goes."""
    state_dir = RUN_STATE / "crashed"
    (state_dir / "pids").mkdir(parents=True)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             str(state_dir)], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                start_new_session=True)
    try:
        (state_dir / "pids" / "etcd.pid").write_text(f"{ours.pid}\n")
        (state_dir / "pids" / "kube-apiserver.pid").write_text(f"{stranger.pid}\n")
        (state_dir / "pids" / "garbage.pid").write_text("not a pid\n")

        stopped = cleanup_state_dir(state_dir)

        assert stopped == [ours.pid]
        assert ours.wait(5) is not None
        assert stranger.poll() is None
        assert not state_dir.exists()
    finally:
        for proc in (ours, stranger):
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
