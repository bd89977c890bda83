"""The shim, the CNI server and the service together, the kernel faked (no root needed):
what the runtime hears is what the node keeps.

- An ADD whose shim gave up (its timeout passed while the agent was stalled in the
  pod-ready hook) is undone once the agent gets going again, not completed behind the
  runtime's back.
- A shim of the previous request version (no acknowledgement) is still served.
- 200 ADDs at once, each calling the node agent's own pod-ready hook (which reads the
  store and recomputes steering over every local pod), all succeed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni import plugin
from cni import protocol as p
from cni.model import PodAttachment
from cni.server import serve
from cni.service import CniService, PodHook
from cni.wiring import FakeWiring


@dataclass
class Server:
    path: Path
    service: CniService
    wiring: FakeWiring
    namespaces: Path

    def env(self, command: str, container: str, **extra: bytes) -> dict[bytes, bytes]:
        netns = self.namespaces / f"netns-{container}"
        netns.touch()
        return {b"CNI_COMMAND": command.encode(), b"CNI_CONTAINERID": container.encode(),
                b"CNI_IFNAME": b"eth0", b"CNI_NETNS": str(netns).encode(),
                b"CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={container}".encode(), **extra}

    def config(self, **extra: Any) -> bytes:
        return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshgress-cni",
                           "socket": str(self.path), **extra}).encode()


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., Server]]:
    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(pod_ready_hook: PodHook | None = None, pod_removed_hook: PodHook | None = None,
              cidr: str = "198.18.0.0/24") -> Server:
        wiring = FakeWiring()
        directory = tmp_path / f"server{len(stops)}"
        service = CniService(ipaddress.IPv4Network(cidr), directory / "state",
                             pod_ready_hook=pod_ready_hook, pod_removed_hook=pod_removed_hook,
                             wiring=wiring)
        path = directory / "cni.sock"
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(path, service, stop), daemon=True)
        thread.start()
        stops.append((stop, thread))
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "the CNI server did not start"
            time.sleep(0.01)
        return Server(path, service, wiring, directory)

    yield start
    for stop, thread in stops:
        stop.set()
        thread.join(10)


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_an_add_the_shim_gave_up_on_is_undone_when_the_stalled_hook_returns(start_server):
    entered, release = threading.Event(), threading.Event()
    removed: list[PodAttachment] = []

    def stalled_hook(attachment: PodAttachment) -> None:
        entered.set()
        release.wait(30)

    server = start_server(stalled_hook, removed.append)
    code, out = plugin.run(server.env("ADD", "ctr-slow"), server.config(timeout=0.3))
    assert (code, json.loads(out)["code"]) == (1, p.ERR_TRY_AGAIN_LATER)
    assert entered.is_set()
    assert server.wiring.peers  # still wired while the hook is stuck
    release.set()
    wait_until(lambda: sum(server.service.requests_total.values()) == 1)  # ADD finished
    assert server.service.requests_total == {("ADD", p.ERR_TRY_AGAIN_LATER): 1}
    assert server.wiring.is_empty()
    assert server.service._ipam is not None and server.service._ipam.allocations() == []
    assert [a.container_id for a in removed] == ["ctr-slow"]
    # The runtime's retry gets a fresh, complete ADD.
    code, out = plugin.run(server.env("ADD", "ctr-slow"), server.config())
    assert code == 0, out


def test_an_add_queued_behind_a_stalled_one_is_dropped_if_its_shim_left(start_server):
    """A request that waited for the attachment's lock after its shim gave up is never
    started: nothing is allocated for it."""
    release = threading.Event()
    calls: list[str] = []

    def hook(attachment: PodAttachment) -> None:
        calls.append(attachment.container_id)
        release.wait(30)

    server = start_server(hook)
    first = threading.Thread(target=plugin.run, args=(server.env("ADD", "ctr-a"),
                                                     server.config(timeout=30)))
    first.start()
    wait_until(lambda: calls == ["ctr-a"])
    code, _ = plugin.run(server.env("ADD", "ctr-a"), server.config(timeout=0.3))
    assert code == 1
    release.set()
    first.join(10)
    wait_until(lambda: sum(server.service.requests_total.values()) == 2)
    assert calls == ["ctr-a"]  # the second ADD never reached the hook
    assert server.service.requests_total[("ADD", 0)] == 1
    assert server.service.requests_total[("ADD", p.ERR_TRY_AGAIN_LATER)] == 1


def test_a_shim_of_the_previous_version_is_still_served(start_server):
    server = start_server()
    env = server.env("ADD", "ctr-old")
    values = [env.get(name, b"") for name in plugin.REQUEST_ENV]
    frame = bytearray(p.encode_request(values, server.config()))
    frame[:4] = p.LEGACY_REQUEST_MAGIC
    with socket.socket(socket.AF_UNIX) as sock, open(env[b"CNI_NETNS"], "rb") as netns:
        sock.connect(str(server.path))
        sock.sendmsg([bytes(frame)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       netns.fileno().to_bytes(4, "little"))])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    exit_code, length = p.decode_response_header(answer[:12])
    assert exit_code == 0, answer
    assert json.loads(answer[12:12 + length])["ips"][0]["address"] == "198.18.0.1/32"
    assert server.wiring.peers  # kept: such a shim cannot acknowledge


# --- 200 concurrent ADDs through the node agent's own hook --------------------------------


def test_two_hundred_concurrent_adds_with_the_agents_hook_all_succeed(start_server, tmp_path):
    """The agent's hook once changed its pod maps outside the reconcile lock while another
    ADD's hook iterated them: 3 of 200 concurrent ADDs failed with "dictionary changed size
    during iteration" (code 103)."""
    from meshgress.datastore import Kind
    from meshgress.datastore.file import FileDatastore
    from nodeagent.steering import LocalPod
    from tests.unit.test_agent import make_agent, node, run_in_background, stop

    store = FileDatastore(tmp_path / "store", poll_interval=0.01)
    store.create(node("node1", "192.0.2.11", "198.18.1.0/24"))
    store.create({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": "billing", "labels": {"team": "billing"}}})
    store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                  "metadata": {"name": "partner-a"}, "spec": {"egressIPs": ["192.0.2.10"]}})
    store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
                  "metadata": {"name": "billing-out"},
                  "spec": {"gateway": "partner-a",
                           "namespaceSelector": {"matchLabels": {"team": "billing"}}}})
    pods = 200
    for n in range(0, pods, 2):  # half the pods known to the store, with labels
        store.create({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": f"pod-{n}", "namespace": "billing",
                                   "labels": {"app": f"a{n % 7}"}}})
    agent, recording, _ = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert recording.serving.wait(10), "the agent never started its CNI server"

        def as_local_pod(attachment: PodAttachment) -> LocalPod:
            return LocalPod(attachment.namespace or "", attachment.name or "", attachment.ip)

        server = start_server(lambda a: recording.hooks["ready"](as_local_pod(a)),
                              lambda a: recording.hooks["removed"](as_local_pod(a)),
                              cidr="198.18.1.0/24")

        def add(n: int) -> tuple[int, bytes]:
            env = server.env("ADD", f"ctr-{n}")
            env[b"CNI_ARGS"] = f"K8S_POD_NAMESPACE=billing;K8S_POD_NAME=pod-{n}".encode()
            return plugin.run(env, server.config())

        with ThreadPoolExecutor(pods) as pool:
            results = list(pool.map(add, range(pods)))
        failures = [json.loads(out) for code, out in results if code != 0]
        assert failures == []
        addresses = {json.loads(out)["ips"][0]["address"] for _, out in results}
        assert len(addresses) == pods
        assert len(server.wiring.peers) == pods
        assert len(agent._local_pods) == pods
        assert store.get(Kind.NODE, "node1")
    finally:
        stop(agent, thread)
        store.close()
