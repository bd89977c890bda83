"""The lab's life cycle, run through the real CLI: up, status, exec, down, and crashes, on
each datastore; on kube, every process under its own ServiceAccount token."""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MESHGRESS, lab, lab_store, observe_for

pytestmark = pytest.mark.e2e


def lab_netns(name):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.split() and line.split()[0].startswith(f"mg-{name}-"))


def pids_in(namespaces):
    pids = set()
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids.update(int(p) for p in out.split())
    return pids


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def in_lab(name, target, *command, check=True):
    return lab(name, "exec", target, "--", *command, check=check)


def test_up_status_exec_down_twice_in_a_row(lab_name):
    for _round in range(2):
        lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "1")
        status = json.loads(lab(lab_name, "status", "--json").stdout)
        assert status["up"] is True
        assert status["datastore"]["kind"] == lab_name.datastore
        assert [(n["name"], n["underlayAddress"], n["podCIDR"]) for n in status["nodes"]] == [
            ("node1", "192.0.2.11", "198.18.1.0/24"),
            ("node2", "192.0.2.12", "198.18.2.0/24"),
            ("gw1", "192.0.2.101", "198.18.81.0/24"),
        ]
        assert status["outside"] == {"address": "192.0.2.254", "netns": f"mg-{lab_name}-outside",
                                     "tcpEchoPort": 7777, "udpEchoPort": 7777, "running": True}
        assert status["monitor"] == {"address": "192.0.2.250", "netns": f"mg-{lab_name}-monitor"}
        pods = {(p["namespace"], p["name"]): p for p in status["pods"]}
        assert sorted(pods) == [("payments", "app-node1"), ("payments", "app-node2"),
                                ("web", "app-node1"), ("web", "app-node2")]
        for (_ns, name), pod in pods.items():
            node = name.removeprefix("app-")
            cidr = next(n["podCIDR"] for n in status["nodes"] if n["name"] == node)
            assert pod["node"] == node
            assert ipaddress.ip_address(pod["address"]) in ipaddress.ip_network(cidr)
        # A pod has its /32, and pods on the same node reach each other.
        addr = in_lab(lab_name, "payments/app-node1", "ip", "-4", "-o", "addr", "show",
                      "eth0").stdout
        assert f"{pods[('payments', 'app-node1')]['address']}/32" in addr
        in_lab(lab_name, "payments/app-node1", "ping", "-c", "1", "-W", "2",
               pods[("web", "app-node1")]["address"])

        # Node to node and node to outside over the underlay; the outside host reports
        # the source address it saw.
        in_lab(lab_name, "node1", "ping", "-c", "1", "-W", "2", "192.0.2.12")
        for node, address in (("node1", "192.0.2.11"), ("gw1", "192.0.2.101")):
            for proto in ("tcp", "udp"):
                seen = in_lab(lab_name, node, sys.executable, "-m", "meshgress.lab.echo", proto,
                              "192.0.2.254", "7777").stdout.strip()
                assert seen == address

        namespaces = lab_netns(lab_name)
        control_plane = ("cp",) if lab_name.datastore == "kube" else ()
        assert namespaces == sorted(f"mg-{lab_name}-{n}" for n in (
            "underlay", "outside", "monitor", "node1", "node2", "gw1", "pod-payments-app-node1",
            "pod-payments-app-node2", "pod-web-app-node1", "pod-web-app-node2",
            *control_plane))
        pids = pids_in(namespaces)
        assert pids, "the lab runs node anchors and the echo service"

        down = lab(lab_name, "down")
        assert f"removed {len(namespaces)} network namespaces" in down.stdout
        assert lab_netns(lab_name) == []
        assert not any(alive(p) for p in pids)
        assert not Path(f"/run/meshgress-lab/{lab_name}").exists()
        assert json.loads(lab(lab_name, "status", "--json", check=False).stdout)["up"] is False


def test_each_node_has_private_wireguard_socket_dir_and_state_dir(lab_name):
    lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "0")
    marker = f"mark-{lab_name}"
    in_lab(lab_name, "node1", "touch", f"/var/run/wireguard/{marker}",
           f"/var/lib/meshgress/{marker}")
    # Each node's wireguard-go socket sits in its own folder, under the production name.
    assert sorted(in_lab(lab_name, "node1", "ls", "/var/run/wireguard").stdout.split()) == sorted([
        "meshgress0.sock", marker])
    assert marker not in in_lab(lab_name, "node2", "ls", "/var/run/wireguard").stdout
    assert marker not in in_lab(lab_name, "node2", "ls", "/var/lib/meshgress").stdout
    assert not Path(f"/var/run/wireguard/{marker}").exists(), "leaked into the host"
    assert Path(f"/run/meshgress-lab/{lab_name}/nodes/node1/state/{marker}").exists()
    # A network namespace created on the host later (as pods will be) is visible inside.
    late = f"mg-{lab_name}-late"
    subprocess.run(["ip", "netns", "add", late], check=True)
    assert late in in_lab(lab_name, "node1", "ls", "/run/netns").stdout


def test_the_underlay_carries_only_what_the_nodes_send(lab_name, tmp_path):
    """The underlay bridge sends nothing of its own: with multicast snooping it joined
    224.0.0.106 whenever it came up and sent IGMP reports onto the segment whose capture
    proves that only WireGuard crosses it."""
    lab(lab_name, "up", "--nodes", "1", "--gateway-nodes", "0")
    underlay, pcap = f"mg-{lab_name}-underlay", tmp_path / "igmp.pcap"
    tcpdump = subprocess.Popen(["nsenter", f"--net=/run/netns/{underlay}", "tcpdump", "-i",
                                "br0", "-n", "--immediate-mode", "-U", "-w", str(pcap),
                                "igmp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (pcap.exists() and pcap.stat().st_size > 0):
            assert tcpdump.poll() is None and time.monotonic() < deadline, "no tcpdump"
            time.sleep(0.05)
        for state in ("down", "up"):  # what made the bridge report, every time
            subprocess.run(["ip", "-n", underlay, "link", "set", "br0", state], check=True)
        observe_for(3.0)  # IGMPv3 repeats its unsolicited report within a second or two
    finally:
        tcpdump.terminate()
        tcpdump.wait(timeout=10)
    reports = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True,
                             text=True, check=True).stdout
    assert reports == "", reports


def test_the_datastore_holds_the_lab_cluster(lab_name):
    lab(lab_name, "up", "--nodes", "1", "--gateway-nodes", "1")
    from meshgress.datastore import Kind

    store = lab_store(lab_name)
    try:
        nodes = store.list(Kind.NODE).items
        namespaces = {n["metadata"]["name"]: n["metadata"]["labels"]
                      for n in store.list(Kind.NAMESPACE).items}
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p
                for p in store.list(Kind.POD).items}
    finally:
        store.close()
    assert sorted((n["metadata"]["name"], n["spec"]["podCIDRs"], n["metadata"]["labels"].get(
        "meshgress.io/gateway"), n["status"]["addresses"][0]["address"]) for n in nodes) == [
        ("gw1", ["198.18.81.0/24"], "true", "192.0.2.101"),
        ("node1", ["198.18.1.0/24"], None, "192.0.2.11")]
    assert namespaces["payments"]["kubernetes.io/metadata.name"] == "payments"
    assert namespaces["payments"]["team"] == "payments"
    system = {"default", "kube-node-lease", "kube-public", "kube-system", "meshgress-system"}
    assert set(namespaces) == {"payments", "web"} | (
        system if lab_name.datastore == "kube" else set())
    app = pods[("payments", "app-node1")]
    assert app["spec"]["nodeName"] == "node1"
    assert app["status"]["podIP"].startswith("198.18.1.")


def test_up_refuses_a_running_lab_and_bad_targets(lab_name):
    lab(lab_name, "up", "--nodes", "1", "--gateway-nodes", "0")
    again = lab(lab_name, "up", "--nodes", "1", check=False)
    assert again.returncode == 2
    assert "is already up; run `meshgress lab down` first" in again.stderr
    bad = in_lab(lab_name, "node9", "true", check=False)
    assert bad.returncode == 2
    assert ("unknown target 'node9' (one of: outside, monitor, node1, NAMESPACE/POD)"
            in bad.stderr)
    before = json.loads(lab(lab_name, "status", "--json").stdout)
    namespaces = lab_netns(lab_name)
    nowhere = lab(lab_name, "add-pod", "web/lost", "--node", "node9", check=False)
    assert nowhere.returncode != 0 and "node9" in nowhere.stderr, nowhere.stderr
    twice = lab(lab_name, "add-pod", "web/app-node1", "--node", "node1", check=False)
    assert twice.returncode != 0
    assert "pod web/app-node1 already exists" in twice.stderr, twice.stderr
    # The refused commands changed nothing.
    after = json.loads(lab(lab_name, "status", "--json").stdout)
    assert after["up"] is True and after["pods"] == before["pods"]
    assert lab_netns(lab_name) == namespaces


def _part_way(name):
    """Some node namespaces exist; on kube, the control plane runs too (killed while it
    starts or installs, `lab up` leaves etcd and the API server running in the lab)."""
    if name.datastore == "kube":
        cp = f"mg-{name}-cp"
        return cp in lab_netns(name) and bool(pids_in([cp]))
    return len(lab_netns(name)) >= 4


def test_down_after_a_killed_up_leaves_nothing(lab_name):
    proc = subprocess.Popen([MESHGRESS, "lab", "--name", lab_name, "up", "--nodes", "3",
                             "--gateway-nodes", "2", "--datastore", lab_name.datastore],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # Kill it part-way: once some node namespaces exist but before it finishes.
    while time.monotonic() < deadline and not _part_way(lab_name):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lab_netns(lab_name), "the kill should have left something to clean up"
    observe_for(0.5)  # any process it had started comes up, to be found by `down`
    pids = pids_in(lab_netns(lab_name))
    lab(lab_name, "down")
    assert lab_netns(lab_name) == []
    assert not any(alive(p) for p in pids)
    # And the next up works on the cleaned machine.
    lab(lab_name, "up", "--nodes", "1", "--gateway-nodes", "0")
    assert json.loads(lab(lab_name, "status", "--json").stdout)["up"] is True


def test_up_over_leftovers_of_a_killed_up(lab_name):
    proc = subprocess.Popen([MESHGRESS, "lab", "--name", lab_name, "up", "--nodes", "2",
                             "--datastore", lab_name.datastore],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _part_way(lab_name):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "0")
    status = json.loads(lab(lab_name, "status", "--json").stdout)
    assert status["up"] is True
    assert [n["name"] for n in status["nodes"]] == ["node1", "node2"]


def test_demo_runs_to_the_end_and_every_check_holds(lab_name):
    proc = lab(lab_name, "demo", "--nodes", "2", "--gateway-nodes", "1", timeout=300)
    assert "all checks held" in proc.stdout, proc.stdout
    assert "web/app-node1          tcp: outside saw 192.0.2.11 (its node's address)" \
        in proc.stdout
    assert "tcp: outside saw 192.0.2.201 (a stable egress IP)" in proc.stdout \
        or "tcp: outside saw 192.0.2.202 (a stable egress IP)" in proc.stdout


def test_on_kube_each_process_authenticates_as_its_own_service_account(kube_lab_name):
    """No agent or gateway runs as admin: each has a kubeconfig (0600, in its node's state
    folder) whose token belongs to its component's ServiceAccount and is bound to the Pod
    standing for it on its node. The admin can use the lab from the host (the printed
    export line) and through `lab kubectl`."""
    import yaml

    from meshgress.datastore import Kind
    from meshgress.lab.controlplane import binary_path
    from meshgress.lab.lab import Lab

    name = kube_lab_name
    up = lab(name, "up", "--nodes", "1", "--gateway-nodes", "1").stdout
    export = next(line for line in up.splitlines() if line.startswith("export KUBECONFIG="))
    host_kubeconfig = export.removeprefix("export KUBECONFIG=")

    nodes = subprocess.run([str(binary_path("kubectl")), f"--kubeconfig={host_kubeconfig}",
                            "get", "nodes", "-o", "name"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert nodes == ["node/gw1", "node/node1"]
    policies = lab(name, "kubectl", "--", "get", "egp", "-o", "name").stdout.split()
    assert policies == ["egresspolicy.meshgress.io/payments"]

    the_lab = Lab(name)
    record = the_lab.load_record()
    processes = {("agent", node): pid for node, pid in record.agents.items()}
    processes |= {("gateway", node): pid for node, pid in record.gateways.items()}
    assert sorted(processes) == [("agent", "gw1"), ("agent", "node1"), ("gateway", "gw1")]
    for (component, node), pid in processes.items():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        kubeconfig = argv[argv.index("--kubeconfig") + 1]
        assert kubeconfig == f"/var/lib/meshgress/kube/{component}.kubeconfig"
        on_host = the_lab.node_dir(node) / "state" / "kube" / f"{component}.kubeconfig"
        assert on_host.stat().st_mode & 0o777 == 0o600
        token = yaml.safe_load(on_host.read_text())["users"][0]["user"]["token"]
        user = the_lab.kube().plane.whoami(token)
        assert user["username"] == f"system:serviceaccount:meshgress-system:meshgress-{component}"
        assert user["extra"]["authentication.kubernetes.io/node-name"] == [node]
        assert user["extra"]["authentication.kubernetes.io/pod-name"] == [
            f"meshgress-{component}-{node}"]
        assert "system:masters" not in user["groups"]
        if component == "gateway":
            # Its lease identity is the pod its token is bound to: the chart's admission
            # policy refuses a lease write under any other name.
            assert argv[argv.index("--identity") + 1] == f"meshgress-gateway-{node}"
    # The agents published their keys on their own Nodes, under those identities.
    store = lab_store(name)
    try:
        for node in store.list(Kind.NODE).items:
            assert "meshgress.io/wireguard-public-key" in node["metadata"]["annotations"]
    finally:
        store.close()
