"""The CNI plugin binary against a real CNI server, in throwaway network namespaces.

Each test gets a "node" namespace running `python -m cni.server` and calls the installed
`meshgress-cni` binary with CNI environment variables, as a container runtime would; pods
are further throwaway namespaces. What the kernel shows is read with `ip -j`, independent
of the code under test.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cni import protocol as p
from cni.model import compute_host_ifname
from tests.privileged.conftest import CniNode, delete_netns, ip_json, nsexec, run

pytestmark = pytest.mark.privileged

K8S_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-1;K8S_POD_UID=u1"


def address_of(result_json: dict) -> IPv4Address:
    return IPv4Address(result_json["ips"][0]["address"].split("/")[0])


def pod_addresses(netns: str, ifname: str = "eth0") -> list[str]:
    links = ip_json(netns, "addr", "show")
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in links if link["ifname"] == ifname
        for a in link.get("addr_info", []) if a["family"] == "inet"
    ]


def host_links(node: CniNode) -> list[str]:
    return sorted(link["ifname"] for link in ip_json(node.netns, "link", "show"))


def allocation_files(node: CniNode) -> list[str]:
    ipam = node.state_dir / "ipam"
    return sorted(n for n in (p.name for p in ipam.iterdir()) if n[0].isdigit())


def sysctl(netns: str, path: str) -> str:
    return nsexec(netns, "cat", f"/proc/sys/net/{path}").stdout.strip()


# --- ADD ------------------------------------------------------------------------------


def test_add_wires_routed_veth_with_gateway_and_host_route(cni_node, netns_factory):
    pod = netns_factory("pod")
    result = cni_node.call("ADD", "ctr-one", pod, args=K8S_ARGS)
    assert result.exit == 0, result.stdout
    res = result.json
    host_if = compute_host_ifname("ctr-one", "eth0")
    ip = address_of(res)
    assert ip in IPv4Network(cni_node.pod_cidr)
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"][0]["name"] == host_if
    assert "sandbox" not in res["interfaces"][0]
    assert res["interfaces"][1]["name"] == "eth0"
    assert res["interfaces"][1]["sandbox"] == f"/run/netns/{pod}"
    assert res["ips"] == [{"address": f"{ip}/32", "gateway": "169.254.1.1", "interface": 1}]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]

    # Pod side: the /32, up, the MAC reported, a link route to the gateway and a default.
    assert pod_addresses(pod) == [f"{ip}/32"]
    (eth0,) = [link for link in ip_json(pod, "link", "show") if link["ifname"] == "eth0"]
    assert eth0["address"] == res["interfaces"][1]["mac"]
    assert "UP" in eth0["flags"]
    routes = ip_json(pod, "route", "show")
    assert {"dst": "default", "gateway": "169.254.1.1", "dev": "eth0"}.items() <= next(
        r for r in routes if r["dst"] == "default").items()
    gw_route = next(r for r in routes if r["dst"] == "169.254.1.1")
    assert gw_route["dev"] == "eth0"
    assert gw_route["scope"] == "link"

    # Host side: the veth up, with its MAC, a /32 route tagged with meshgress's protocol.
    (veth,) = ip_json(cni_node.netns, "link", "show", "dev", host_if)
    assert veth["address"] == res["interfaces"][0]["mac"]
    assert "UP" in veth["flags"]
    (host_route,) = ip_json(cni_node.netns, "route", "show", f"{ip}/32")
    assert host_route["dev"] == host_if
    assert host_route["protocol"] in ("109", 109)
    assert host_route["scope"] == "link"
    assert sysctl(cni_node.netns, f"ipv4/conf/{host_if}/rp_filter") == "1"
    assert sysctl(cni_node.netns, f"ipv4/conf/{host_if}/proxy_arp") == "1"
    assert sysctl(cni_node.netns, f"ipv4/conf/{host_if}/forwarding") == "1"
    assert sysctl(cni_node.netns, f"ipv4/neigh/{host_if}/proxy_delay") == "0"

    # The pod reaches its gateway, which the node owns.
    nsexec(pod, "ping", "-c", "1", "-W", "2", "169.254.1.1")

    # The pod's Kubernetes identity from CNI_ARGS is kept with the allocation.
    record = json.loads((cni_node.state_dir / "ipam" / str(ip)).read_text())
    assert (record["namespace"], record["name"]) == ("team-a", "web-1")


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_result_follows_requested_version(cni_node, netns_factory, version):
    pod = netns_factory("pod")
    result = cni_node.call("ADD", "ctr-v", pod, conf=cni_node.conf(version, mtu=1400))
    assert result.exit == 0, result.stdout
    res = result.json
    assert res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == (version == "0.4.0")
    assert ("mtu" in res["interfaces"][1]) == (version == "1.1.0")
    (eth0,) = [link for link in ip_json(pod, "link", "show") if link["ifname"] == "eth0"]
    assert eth0["mtu"] == 1400


def test_add_twice_returns_the_same_address(cni_node, netns_factory):
    pod = netns_factory("pod")
    first = cni_node.call("ADD", "ctr-twice", pod)
    second = cni_node.call("ADD", "ctr-twice", pod)
    assert first.exit == second.exit == 0, (first.stdout, second.stdout)
    assert address_of(first.json) == address_of(second.json)
    assert pod_addresses(pod) == [f"{address_of(first.json)}/32"]
    assert len(allocation_files(cni_node)) == 1


def test_twenty_concurrent_adds_get_distinct_addresses(cni_node, netns_factory):
    pods = [netns_factory(f"p{i}") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(
            lambda item: cni_node.call("ADD", f"ctr-{item[0]}", item[1]), enumerate(pods)))
    assert [r.exit for r in results] == [0] * 20, [r.stdout for r in results if r.exit]
    addresses = [address_of(r.json) for r in results]
    assert len(set(addresses)) == 20
    for pod, address in zip(pods, addresses, strict=True):
        assert pod_addresses(pod) == [f"{address}/32"]
    assert len(allocation_files(cni_node)) == 20


def test_exhausted_pod_cidr_is_a_clear_error(cni_node_factory, netns_factory):
    node = cni_node_factory(pod_cidr="198.18.7.0/30")  # two usable addresses
    pods = [netns_factory(f"p{i}") for i in range(3)]
    assert [node.call("ADD", f"ctr-{i}", pod).exit for i, pod in enumerate(pods[:2])] == [0, 0]
    result = node.call("ADD", "ctr-2", pods[2])
    assert result.exit == 1
    assert result.code == p.ERR_IPAM_EXHAUSTED
    assert "198.18.7.0/30" in result.json["msg"]
    assert compute_host_ifname("ctr-2", "eth0") not in host_links(node)


# --- DEL ------------------------------------------------------------------------------


def test_del_removes_everything_and_is_idempotent(cni_node, netns_factory):
    pod = netns_factory("pod")
    added = cni_node.call("ADD", "ctr-del", pod)
    assert added.exit == 0
    host_if = compute_host_ifname("ctr-del", "eth0")
    for _ in range(2):
        result = cni_node.call("DEL", "ctr-del", pod)
        assert (result.exit, result.stdout) == (0, "")
    assert host_if not in host_links(cni_node)
    assert pod_addresses(pod) == []
    assert allocation_files(cni_node) == []
    assert not ip_json(cni_node.netns, "route", "show", "proto", "109")


@pytest.mark.parametrize("how", ["empty CNI_NETNS", "namespace deleted"])
def test_del_works_without_the_namespace(cni_node, netns_factory, how):
    pod = netns_factory("pod")
    assert cni_node.call("ADD", "ctr-gone", pod).exit == 0
    netns = pod
    if how == "empty CNI_NETNS":
        netns = ""
    else:
        delete_netns(pod)
    result = cni_node.call("DEL", "ctr-gone", netns)
    assert (result.exit, result.stdout) == (0, "")
    assert compute_host_ifname("ctr-gone", "eth0") not in host_links(cni_node)
    assert allocation_files(cni_node) == []


def test_failed_add_leaves_nothing_and_del_after_it_succeeds(cni_node, netns_factory):
    pod = netns_factory("pod")
    run(["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other"])
    result = cni_node.call("ADD", "ctr-fail", pod)
    assert result.exit == 1
    assert result.code == p.ERR_IFNAME_IN_USE
    assert "eth0" in result.json["msg"]
    assert compute_host_ifname("ctr-fail", "eth0") not in host_links(cni_node)
    assert allocation_files(cni_node) == []
    deleted = cni_node.call("DEL", "ctr-fail", pod)
    assert (deleted.exit, deleted.stdout) == (0, "")
    assert {link["ifname"] for link in ip_json(pod, "link", "show")} == {"lo", "eth0", "other"}


# --- CHECK ----------------------------------------------------------------------------


def test_check_passes_on_a_healthy_attachment_with_prev_result(cni_node, netns_factory):
    pod = netns_factory("pod")
    added = cni_node.call("ADD", "ctr-chk", pod)
    result = cni_node.call("CHECK", "ctr-chk", pod,
                           conf=cni_node.conf(prevResult=added.json))
    assert (result.exit, result.stdout) == (0, "")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda pod, node, ip, host_if: run(
            ["ip", "-n", pod, "addr", "del", f"{ip}/32", "dev", "eth0"]),
         "address {ip}/32 is missing"),
        (lambda pod, node, ip, host_if: run(["ip", "-n", pod, "route", "del", "default"]),
         "default route via 169.254.1.1 is missing"),
        (lambda pod, node, ip, host_if: run(
            ["ip", "-n", node, "route", "del", f"{ip}/32"]),
         "host route {ip}/32 dev {host_if} is missing"),
        (lambda pod, node, ip, host_if: run(["ip", "-n", node, "link", "del", host_if]),
         "host interface {host_if} is missing"),
    ],
    ids=["address removed", "default route removed", "host route removed", "veth deleted"],
)
def test_check_detects_damage(cni_node, netns_factory, damage, expected):
    pod = netns_factory("pod")
    added = cni_node.call("ADD", "ctr-dmg", pod)
    ip, host_if = address_of(added.json), compute_host_ifname("ctr-dmg", "eth0")
    damage(pod, cni_node.netns, ip, host_if)
    result = cni_node.call("CHECK", "ctr-dmg", pod, conf=cni_node.conf(prevResult=added.json))
    assert result.exit == 1
    assert result.code == p.ERR_CHECK_FAILED
    assert expected.format(ip=ip, host_if=host_if) in result.json["details"]


def test_check_rejects_a_prev_result_that_does_not_match(cni_node, netns_factory):
    pod = netns_factory("pod")
    added = cni_node.call("ADD", "ctr-prev", pod).json
    added["ips"][0]["address"] = "198.18.0.250/32"
    result = cni_node.call("CHECK", "ctr-prev", pod, conf=cni_node.conf(prevResult=added))
    assert result.code == p.ERR_CHECK_FAILED
    assert "does not list the allocated address" in result.json["details"]


def test_check_of_an_unknown_container(cni_node, netns_factory):
    result = cni_node.call("CHECK", "ctr-nobody", netns_factory("pod"))
    assert result.code == p.ERR_UNKNOWN_CONTAINER


# --- GC -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_reclaims_stale_allocations_and_interfaces(cni_node, netns_factory, key):
    pods = {name: netns_factory(name) for name in ("gone", "kept", "halfgone")}
    added = {name: cni_node.call("ADD", f"ctr-{name}", pod) for name, pod in pods.items()}
    assert all(r.exit == 0 for r in added.values())
    # A host veth nobody allocated (a crashed ADD), and an interface that is not ours.
    run(["ip", "-n", cni_node.netns, "link", "add", "mgc0123456789a", "type", "veth",
         "peer", "name", "mgt-peer0"])
    run(["ip", "-n", cni_node.netns, "link", "add", "mgcnotaveth", "type", "bridge"])
    # An allocation whose interface vanished.
    run(["ip", "-n", cni_node.netns, "link", "del", compute_host_ifname("ctr-halfgone", "eth0")])

    valid = [{"containerID": "ctr-kept", "ifname": "eth0"}]
    result = cni_node.call("GC", conf=cni_node.conf("1.1.0", **{key: valid}))
    assert (result.exit, result.stdout) == (0, "")

    links = host_links(cni_node)
    assert compute_host_ifname("ctr-kept", "eth0") in links
    assert compute_host_ifname("ctr-gone", "eth0") not in links
    assert "mgc0123456789a" not in links
    assert "mgcnotaveth" in links
    assert allocation_files(cni_node) == [str(address_of(added["kept"].json))]
    assert pod_addresses(pods["kept"]) == [f"{address_of(added['kept'].json)}/32"]
    # A released address is handed out again.
    again = cni_node.call("ADD", "ctr-new", netns_factory("new"))
    assert again.exit == 0


# --- STATUS, VERSION, and the agent being away -------------------------------------------


def test_status_ready_and_version(cni_node):
    status = cni_node.call("STATUS", conf=cni_node.conf("1.1.0"))
    assert (status.exit, status.stdout) == (0, "")
    version = cni_node.call("VERSION")
    assert version.exit == 0
    assert version.json["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_loose_rp_filter_makes_the_plugin_refuse(cni_node, netns_factory):
    nsexec(cni_node.netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
    status = cni_node.call("STATUS", conf=cni_node.conf("1.1.0"))
    assert status.code == p.ERR_NOT_AVAILABLE
    assert "rp_filter" in status.json["details"]
    added = cni_node.call("ADD", "ctr-loose", netns_factory("pod"))
    assert added.code == p.ERR_ANTISPOOF_UNAVAILABLE
    assert allocation_files(cni_node) == []


def test_loose_rp_filter_set_after_pods_were_wired_is_noticed(cni_node, netns_factory):
    """The good answer is cached between ADDs; a change of `all` must still be seen."""
    assert cni_node.call("ADD", "ctr-before", netns_factory("pod")).exit == 0
    nsexec(cni_node.netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
    added = cni_node.call("ADD", "ctr-after", netns_factory("pod"))
    assert added.code == p.ERR_ANTISPOOF_UNAVAILABLE
    nsexec(cni_node.netns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
    assert cni_node.call("ADD", "ctr-fixed", netns_factory("pod")).exit == 0


def test_agent_unreachable(cni_node, netns_factory):
    pod = netns_factory("pod")
    cni_node.stop()
    assert cni_node.call("ADD", "ctr-x", pod).code == p.ERR_TRY_AGAIN_LATER
    assert cni_node.call("CHECK", "ctr-x", pod).code == p.ERR_TRY_AGAIN_LATER
    status = cni_node.call("STATUS", conf=cni_node.conf("1.1.0"))
    assert status.code == p.ERR_NOT_AVAILABLE
    assert str(cni_node.socket) in status.json["msg"]
    # DEL is queued instead (see below); without the queue folder it cannot be.
    no_queue = cni_node.call("DEL", "ctr-x", pod,
                             conf=cni_node.conf(deleteQueue=str(cni_node.state_dir / "none")))
    assert no_queue.code == p.ERR_TRY_AGAIN_LATER
    assert "no deletion queue" in no_queue.json["details"]


def test_a_del_while_the_agent_is_down_succeeds_and_runs_before_any_new_add(
        cni_node_factory, netns_factory):
    """A DEL used to fail with "try again later" while the agent restarted (and forever
    once it was uninstalled): the pod stayed terminating. The shim queues it and reports
    success; the restarted server runs it before it serves anything, so the pod's
    address, host veth and route are gone by the first ADD, which may get that address."""
    node = cni_node_factory(pod_cidr="198.18.9.0/30")  # two usable addresses
    gone, stays = netns_factory("gone"), netns_factory("stays")
    first = node.call("ADD", "ctr-gone", gone, args=K8S_ARGS)
    assert first.exit == 0, first.stdout
    kept = node.call("ADD", "ctr-stays", stays)
    assert kept.exit == 0, kept.stdout
    freed = address_of(first.json)
    host_if = compute_host_ifname("ctr-gone", "eth0")
    node.stop()

    deleted = node.call("DEL", "ctr-gone", gone, args=K8S_ARGS)
    assert (deleted.exit, deleted.stdout) == (0, "")
    assert len(list(node.delete_queue.iterdir())) == 1
    assert node.call("DEL", "ctr-gone", gone, args=K8S_ARGS).exit == 0  # still one entry
    assert len(list(node.delete_queue.iterdir())) == 1
    # Nothing runs while nobody is there: the address stays taken, so nobody can get it.
    assert str(freed) in allocation_files(node)
    assert host_if in host_links(node)

    node.start()  # returns once the socket accepts connections: before any ADD
    assert host_if not in host_links(node)
    assert ip_json(node.netns, "route", "show", f"{freed}/32") == []
    assert allocation_files(node) == [str(address_of(kept.json))]
    assert list(node.delete_queue.iterdir()) == []
    # The socket accepts connections a moment before the restarted server logs that it
    # listens: wait for that line, then check the replay came before it.
    deadline = time.monotonic() + 5
    while (log := node.log.read_text()).count("CNI server listening") < 2:
        assert time.monotonic() < deadline, log
        time.sleep(0.01)
    assert log.index("replayed from the deletion queue") < log.rindex("CNI server listening")
    again = node.call("ADD", "ctr-new", netns_factory("new"))
    assert again.exit == 0, again.stdout
    assert address_of(again.json) == freed
    # DEL stays idempotent: the runtime may repeat it once the agent is back.
    assert node.call("DEL", "ctr-gone", gone).exit == 0
    assert compute_host_ifname("ctr-new", "eth0") in host_links(node)


def test_add_with_a_missing_namespace_is_unknown_container(cni_node):
    result = cni_node.call("ADD", "ctr-x", "/run/netns/mgt-cni-does-not-exist")
    assert result.code == p.ERR_UNKNOWN_CONTAINER


# --- restart --------------------------------------------------------------------------


def test_restart_keeps_allocations(cni_node, netns_factory):
    first, second = netns_factory("p1"), netns_factory("p2")
    ip1 = address_of(cni_node.call("ADD", "ctr-1", first).json)
    cni_node.stop()
    cni_node.start()
    ip2 = address_of(cni_node.call("ADD", "ctr-2", second).json)
    assert ip2 != ip1
    again = cni_node.call("ADD", "ctr-1", first)
    assert address_of(again.json) == ip1
    assert pod_addresses(first) == [f"{ip1}/32"]
    assert cni_node.call("DEL", "ctr-1", first).exit == 0
    assert allocation_files(cni_node) == [str(ip2)]


def test_server_stops_cleanly(cni_node):
    assert cni_node.process is not None
    cni_node.stop()
    deadline = time.monotonic() + 5
    while cni_node.socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(cni_node.socket).exists()


# --- never harming what is not this attachment's ---------------------------------------


def give_default_route(netns: str, ifname: str = "mgt-up0") -> dict:
    """An uplink 192.0.2.1/24 (a veth: this kernel may lack the dummy driver) with a
    default route via 192.0.2.254; returns the route."""
    run(["ip", "-n", netns, "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p"])
    run(["ip", "-n", netns, "addr", "add", "192.0.2.1/24", "dev", ifname])
    run(["ip", "-n", netns, "link", "set", f"{ifname}p", "up"])
    run(["ip", "-n", netns, "link", "set", ifname, "up"])
    run(["ip", "-n", netns, "route", "add", "default", "via", "192.0.2.254", "dev", ifname])
    (route,) = ip_json(netns, "route", "show", "default")
    return route


def test_the_nodes_own_namespace_is_never_wired_as_a_pods(cni_node):
    """CNI_NETNS naming the node's namespace used to get the node's default route
    replaced by the pod's (and removed by DEL)."""
    before = give_default_route(cni_node.netns)
    links_before = host_links(cni_node)
    result = cni_node.call("ADD", "ctr-node", cni_node.netns)
    assert (result.exit, result.code) == (1, p.ERR_INVALID_ENV), result.stdout
    assert "node's own network namespace" in result.json["msg"]
    assert ip_json(cni_node.netns, "route", "show", "default") == [before]
    assert host_links(cni_node) == links_before
    assert allocation_files(cni_node) == []
    assert cni_node.call("DEL", "ctr-node", cni_node.netns).exit == 0
    assert ip_json(cni_node.netns, "route", "show", "default") == [before]
    assert cni_node.call("CHECK", "ctr-node", cni_node.netns).code == p.ERR_INVALID_ENV


def test_attachments_whose_ids_run_together_alike_keep_their_own_veths(cni_node,
                                                                       netns_factory):
    """('abc', 'eth0') and ('abce', 'th0') once shared a host veth name: the second ADD
    deleted the first pod's veth, and either DEL deleted the other's."""
    first, second = netns_factory("p1"), netns_factory("p2")
    assert cni_node.call("ADD", "abc", first, ifname="eth0").exit == 0
    assert cni_node.call("ADD", "abce", second, ifname="th0").exit == 0
    names = {compute_host_ifname("abc", "eth0"), compute_host_ifname("abce", "th0")}
    assert len(names) == 2 and names <= set(host_links(cni_node))
    assert cni_node.call("DEL", "abce", second, ifname="th0").exit == 0
    assert compute_host_ifname("abc", "eth0") in host_links(cni_node)
    nsexec(first, "ping", "-c", "1", "-W", "2", "169.254.1.1")


def test_an_interface_with_the_host_veths_name_that_is_not_ours_is_left_alone(
        cni_node, netns_factory):
    pod = netns_factory("pod")
    name = compute_host_ifname("ctr-taken", "eth0")
    run(["ip", "-n", cni_node.netns, "link", "add", name, "type", "veth", "peer", "name",
         "mgt-other"])
    (before,) = ip_json(cni_node.netns, "link", "show", "dev", name)
    result = cni_node.call("ADD", "ctr-taken", pod)
    assert (result.exit, result.code) == (1, p.ERR_WIRING), result.stdout
    assert f"host interface {name} already exists" in result.json["msg"]
    assert ip_json(cni_node.netns, "link", "show", "dev", name) == [before]
    assert [link["ifname"] for link in ip_json(pod, "link", "show")] == ["lo"]
    assert allocation_files(cni_node) == []
    assert cni_node.call("DEL", "ctr-taken", pod).exit == 0
    assert ip_json(cni_node.netns, "link", "show", "dev", name) == [before]


def test_a_route_to_the_pods_address_that_is_not_ours_is_left_alone(cni_node, netns_factory):
    """The first ADD gets the pod CIDR's first address; someone routes it elsewhere."""
    give_default_route(cni_node.netns)
    run(["ip", "-n", cni_node.netns, "route", "add", "198.18.0.1/32", "via", "192.0.2.9"])
    (before,) = ip_json(cni_node.netns, "route", "show", "198.18.0.1/32")
    pod = netns_factory("pod")
    result = cni_node.call("ADD", "ctr-route", pod)
    assert (result.exit, result.code) == (1, p.ERR_WIRING), result.stdout
    assert "198.18.0.1/32 already exists in the node's main table" in result.json["msg"]
    assert ip_json(cni_node.netns, "route", "show", "198.18.0.1/32") == [before]
    assert compute_host_ifname("ctr-route", "eth0") not in host_links(cni_node)
    assert allocation_files(cni_node) == []


def test_a_default_route_in_the_container_is_left_alone(cni_node, netns_factory):
    pod = netns_factory("pod")
    before = give_default_route(pod, "net0")
    result = cni_node.call("ADD", "ctr-chained", pod)
    assert (result.exit, result.code) == (1, p.ERR_WIRING), result.stdout
    assert "0.0.0.0/0 already exists in the container's main table" in result.json["msg"]
    assert ip_json(pod, "route", "show", "default") == [before]
    assert sorted(link["ifname"] for link in ip_json(pod, "link", "show")) == [
        "lo", "net0", "net0p"]
    assert compute_host_ifname("ctr-chained", "eth0") not in host_links(cni_node)
    assert allocation_files(cni_node) == []
