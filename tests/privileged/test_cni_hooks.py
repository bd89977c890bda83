"""The pod-ready hook runs after the pod is wired and before ADD answers the runtime.

The server here is a small program embedding `CniService` with hooks that record events
to a file; the ready hook blocks until the test releases it, so the test can look at the
world while the runtime (the plugin binary) is still waiting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cni import protocol as p
from cni.model import compute_host_ifname
from tests.privileged.conftest import (
    NETNS_DIR,
    CniNode,
    ip_json,
    spawn,
    stop,
    wait_for_socket,
)

pytestmark = pytest.mark.privileged

HOOK_SERVER = """
import json, signal, sys, threading, time
from ipaddress import IPv4Network
from pathlib import Path
from cni.server import CniService, serve

socket_path, state_dir, events, release = sys.argv[1:5]

def record(event, attachment):
    with open(events, "a") as out:
        out.write(json.dumps({"event": event, "t": time.monotonic(), "ip": str(attachment.ip),
                              "container": attachment.container_id, "ifname": attachment.ifname,
                              "namespace": attachment.namespace, "name": attachment.name,
                              "netns": attachment.netns,
                              "host_ifname": attachment.host_ifname}) + "\\n")

def ready(attachment):
    record("ready", attachment)
    if attachment.name == "fail-me":
        raise RuntimeError("egress steering table is full")
    deadline = time.monotonic() + 30
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    record("released", attachment)

def removed(attachment):
    record("removed", attachment)

service = CniService(IPv4Network("198.18.0.0/24"), state_dir, pod_ready_hook=ready,
                     pod_removed_hook=removed)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop.set).start())
serve(socket_path, service, stop)
"""


@pytest.fixture
def hook_node(netns_factory, cni_plugin, tmp_path):
    node = CniNode(netns=netns_factory("node"), socket=tmp_path / "cni.sock",
                   state_dir=tmp_path / "state", plugin=cni_plugin, log=tmp_path / "server.log")
    events, release = tmp_path / "events.jsonl", tmp_path / "release"
    process = spawn(["nsenter", f"--net={NETNS_DIR / node.netns}", sys.executable, "-c",
                     HOOK_SERVER, str(node.socket), str(node.state_dir), str(events),
                     str(release)], log=node.log, marker=str(node.socket))
    try:
        wait_for_socket(node.socket, process, node.log)
        yield node, events, release
    finally:
        stop(process)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_event(path: Path, event: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in read_events(path):
            if entry["event"] == event:
                return entry
        time.sleep(0.01)
    raise AssertionError(f"no {event!r} event in {read_events(path)}")


def start_add(node: CniNode, pod: str, args: str) -> subprocess.Popen[str]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-hook", "CNI_NETNS": str(NETNS_DIR / pod),
           "CNI_IFNAME": "eth0", "CNI_ARGS": args, "CNI_PATH": "/usr/lib/cni"}
    shim = subprocess.Popen([str(node.plugin)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert shim.stdin is not None
    shim.stdin.write(json.dumps(node.conf()))
    shim.stdin.close()
    return shim


def test_hook_runs_after_wiring_and_before_the_reply(hook_node, netns_factory):
    node, events, release = hook_node
    pod = netns_factory("pod")
    shim = start_add(node, pod, "K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-1")
    try:
        ready = wait_for_event(events, "ready")
        # The runtime is still waiting while the hook runs...
        time.sleep(0.2)
        assert shim.poll() is None
        # ...and the pod is already fully wired when the hook sees it.
        addresses = [a["local"] for link in ip_json(pod, "addr", "show", "dev", "eth0")
                     for a in link.get("addr_info", []) if a["family"] == "inet"]
        assert addresses == [ready["ip"]]
        assert any(r["dst"] == "default" for r in ip_json(pod, "route", "show"))
        assert (ready["namespace"], ready["name"]) == ("team-a", "web-1")
        assert ready["container"] == "ctr-hook"
        assert ready["ifname"] == "eth0"
        assert ready["netns"] == str(NETNS_DIR / pod)
        assert ready["host_ifname"] == compute_host_ifname("ctr-hook", "eth0")
        release.touch()
        assert shim.stdout is not None
        stdout = shim.stdout.read()
        shim.wait(10)
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()
    assert shim.returncode == 0, stdout
    replied = time.monotonic()
    released = wait_for_event(events, "released")
    assert released["t"] < replied
    assert json.loads(stdout)["ips"][0]["address"] == f"{ready['ip']}/32"


def test_failing_hook_fails_add_and_undoes_it(hook_node, netns_factory):
    node, events, _release = hook_node
    pod = netns_factory("pod")
    result = node.call("ADD", "ctr-hook", pod, args="K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=fail-me")
    assert result.exit == 1
    assert result.code == p.ERR_HOOK_FAILED
    assert "team-a/fail-me" in result.json["msg"]
    assert "steering table is full" in result.json["details"]
    host_links = [link["ifname"] for link in ip_json(node.netns, "link", "show")]
    assert compute_host_ifname("ctr-hook", "eth0") not in host_links
    assert [link["ifname"] for link in ip_json(pod, "link", "show")] == ["lo"]
    assert not [f for f in (node.state_dir / "ipam").iterdir() if f.name[0].isdigit()]
    assert [e["event"] for e in read_events(events)] == ["ready", "removed"]


def test_del_calls_the_removed_hook_after_unwiring(hook_node, netns_factory):
    node, events, release = hook_node
    release.touch()
    pod = netns_factory("pod")
    added = node.call("ADD", "ctr-hook", pod, args="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")
    assert added.exit == 0
    assert node.call("DEL", "ctr-hook", pod).exit == 0
    assert [e["event"] for e in read_events(events)] == ["ready", "released", "removed"]
    assert node.call("DEL", "ctr-hook", pod).exit == 0  # no second "removed"
    assert [e["event"] for e in read_events(events)] == ["ready", "released", "removed"]


def test_an_add_the_runtime_gave_up_on_is_undone_not_completed(hook_node, netns_factory):
    """The shim times out while the hook is stalled and reports failure; when the agent
    gets going again it must not finish the ADD behind the runtime's back."""
    node, events, release = hook_node
    pod = netns_factory("pod")
    result = node.call("ADD", "ctr-hook", pod, args="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=slow",
                       conf=node.conf(timeout=1))
    assert (result.exit, result.code) == (1, p.ERR_TRY_AGAIN_LATER), result.stdout
    wait_for_event(events, "ready")
    release.touch()
    wait_for_event(events, "removed")  # the undo calls the hook first, then unwires

    def leftovers() -> list[str]:
        host = {link["ifname"] for link in ip_json(node.netns, "link", "show")}
        return ([name for name in [compute_host_ifname("ctr-hook", "eth0")] if name in host]
                + [link["ifname"] for link in ip_json(pod, "link", "show")
                   if link["ifname"] != "lo"]
                + [f.name for f in (node.state_dir / "ipam").iterdir() if f.name[0].isdigit()])

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers() == []
    assert [e["event"] for e in read_events(events)] == ["ready", "released", "removed"]
