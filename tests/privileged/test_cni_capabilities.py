"""The agent's CNI half with the capabilities the chart gives it: NET_ADMIN and NET_RAW.

The real server runs in its node namespace under `setpriv`, every other capability gone
from all its sets (as `drop: [ALL]`, `add: [NET_ADMIN, NET_RAW]` leave a container), and
the real plugin binary, run as the runtime runs it (root on the host), wires pods through
it. The agent never enters a pod's namespace (setns(2) would need CAP_SYS_ADMIN): the shim
hands it a netlink socket made inside the namespace, which the agent uses only after
checking that it is one and lives in the namespace the request names.
"""

from __future__ import annotations

import contextlib
import json
import socket
from ipaddress import IPv4Address

import pytest

from cni import plugin
from cni import protocol as p
from cni.model import compute_host_ifname
from tests.privileged.conftest import (
    NETNS_DIR,
    CniNode,
    call_in_netns,
    ip_json,
    nsexec,
    socket_in_netns,
)

pytestmark = pytest.mark.privileged

NET_ADMIN, NET_RAW = 12, 13
AGENT_CAPABILITIES = ("net_admin", "net_raw")


@pytest.fixture
def confined_node(cni_node_factory) -> CniNode:
    node: CniNode = cni_node_factory(capabilities=AGENT_CAPABILITIES)
    sets = node.capability_sets()
    only = (1 << NET_ADMIN) | (1 << NET_RAW)
    assert (sets["CapEff"], sets["CapPrm"], sets["CapBnd"]) == (only, only, only), sets
    return node


def pod_state(pod: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The pod's IPv4 addresses on eth0 and its routes (destination, gateway)."""
    addresses = [f"{a['local']}/{a['prefixlen']}"
                 for link in ip_json(pod, "addr", "show", "dev", "eth0")
                 for a in link.get("addr_info", []) if a["family"] == "inet"]
    routes = [(r["dst"], r.get("gateway", "")) for r in ip_json(pod, "route", "show")]
    return addresses, sorted(routes)


def test_pods_are_wired_checked_and_deleted_with_net_admin_and_net_raw_only(
        confined_node, netns_factory):
    pods = [netns_factory(f"pod{n}") for n in range(2)]
    addresses = []
    for n, pod in enumerate(pods):
        added = confined_node.call("ADD", f"ctr-{n}", pod)
        assert added.exit == 0, (added.stdout, confined_node.log.read_text())
        ip = added.json["ips"][0]["address"]
        addresses.append(IPv4Address(ip.split("/")[0]))
        assert pod_state(pod) == ([ip], [("169.254.1.1", ""), ("default", "169.254.1.1")])
        (eth0,) = ip_json(pod, "link", "show", "dev", "eth0")
        assert "UP" in eth0["flags"]
        nsexec(pod, "ping", "-c", "1", "-W", "2", "169.254.1.1")
        checked = confined_node.call("CHECK", f"ctr-{n}", pod,
                                     conf=confined_node.conf(prevResult=added.json))
        assert (checked.exit, checked.stdout) == (0, ""), checked.stdout
    # Pod to pod through the node, both wired by the confined server.
    nsexec(pods[0], "ping", "-c", "1", "-W", "2", str(addresses[1]))
    # CHECK reads the pod's side through the socket too: it sees damage there.
    nsexec(pods[1], "ip", "route", "del", "default")
    damaged = confined_node.call("CHECK", "ctr-1", pods[1])
    assert damaged.code == p.ERR_CHECK_FAILED
    assert "default route via 169.254.1.1 is missing" in damaged.json["details"]
    for n, pod in enumerate(pods):
        deleted = confined_node.call("DEL", f"ctr-{n}", pod)
        assert (deleted.exit, deleted.stdout) == (0, "")
        assert [link["ifname"] for link in ip_json(pod, "link", "show")] == ["lo"]
    assert not [link for link in ip_json(confined_node.netns, "link", "show")
                if link["ifname"].startswith("mgc")]
    assert "Operation not permitted" not in confined_node.log.read_text()


# --- a socket that is not what the request says is refused, and nothing changes ------------


def raw_request(node: CniNode, container: str, netns: str, fds: list[int],
                command: str = "ADD") -> dict[str, object]:
    """One request as the shim frames it, with the file descriptors given (the shim would
    send the namespace's and a netlink socket's); the agent's answer as JSON."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
           "CNI_NETNS": str(NETNS_DIR / netns), "CNI_ARGS": "", "CNI_PATH": ""}
    values = [env[name.decode()].encode() for name in plugin.REQUEST_ENV]
    frame = p.encode_request(values, json.dumps(node.conf()).encode())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(node.socket))
        rights = b"".join(fd.to_bytes(4, "little") for fd in fds)
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        answer = b""
        while len(answer) < 12 or len(answer) < 12 + p.decode_response_header(answer[:12])[1]:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        with contextlib.suppress(OSError):  # the agent waits for it only after a good ADD
            sock.send(p.ACK)
    exit_code, length = p.decode_response_header(answer[:12])
    assert exit_code == 1
    error: dict[str, object] = json.loads(answer[12:12 + length])
    return error


def netlink_in(netns: str) -> socket.socket:
    sock: socket.socket = call_in_netns(netns, lambda: socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    return sock


@pytest.mark.parametrize(
    ("case", "reason"),
    [("another pod's", "lives in another network namespace"),
     ("the node's", "lives in another network namespace"),
     ("not netlink", "not an rtnetlink socket"),
     ("a file", "is not a socket")])
def test_a_socket_that_does_not_belong_to_the_named_namespace_is_refused(
        confined_node, netns_factory, tmp_path, case, reason):
    """Otherwise the pod's address and routes would land wherever the socket lives (the
    node's own routing table, say) while the veth went to the named namespace."""
    pod, elsewhere = netns_factory("pod"), netns_factory("elsewhere")
    links_before = ip_json(confined_node.netns, "link", "show")
    routes_before = ip_json(confined_node.netns, "route", "show")
    stand_in = tmp_path / "not-a-socket"
    stand_in.write_text("")
    with open(NETNS_DIR / pod, "rb") as netns:
        if case == "another pod's":
            made = netlink_in(elsewhere)
        elif case == "the node's":
            made = netlink_in(confined_node.netns)
        elif case == "not netlink":
            made = socket_in_netns(pod)
        else:
            made = open(stand_in, "rb")  # noqa: SIM115 (closed below)
        with made:
            for command in ("ADD", "CHECK"):
                error = raw_request(confined_node, "ctr-forged", pod,
                                    [netns.fileno(), made.fileno()], command)
                assert error["code"] == p.ERR_INVALID_ENV, error
                assert reason in str(error["msg"]), error
    assert ip_json(confined_node.netns, "link", "show") == links_before
    assert ip_json(confined_node.netns, "route", "show") == routes_before
    assert [link["ifname"] for link in ip_json(pod, "link", "show")] == ["lo"]
    assert [link["ifname"] for link in ip_json(elsewhere, "link", "show")] == ["lo"]
    ipam = confined_node.state_dir / "ipam"
    assert not [path for path in ipam.iterdir() if path.name[0].isdigit()]  # nothing allocated
    assert compute_host_ifname("ctr-forged", "eth0") not in [
        link["ifname"] for link in ip_json(confined_node.netns, "link", "show")]


def test_the_nodes_own_namespace_is_still_refused(confined_node):
    """The node's namespace with a socket in it is consistent, and still no pod's."""
    with open(NETNS_DIR / confined_node.netns, "rb") as netns, \
            netlink_in(confined_node.netns) as made:
        error = raw_request(confined_node, "ctr-node", confined_node.netns,
                            [netns.fileno(), made.fileno()])
    assert error["code"] == p.ERR_INVALID_ENV
    assert "node's own network namespace" in str(error["msg"])
    via_shim = confined_node.call("ADD", "ctr-node", confined_node.netns)
    assert via_shim.code == p.ERR_INVALID_ENV


def test_an_older_shim_that_sends_the_namespace_alone_is_told_to_retry(confined_node,
                                                                      netns_factory):
    pod = netns_factory("pod")
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-old", "CNI_IFNAME": "eth0",
           "CNI_NETNS": str(NETNS_DIR / pod), "CNI_ARGS": "", "CNI_PATH": ""}
    frame = bytearray(p.encode_request([env[n.decode()].encode() for n in plugin.REQUEST_ENV],
                                       json.dumps(confined_node.conf()).encode()))
    frame[:4] = p.NETNS_ONLY_REQUEST_MAGIC
    with socket.socket(socket.AF_UNIX) as sock, open(NETNS_DIR / pod, "rb") as netns:
        sock.settimeout(30)
        sock.connect(str(confined_node.socket))
        sock.sendmsg([bytes(frame)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       netns.fileno().to_bytes(4, "little"))])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    _, length = p.decode_response_header(answer[:12])
    error = json.loads(answer[12:12 + length])
    assert error["code"] == p.ERR_TRY_AGAIN_LATER
    assert "older than the agent" in error["msg"]
    assert [link["ifname"] for link in ip_json(pod, "link", "show")] == ["lo"]
