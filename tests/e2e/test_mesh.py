"""The WireGuard mesh on the lab: encrypted on the wire, fail-closed, undisturbed by restarts.

Every claim is measured with real packets: a capture on the underlay bridge spans the
whole scenario (agents starting while pods already send, a node joining, a node leaving,
an agent restart) and must hold no packet with a pod address in plaintext.
"""

import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import eventually, lab, observe_for

pytestmark = pytest.mark.e2e

ECHO_PORT = "7777"


def in_lab(name, target, *command, check=True, timeout=60):
    return lab(name, "exec", target, "--", *command, check=check, timeout=timeout)


def pod_ip(name, pod):
    status = json.loads(lab(name, "status", "--json").stdout)
    return next(p["address"] for p in status["pods"] if f"{p['namespace']}/{p['name']}" == pod)


def start_in(name, target, *command, log):
    argv = [sys.executable, "-m", "meshgress.cli", "lab", "--name", name, "exec", target, "--",
            *command]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


class Capture:
    """tcpdump on the underlay bridge, written to a pcap file."""

    def __init__(self, name, path):
        self.path = path
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/mg-{name}-underlay", "tcpdump", "-i", "br0", "-n",
             "--immediate-mode", "-U", "-w", str(path)], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not path.exists() or path.stat().st_size == 0):
            time.sleep(0.05)
        assert path.exists(), "tcpdump did not start"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def count(self, bpf):
        out = subprocess.run(["tcpdump", "-r", str(self.path), "-n", bpf], capture_output=True,
                             text=True, check=True).stdout
        return len([line for line in out.splitlines() if line.strip()]), out


def ping_loss(output):
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


@pytest.fixture
def mesh_lab(lab_name):
    lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "0")
    return lab_name


def test_pods_on_different_nodes_talk_icmp_tcp_udp_and_the_underlay_sees_only_wireguard(
        mesh_lab, tmp_path):
    name = mesh_lab
    capture = Capture(name, tmp_path / "underlay.pcap")
    logs = []
    try:
        a, b = pod_ip(name, "payments/app-node1"), pod_ip(name, "payments/app-node2")
        # Pods send all through the scenario, across nodes, both ways.
        stream_log = (tmp_path / "stream.log").open("w")
        logs.append(stream_log)
        streams = [start_in(name, "payments/app-node1", "ping", "-i", "0.05", b,
                            log=stream_log),
                   start_in(name, "web/app-node2", "ping", "-i", "0.05", a, log=stream_log)]
        server_log = (tmp_path / "echo.log").open("w")
        logs.append(server_log)
        server = start_in(name, "payments/app-node2", sys.executable, "-m",
                          "meshgress.lab.echo", "serve", "--port", ECHO_PORT, log=server_log)
        assert eventually(lambda: "serving" in (tmp_path / "echo.log").read_text(), timeout=10)

        # ICMP, TCP and UDP across the mesh; the far pod sees the near pod's own address.
        in_lab(name, "payments/app-node1", "ping", "-c", "3", "-i", "0.2", "-W", "2", b)
        for proto in ("tcp", "udp"):
            seen = in_lab(name, "payments/app-node1", sys.executable, "-m",
                          "meshgress.lab.echo", proto, b, ECHO_PORT).stdout.strip()
            assert seen == a, f"{proto}: the far pod saw {seen}, not the pod address {a}"

        # Agents start while pods already send (the dataplane stays while they are away).
        lab(name, "agent", "stop", "node1")
        lab(name, "agent", "stop", "node2")
        observe_for(1)  # the pods keep sending while both agents are away
        lab(name, "agent", "start", "node1")
        lab(name, "agent", "start", "node2")
        # A node joins and is reachable; a node leaves; an agent restarts.
        lab(name, "add-node")
        c = pod_ip(name, "payments/app-node3")
        in_lab(name, "payments/app-node1", "ping", "-c", "2", "-W", "2", c)
        in_lab(name, "web/app-node3", "ping", "-c", "2", "-W", "2", a)
        lab(name, "remove-node", "node2")
        lab(name, "agent", "restart", "node1")
        in_lab(name, "payments/app-node1", "ping", "-c", "2", "-W", "2", c)
        for proc in streams:
            proc.terminate()
            proc.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)
        # node2 is gone: after the grace period node1 drops its peer, and its pod range
        # falls to the unreachable fallback (ICMP error, not a packet on the wire).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = json.loads(in_lab(name, "node1", "meshgress", "status", "--json",
                                       check=False).stdout)
            if [p["node"] for p in status["peers"]] == ["node3"]:
                break
            time.sleep(0.5)
        assert [p["node"] for p in status["peers"]] == ["node3"]
        assert status["healthy"], status
        # ...and its route through the mesh is deleted (only node3's is left).
        mesh_routes = in_lab(name, "node1", "ip", "-4", "route", "show", "proto", "109",
                             "dev", "meshgress0").stdout.split("\n")
        via_mesh = [ipaddress.ip_network(line.split()[0]) for line in mesh_routes if line]
        assert [net for net in via_mesh if ipaddress.ip_address(b) in net] == []
        assert [net for net in via_mesh if ipaddress.ip_address(c) in net] != []
        unreachable = in_lab(name, "payments/app-node1", "ping", "-c", "1", "-W", "1", b,
                             check=False)
        assert unreachable.returncode != 0
    finally:
        capture.stop()
        for fh in logs:
            fh.close()

    plaintext, dump = capture.count("net 198.18.0.0/16")
    assert plaintext == 0, f"pod addresses crossed the underlay in plaintext:\n{dump[:2000]}"
    encrypted, _ = capture.count("udp port 51820")
    assert encrypted > 100, "the scenario's traffic should have crossed the mesh"
    # Besides WireGuard, only ICMP errors about WireGuard packets may appear (a removed
    # node's port is closed while peers still send to it); they quote only the outer,
    # encrypted packet.
    # On kube, agents talk TLS to the API server (192.0.2.2:6443) from their node addresses,
    # as on any cluster.
    api = " and not (host 192.0.2.2 and tcp port 6443)" if name.datastore == "kube" else ""
    other, dump = capture.count(f"ip and not udp port 51820 and not icmp[icmptype] == 3{api}")
    assert other == 0, f"unexpected IP traffic on the underlay:\n{dump[:2000]}"


def test_a_ping_stream_loses_nothing_while_an_agent_restarts(mesh_lab, tmp_path):
    name = mesh_lab
    b = pod_ip(name, "payments/app-node2")
    with (tmp_path / "ping.log").open("w") as log:
        stream = start_in(name, "payments/app-node1", "ping", "-i", "0.01", "-c", "500", b,
                          log=log)
        assert eventually(lambda: (tmp_path / "ping.log").read_text().count("bytes from")
                          >= 50, timeout=10, interval=0.05)
        lab(name, "agent", "restart", "node2")
        lab(name, "agent", "restart", "node1")
        stream.wait(timeout=60)
    sent, received = ping_loss((tmp_path / "ping.log").read_text())
    assert sent == 500 and received == 500, f"lost {sent - received} of {sent}"


def test_the_agent_exports_metrics_and_health(mesh_lab):
    name = mesh_lab
    probe = ("import sys, urllib.request as u; "
             "print(u.urlopen('http://127.0.0.1:9820' + sys.argv[1], timeout=2).read().decode())")
    metrics = in_lab(name, "node1", sys.executable, "-c", probe, "/metrics").stdout
    for needle in ("meshgress_leak_drops_packets_total 0", "meshgress_mesh_peers_expected 1",
                   "meshgress_mesh_peers_configured 1", "meshgress_reconcile_total",
                   'meshgress_wireguard_peer_handshake_age_seconds{peer="node2"',
                   'meshgress_reconcile_duration_seconds_bucket{le="+Inf"}'):
        assert needle in metrics, needle
    assert in_lab(name, "node1", sys.executable, "-c", probe, "/healthz").stdout.strip() == "ok"
    assert in_lab(name, "node1", sys.executable, "-c", probe, "/readyz").stdout.strip() == "ok"


def test_wg_config_exports_the_live_device(mesh_lab):
    name = mesh_lab
    text = in_lab(name, "node1", "meshgress", "wg-config", "--no-private-key").stdout
    assert "[Interface]" in text and "ListenPort = 51820" in text and "MTU = 1440" in text
    assert "PrivateKey" not in text
    assert "AllowedIPs = 198.18.2.0/24" in text and "Endpoint = 192.0.2.12:51820" in text


def test_the_private_key_is_0600_and_survives_a_restart(mesh_lab):
    name = mesh_lab
    key_file = Path(f"/run/meshgress-lab/{name}/nodes/node1/state/wireguard/private.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    before = key_file.read_text()
    status = json.loads(in_lab(name, "node1", "meshgress", "status", "--json").stdout)
    lab(name, "agent", "restart", "node1")
    assert key_file.read_text() == before
    after = json.loads(in_lab(name, "node1", "meshgress", "status", "--json").stdout)
    assert after["ownKeyPublished"] == status["ownKeyPublished"] == after["ownKeyConfigured"]


def test_a_new_nodes_pods_are_reachable_within_a_second_of_its_agent_starting(mesh_lab):
    """Measured from the moment the new node's agent begins running (its
    meshgress_agent_started_timestamp_seconds: after the interpreter loaded its modules)
    until its pods answer pods on every other node. The time from spawning the process is
    printed too; both figures go in the issue note."""
    name = mesh_lab
    joined = json.loads(lab(name, "add-node", "--json").stdout)
    target = joined["pods"]["payments/app-node3"]
    reached = {}
    deadline = time.monotonic() + 10
    while len(reached) < 2 and time.monotonic() < deadline:
        for source in ("payments/app-node1", "web/app-node2"):
            namespace, pod = source.split("/")
            if source not in reached and subprocess.run(
                    ["nsenter", f"--net=/run/netns/mg-{name}-pod-{namespace}-{pod}", "ping",
                     "-c", "1", "-W", "0.2", target], capture_output=True).returncode == 0:
                reached[source] = time.time()
    assert set(reached) == {"payments/app-node1", "web/app-node2"}
    probe = ("import urllib.request as u; "
             "print(u.urlopen('http://127.0.0.1:9820/metrics', timeout=2).read().decode())")
    metrics = in_lab(name, "node3", sys.executable, "-c", probe).stdout
    started = float(re.search(r"^meshgress_agent_started_timestamp_seconds (\S+)$", metrics,
                              re.M).group(1))
    last = max(reached.values())
    print(f"\nnew node: process spawned -> running {started - joined['agentStarted']:.3f}s; "
          f"from running: ready {joined['agentReady'] - started:.3f}s, pods wired "
          f"{joined['podsWired'] - started:.3f}s, reachable from every other node "
          f"{last - started:.3f}s (from spawn {last - joined['agentStarted']:.3f}s)")
    assert last - started < 1.0
    # Interpreter start-up and imports come on top; guard against them growing unnoticed.
    # On kube the agent also imports the kubernetes client.
    assert last - joined["agentStarted"] < (2.5 if name.datastore == "kube" else 2.0)
