"""The shim, the CNI server and the service together, the kernel faked (no root needed):
what the runtime hears is what the node keeps.

- An ADD whose shim gave up (its timeout passed while the agent was stalled in the
  pod-ready hook) is undone once the agent gets going again, not completed behind the
  runtime's back.
- A shim of an earlier request version (namespace only, with or without acknowledgement)
  has its DEL served and its ADD told to try again, naming the cause.
- 200 ADDs at once, each calling the node agent's own pod-ready hook (which reads the
  store and recomputes steering over every local pod), all succeed.
- Descriptors sent with a request that never completes are closed, not leaked.
"""

from __future__ import annotations

import array
import contextlib
import ipaddress
import json
import os
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
        stop, listening = threading.Event(), threading.Event()
        # Until it listens: its socket file exists from bind(), and a connection between
        # bind() and listen() is refused.
        thread = threading.Thread(target=serve, args=(path, service, stop, listening.set),
                                  daemon=True)
        thread.start()
        stops.append((stop, thread))
        assert listening.wait(10), "the CNI server did not start"
        return Server(path, service, wiring, directory)

    yield start
    for stop, thread in stops:
        stop.set()
        thread.join(10)


def run_shim(env: dict[bytes, bytes], stdin: bytes) -> tuple[int, bytes]:
    """The shim, in this process, against a faked kernel: namespaces are plain files, so
    the stand-in for the netlink socket made inside one is a second fd of its file (what
    `FakeWiring` takes for a socket of that namespace)."""
    return plugin.run(env, stdin, pod_socket=os.dup)


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
    code, out = run_shim(server.env("ADD", "ctr-slow"), server.config(timeout=0.3))
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
    code, out = run_shim(server.env("ADD", "ctr-slow"), server.config())
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
    first = threading.Thread(target=run_shim, args=(server.env("ADD", "ctr-a"),
                                                     server.config(timeout=30)))
    first.start()
    wait_until(lambda: calls == ["ctr-a"])
    code, _ = run_shim(server.env("ADD", "ctr-a"), server.config(timeout=0.3))
    assert code == 1
    release.set()
    first.join(10)
    wait_until(lambda: sum(server.service.requests_total.values()) == 2)
    assert calls == ["ctr-a"]  # the second ADD never reached the hook
    assert server.service.requests_total[("ADD", 0)] == 1
    assert server.service.requests_total[("ADD", p.ERR_TRY_AGAIN_LATER)] == 1


def _old_shim(server: Server, magic: bytes, command: str, container: str) -> tuple[int, Any]:
    """A request as a shim of an earlier version sends it: the namespace's fd only."""
    env = server.env(command, container)
    values = [env.get(name, b"") for name in plugin.REQUEST_ENV]
    frame = bytearray(p.encode_request(values, server.config()))
    frame[:4] = magic
    with socket.socket(socket.AF_UNIX) as sock, open(env[b"CNI_NETNS"], "rb") as netns:
        sock.connect(str(server.path))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, netns.fileno().to_bytes(4, "little"))]
        sock.sendmsg([bytes(frame)], rights if command == "ADD" else [])
        answer = b""
        while len(answer) < 12 or len(answer) < 12 + p.decode_response_header(answer[:12])[1]:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        if magic == p.NETNS_ONLY_REQUEST_MAGIC:
            with contextlib.suppress(OSError):  # the agent waits only after a good ADD
                sock.send(p.ACK)
    exit_code, length = p.decode_response_header(answer[:12])
    out = answer[12:12 + length]
    return exit_code, (json.loads(out) if out else None)


@pytest.mark.parametrize("magic", [p.NETNS_ONLY_REQUEST_MAGIC, p.LEGACY_REQUEST_MAGIC],
                         ids=["acknowledging", "legacy"])
def test_a_shim_of_an_earlier_version_is_told_to_retry_its_add_and_served_its_del(
        start_server, magic):
    """Such a shim expects the agent to enter the namespace itself, which it no longer
    can (no CAP_SYS_ADMIN): its ADD gets "try again later" saying why, and the runtime's
    retry runs the binary the agent's init container installed meanwhile."""
    server = start_server()
    code, error = _old_shim(server, magic, "ADD", "ctr-old")
    assert (code, error["code"]) == (1, p.ERR_TRY_AGAIN_LATER)
    assert "older than the agent" in error["msg"]
    assert server.wiring.is_empty()
    code, out = run_shim(server.env("ADD", "ctr-old"), server.config())
    assert code == 0, out
    assert _old_shim(server, magic, "DEL", "ctr-old") == (0, None)
    assert server.wiring.is_empty()


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
            return run_shim(env, server.config())

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


@pytest.mark.parametrize("frame", [b"XXXX\x00\x00\x00\x04", b"MGC"],
                         ids=["not a request", "closed mid-request"])
def test_descriptors_that_came_with_a_bad_request_are_closed(start_server, frame):
    """Each descriptor a shim sends may hold a pod's network namespace alive."""
    server = start_server()
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(server.path))
            client.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [read_end]).tobytes())])
            os.close(read_end)  # the server holds the only read end now
            client.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            while client.recv(65536):
                pass  # the server answered (or not) and hung up
        # Once the last read end is closed, writing fails with EPIPE.
        wait_until(lambda: _write_fails(write_end))
    finally:
        os.close(write_end)


def _write_fails(fd: int) -> bool:
    try:
        os.write(fd, b"x")
    except BrokenPipeError:
        return True
    return False
