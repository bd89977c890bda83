"""The agent writes the runtime's conflist only once its CNI server accepts requests.

A conflist names the network the container runtime hands every new pod to; written
before the agent can serve ADDs, the runtime would report the node's network ready and
start pods whose ADD can only fail.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from cni.install import CONFLIST_NAME, compute_conflist
from cni.server import serve
from cni.service import CniService
from meshgress import assembly
from tests.unit.test_cni_service import FakeWiring


def test_serve_calls_on_listening_once_the_socket_accepts(tmp_path: Path) -> None:
    path = tmp_path / "cni.sock"
    service = CniService(ipaddress.IPv4Network("198.18.0.0/24"), tmp_path / "state",
                         wiring=FakeWiring())
    stop = threading.Event()
    seen: list[bool] = []

    def on_listening() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))  # raises if nobody listens yet
        seen.append(True)

    thread = threading.Thread(target=serve, args=(path, service, stop, on_listening),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not seen and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(10)
    assert seen == [True]


def test_the_agents_pod_network_writes_the_conflist_when_the_server_listens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "99-other.conf").write_text("{}")
    socket_path = tmp_path / "run" / "cni.sock"
    order: list[str] = []

    def fake_serve(path, service, stop, on_listening=None, signal_wake=0.5):
        assert signal_wake is None  # the agent's CNI thread sleeps until stopped
        order.append("conflist before listening" if (conf_dir / CONFLIST_NAME).exists()
                     else "none before listening")
        assert on_listening is not None
        on_listening()
        order.append("written" if (conf_dir / CONFLIST_NAME).exists() else "missing")

    monkeypatch.setattr(assembly, "serve_cni", fake_serve)
    pods = assembly.CniPodNetwork(socket_path, tmp_path / "state", conf_dir)
    pods.serve(ipaddress.IPv4Network("198.18.0.0/24"), 1420, on_ready=lambda pod: None,
               on_removed=lambda pod: None, stop=threading.Event(),
               on_listening=lambda: order.append(
                   "agent told, conflist " + ("written" if (conf_dir / CONFLIST_NAME).exists()
                                              else "missing")))
    assert order == ["none before listening", "agent told, conflist written", "written"]
    conflist = json.loads((conf_dir / CONFLIST_NAME).read_text())
    assert conflist == compute_conflist(str(socket_path),
                                        delete_queue=str(tmp_path / "state" / "delete-queue"))
    # The plugin queues DELs where the agent's service replays them, and the folder exists.
    assert conflist["plugins"][0]["deleteQueue"] == str(pods.delete_queue)
    assert pods.delete_queue.is_dir()
    assert (conf_dir / "99-other.conf").read_text() == "{}"


def test_without_a_conf_dir_no_conflist_is_written(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assembly, "serve_cni",
                        lambda path, service, stop, on_listening=None, signal_wake=0.5:
                        on_listening())
    assembly.CniPodNetwork(tmp_path / "cni.sock", tmp_path / "state").serve(
        ipaddress.IPv4Network("198.18.0.0/24"), 1420, on_ready=lambda pod: None,
        on_removed=lambda pod: None, stop=threading.Event())
    assert not list(tmp_path.rglob("*.conflist"))


def test_the_deletion_queue_shows_on_the_agents_metrics_page(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cni import protocol as p
    from meshgress.prometheus import Exposition

    def fake_serve(path, service, stop, on_listening=None, signal_wake=0.5):
        folder = service.deletion_queue.path
        name = p.compute_queue_entry_name("ctr1", "eth0")
        (folder / name).write_bytes(p.encode_queue_entry("ctr1", "eth0", "", {}))
        (folder / "del-garbage").write_text("not json")
        service.replay_deletions()

    monkeypatch.setattr(assembly, "serve_cni", fake_serve)
    pods = assembly.CniPodNetwork(tmp_path / "cni.sock", tmp_path / "state")
    before = Exposition()
    pods.render_metrics(before)
    assert before.render() == "\n"  # nothing to say before the CNI server exists
    pods.serve(ipaddress.IPv4Network("198.18.0.0/24"), 1420, on_ready=lambda pod: None,
               on_removed=lambda pod: None, stop=threading.Event())
    page = Exposition()
    pods.render_metrics(page)
    samples = [line for line in page.render().splitlines() if not line.startswith("#")]
    assert samples == ["meshgress_cni_queued_deletes_replayed_total 1",
                       "meshgress_cni_queued_deletes_rejected_total 1",
                       "meshgress_cni_queued_deletes_pending 0"]
    # The catalogue behind the metrics reference, the alert rules' and the dashboard's
    # checks knows them too.
    from tests.tools.metric_catalog import agent_metrics
    catalogue = agent_metrics()
    assert [line.split()[0] for line in samples if line.split()[0] not in catalogue] == []
