"""Packets through pods wired by the CNI plugin: anti-spoofing, proxy ARP, chained plugins.

Topology built per test, all in throwaway namespaces:

    outside (198.19.254.2/30) --veth-- node (198.19.254.1/30, default via outside)
                                        |-- mgc... veth -- pod A
                                        |-- mgc... veth -- pod B

The node's default route matters: it is what makes a forged outside source "routable"
(so loose reverse-path filtering would accept it) and what proxy ARP needs to answer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from cni import protocol as p
from cni.model import compute_host_ifname
from tests.privileged.conftest import (
    CNI_BIN,
    NETNS_DIR,
    CniNode,
    ip_json,
    nsexec,
    run,
    socket_in_netns,
)

pytestmark = pytest.mark.privileged

NODE_IP = "198.19.254.1"
OUTSIDE_IP = "198.19.254.2"
GATEWAY = "169.254.1.1"


def connect_outside(node: CniNode, outside: str) -> None:
    """Give the node an uplink to `outside` and a default route through it."""
    run(["ip", "-n", node.netns, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
         "netns", outside])
    run(["ip", "-n", node.netns, "addr", "add", f"{NODE_IP}/30", "dev", "up0"])
    run(["ip", "-n", node.netns, "link", "set", "up0", "up"])
    run(["ip", "-n", outside, "addr", "add", f"{OUTSIDE_IP}/30", "dev", "up1"])
    run(["ip", "-n", outside, "link", "set", "up1", "up"])
    run(["ip", "-n", node.netns, "route", "add", "default", "via", OUTSIDE_IP])


def address_of(result: Any) -> str:
    return result["ips"][0]["address"].split("/")[0]


def rp_filter_drops(netns: str) -> int:
    lines = nsexec(netns, "cat", "/proc/net/netstat").stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            return int(fields["IPReversePathFilter"])
    raise AssertionError("no TcpExt in /proc/net/netstat")


def receive_all(sock: socket.socket, seconds: float) -> list[bytes]:
    sock.settimeout(0.1)
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            continue
    return got


def send_from(pod: str, source: str, payload: bytes, port: int) -> None:
    with socket_in_netns(pod) as sender:
        sender.bind((source, 0))
        for _ in range(3):
            sender.sendto(payload, (GATEWAY, port))


def test_pod_cannot_send_from_a_forged_source(cni_node, netns_factory):
    connect_outside(cni_node, netns_factory("out"))
    pod_a, pod_b = netns_factory("a"), netns_factory("b")
    ip_a = address_of(cni_node.call("ADD", "ctr-a", pod_a).json)
    ip_b = address_of(cni_node.call("ADD", "ctr-b", pod_b).json)
    forged = {
        "another pod's address": ip_b,
        "an unallocated pod address": "198.18.0.200",
        "an outside address": "203.0.113.7",
    }
    for source in forged.values():  # a pod with NET_ADMIN could do just this
        run(["ip", "-n", pod_a, "addr", "add", f"{source}/32", "dev", "eth0"])

    with socket_in_netns(cni_node.netns) as receiver:
        receiver.bind(("0.0.0.0", 0))
        port = receiver.getsockname()[1]
        drops_before = rp_filter_drops(cni_node.netns)
        send_from(pod_a, ip_a, b"legit", port)
        for name, source in forged.items():
            send_from(pod_a, source, f"forged: {name}".encode(), port)
        got = set(receive_all(receiver, 1.0))
        assert b"legit" in got
        assert not [g for g in got if g.startswith(b"forged")], got
        assert rp_filter_drops(cni_node.netns) - drops_before >= 3 * len(forged)

        # Control: without strict reverse-path filtering on the veth, the same forged
        # packets do arrive, so this test can see a spoof getting through.
        host_if = compute_host_ifname("ctr-a", "eth0")
        nsexec(cni_node.netns, "sysctl", "-qw", f"net.ipv4.conf.{host_if}.rp_filter=0")
        send_from(pod_a, forged["an outside address"], b"forged: control", port)
        assert b"forged: control" in set(receive_all(receiver, 1.0))


def test_proxy_arp_answers_for_the_gateway(cni_node_factory, netns_factory):
    node = cni_node_factory("--no-gateway-address")  # the node does not own 169.254.1.1
    connect_outside(node, netns_factory("out"))
    assert GATEWAY not in json.dumps(ip_json(node.netns, "addr", "show"))
    pod = netns_factory("pod")
    added = node.call("ADD", "ctr-arp", pod)
    assert added.exit == 0, added.stdout
    nsexec(pod, "ping", "-c", "1", "-W", "2", NODE_IP)
    (neighbour,) = [n for n in ip_json(pod, "neigh", "show", "dev", "eth0") if n["dst"] == GATEWAY]
    assert neighbour["lladdr"] == added.json["interfaces"][0]["mac"]  # the host veth's MAC


# --- chained plugins, driven the way libcni drives a conflist --------------------------


def exec_plugin(plugin: Path | str, command: str, conf: dict[str, Any], env: dict[str, str],
                node: CniNode) -> tuple[int, Any]:
    """Run one plugin inside the node's namespace (where portmap writes its rules)."""
    proc = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / node.netns}", str(plugin)],
        input=json.dumps(conf), capture_output=True, text=True, timeout=60,
        env={**env, "CNI_COMMAND": command},
    )
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out


def run_conflist(conflist: dict[str, Any], command: str, env: dict[str, str], node: CniNode,
                 runtime_config: dict[str, Any], *, prev: Any = None,
                 skip: tuple[str, ...] = ()) -> Any:
    """ADD/CHECK in order, DEL in reverse; prevResult chained (ADD) or cached (CHECK/DEL)."""
    plugins = [plugin for plugin in conflist["plugins"] if plugin["type"] not in skip]
    if command == "DEL":
        plugins.reverse()
    result = prev if command != "ADD" else None
    for plugin in plugins:
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        capabilities = plugin.get("capabilities", {})
        wanted = {k: v for k, v in runtime_config.items() if capabilities.get(k)}
        if wanted:
            conf["runtimeConfig"] = wanted
        conf.pop("capabilities", None)
        if result is not None:
            conf["prevResult"] = result
        binary = node.plugin if plugin["type"] == "meshgress-cni" else CNI_BIN / plugin["type"]
        code, out = exec_plugin(binary, command, conf, env, node)
        assert code == 0, f"{plugin['type']} {command}: {out}"
        if command == "ADD":
            result = out
    return result


def test_tuning_and_portmap_chain_after_meshgress(cni_node, netns_factory):
    outside = netns_factory("out")
    connect_outside(cni_node, outside)
    nsexec(cni_node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    pod = netns_factory("pod")
    conflist = {
        "cniVersion": "1.0.0",
        "name": "mgchain",
        "plugins": [
            {"type": "meshgress-cni", "socket": str(cni_node.socket),
             "deleteQueue": str(cni_node.delete_queue)},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "1234"}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    runtime = {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}
    env = {"CNI_CONTAINERID": "ctr-chain", "CNI_NETNS": str(NETNS_DIR / pod),
           "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_BIN), "CNI_ARGS": "",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    result = run_conflist(conflist, "ADD", env, cni_node, runtime)
    assert result["ips"][0]["interface"] == 1
    assert result["interfaces"][1]["sandbox"] == str(NETNS_DIR / pod)
    pod_ip = address_of(result)
    assert nsexec(pod, "cat", "/proc/sys/net/core/somaxconn").stdout.strip() == "1234"

    # portmap's DNAT: a client outside reaches the pod through the node's hostPort.
    with socket_in_netns(pod, kind=socket.SOCK_STREAM) as listener:
        listener.bind(("0.0.0.0", 8080))
        listener.listen(1)
        listener.settimeout(5)
        received: list[tuple[bytes, str]] = []

        def serve_one() -> None:
            conn, peer = listener.accept()
            with conn:
                received.append((conn.recv(100), peer[0]))

        server = threading.Thread(target=serve_one)
        server.start()
        with socket_in_netns(outside, kind=socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect((NODE_IP, 18080))
            client.sendall(b"through portmap")
        server.join(10)
    assert received and received[0][0] == b"through portmap"
    assert IPv4Address(pod_ip)  # the DNAT target is the address meshgress allocated
    assert pod_ip in nsexec(cni_node.netns, "iptables-save", "-t", "nat").stdout

    # Debian's portmap 1.1.1 fails CHECK on IPv4-only pods (it looks for an IPv6 DNAT chain
    # it never made; fixed upstream later), so a runtime would set disableCheck for it.
    run_conflist(conflist, "CHECK", env, cni_node, runtime, prev=result, skip=("portmap",))
    run_conflist(conflist, "DEL", env, cni_node, runtime, prev=result)
    assert pod_ip not in nsexec(cni_node.netns, "iptables-save", "-t", "nat").stdout
    links = [link["ifname"] for link in ip_json(cni_node.netns, "link", "show")]
    assert compute_host_ifname("ctr-chain", "eth0") not in links
    assert cni_node.call("CHECK", "ctr-chain", pod).code == p.ERR_UNKNOWN_CONTAINER
