"""The `inet meshgress` table on a real kernel, each test in its own network namespaces.

Safety: nothing here touches the host's network namespace or its ruleset. Namespaces are
named `mgt-nft-<role>-<random>`, removed after each test and, as leftovers of a crashed
run, before the first one. Shell commands run under `nsenter --net=`. libnftables binds
the namespace of the thread that creates its context (its netlink socket is opened
then), so every adapter is created *and* used in a worker thread that entered the
test's namespace and checked that it did (`NetnsWorker`); the test process itself
never leaves the host namespace.

Topology of the traffic tests (all addresses from the documentation ranges):

    pod ns              node ns (the table under test)              peer ns
    eth0 198.18.1.9 -- mgc0test1 (169.254.1.1)
                        eth0 192.0.2.1/24  ---- underlay veth ----  eth0 192.0.2.2/24
                        meshgress0 ------- stand-in for the mesh --  mesh0 198.18.130.1/24
                        mge0test --- stand-in for an egress tunnel -- egw0 192.0.2.200/32
                        lo 198.18.1.5/32 (a pod-range source for locally sent probes)

The peer counts in its own table what arrives from the node: anything from or to the
pod ranges on the underlay (must stay 0), the node's own echo requests (masqueraded pod
traffic) and packets from the test pod (198.18.1.9, unchanged) on the mesh and egress
stand-ins.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshgress.kernel.nft_model import (
    Hook,
    NftChain,
    NftCounter,
    NftMap,
    NftPlan,
    NftSet,
    Rule,
    Ruleset,
    Verdict,
    counter_ref,
    match,
    meta,
    payload,
    plan_ruleset,
    set_ref,
)
from meshgress.kernel.nftables import NftablesAdapter, NftError, apply_ruleset
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE
from meshgress.slots import slot_mark, slot_table
from nodeagent.firewall import FirewallSpec, compute_ruleset
from nodeagent.steering import slot_table_routes
from nodeagent.steering_kernel import NetlinkSteering, SteeringPlan
from tests.run_owned import is_crashed_runs, owned

TABLE = {"family": NFT_FAMILY, "table": NFT_TABLE}

pytestmark = pytest.mark.privileged

PREFIX = "mgt-nft-"
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")

net = ipaddress.IPv4Network
SPEC = FirewallSpec((net("198.18.0.0/17"),), (net("198.19.0.0/16"),))
WIDE = FirewallSpec((net("198.18.0.0/16"),), (net("198.19.0.0/16"),))


# --- helpers --------------------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, timeout: float = 20,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          input=input_text, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: exit {proc.returncode}: {proc.stderr or proc.stdout}")
    return proc


def nsexec(netns: str, *argv: str, check: bool = True,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command inside a namespace; never falls back to the host (nsenter fails first)."""
    assert netns.startswith(PREFIX)
    return run(["nsenter", f"--net={NETNS_DIR / netns}", *argv], check=check,
               input_text=input_text)


def nft_json(netns: str, *argv: str) -> Any:
    return json.loads(nsexec(netns, "nft", "-j", *argv).stdout)


def ping(netns: str, dst: str, *, src: str | None = None, ok: bool = True) -> None:
    """One echo request; `ok` says whether a reply must come back (or must not)."""
    argv = ["ping", "-n", "-q", "-c", "1", "-W", "2" if ok else "0.3"]
    if src:
        argv += ["-I", src]
    proc = nsexec(netns, *argv, dst, check=False)
    assert (proc.returncode == 0) == ok, (
        f"ping {dst} from {src or netns}: exit {proc.returncode}: {proc.stdout}{proc.stderr}")


class NetnsWorker:
    """A thread that lives in one network namespace; nftables work is submitted to it."""

    def __init__(self, netns: str) -> None:
        self.path = NETNS_DIR / netns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=netns, initializer=self._enter)

    def _enter(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.path}")
        finally:
            os.close(fd)
        here, there = os.stat("/proc/thread-self/ns/net"), os.stat(self.path)
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            raise RuntimeError(f"worker thread is not in {self.path}")

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result(timeout=30)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class AdapterInNetns:
    """An NftablesAdapter created and used only inside a test namespace (NftablesPort)."""

    def __init__(self, worker: NetnsWorker) -> None:
        self.worker = worker
        self.adapter = worker.call(NftablesAdapter, NFT_FAMILY, NFT_TABLE)

    def read(self) -> dict[str, Any] | None:
        return self.worker.call(self.adapter.read)

    def apply(self, plan: NftPlan) -> None:
        self.worker.call(self.adapter.apply, plan)

    def counters(self) -> dict[str, tuple[int, int]]:
        return self.worker.call(self.adapter.counters)

    def delete_table(self) -> None:
        self.worker.call(self.adapter.delete_table)

    def reconcile(self, ruleset: Ruleset) -> NftPlan:
        return self.worker.call(apply_ruleset, self.adapter, ruleset)


def list_netns(prefix: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    return []


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _nft_session() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it creates network namespaces)")
    for tool in ("ip", "nsenter", "nft", "ping"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    for name in list_netns(PREFIX):
        if is_crashed_runs(name, PREFIX):
            run(["ip", "netns", "delete", name], check=False)
    yield
    for name in list_netns(owned(PREFIX)):
        run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def make_netns(_nft_session: None) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(role: str) -> str:
        name = f"{owned(PREFIX)}{role}-{secrets.token_hex(3)}"
        run(["ip", "netns", "add", name])
        made.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    yield make
    for name in reversed(made):
        run(["ip", "netns", "delete", name], check=False)


@dataclass
class Node:
    netns: str
    nft: AdapterInNetns


@pytest.fixture
def node(make_netns: Callable[[str], str]) -> Iterator[Node]:
    name = make_netns("node")
    worker = NetnsWorker(name)
    try:
        yield Node(name, AdapterInNetns(worker))
    finally:
        worker.close()


PEER_TABLE = """
table inet mgtpeer {
    counter cluster_on_wire {}
    counter node_echo {}
    counter mesh_pod {}
    counter egress_pod {}
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "eth0" ip saddr 198.18.0.0/15 counter name cluster_on_wire
        iifname "eth0" ip daddr 198.18.0.0/15 counter name cluster_on_wire
        iifname "eth0" ip saddr 192.0.2.1 icmp type echo-request counter name node_echo
        iifname "mesh0" ip saddr 198.18.1.9 counter name mesh_pod
        iifname "egw0" ip saddr 198.18.1.9 counter name egress_pod
    }
}
"""


@dataclass
class Underlay:
    node: Node
    peer: str

    def peer_counts(self) -> dict[str, int]:
        doc = nft_json(self.peer, "list", "counters", "table", "inet", "mgtpeer")
        return {item["counter"]["name"]: item["counter"]["packets"]
                for item in doc["nftables"] if "counter" in item}

    def add_pod(self, pod_ns: str, address: str, host_if: str = "mgc0test1") -> None:
        """A pod wired as the CNI does: routed veth, /32, default via a link-local gateway."""
        n = self.node.netns
        run(["ip", "-n", n, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
             "netns", pod_ns])
        run(["ip", "-n", n, "addr", "add", "169.254.1.1/32", "dev", host_if])
        run(["ip", "-n", n, "link", "set", host_if, "up"])
        run(["ip", "-n", n, "route", "add", f"{address}/32", "dev", host_if])
        run(["ip", "-n", pod_ns, "addr", "add", f"{address}/32", "dev", "eth0"])
        run(["ip", "-n", pod_ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])
        run(["ip", "-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])


@pytest.fixture
def underlay(node: Node, make_netns: Callable[[str], str]) -> Underlay:
    n, p = node.netns, make_netns("peer")
    run(["ip", "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
         "netns", p])
    run(["ip", "-n", n, "link", "add", "meshgress0", "type", "veth", "peer", "name", "mesh0",
         "netns", p])
    for ns, address in ((n, "192.0.2.1/24"), (p, "192.0.2.2/24")):
        run(["ip", "-n", ns, "addr", "add", address, "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", n, "link", "add", "mge0test", "type", "veth", "peer", "name", "egw0",
         "netns", p])
    for ns, link in ((n, "meshgress0"), (n, "mge0test"), (p, "mesh0"), (p, "egw0")):
        run(["ip", "-n", ns, "link", "set", link, "up"])
    run(["ip", "-n", p, "addr", "add", "198.18.130.1/24", "dev", "mesh0"])
    run(["ip", "-n", p, "route", "add", "198.18.1.0/24", "dev", "mesh0"])
    run(["ip", "-n", p, "addr", "add", "192.0.2.200/32", "dev", "egw0"])
    run(["ip", "-n", p, "route", "add", "198.18.1.9/32", "dev", "egw0"])
    # The node: everything not known leaves on the underlay (as a missing mesh route
    # would), the remote pod range behind the mesh, and a pod-range address to probe from.
    run(["ip", "-n", n, "route", "add", "default", "via", "192.0.2.2", "dev", "eth0"])
    run(["ip", "-n", n, "route", "add", "198.18.130.0/24", "dev", "meshgress0"])
    run(["ip", "-n", n, "route", "add", "192.0.2.200/32", "dev", "mge0test"])
    run(["ip", "-n", n, "addr", "add", "198.18.1.5/32", "dev", "lo"])
    nsexec(n, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    # The peer routes the node's pods to the mesh and egress links; the node answers ARP
    # for them there.
    for link in ("meshgress0", "mge0test"):
        nsexec(n, "sysctl", "-q", "-w", f"net.ipv4.conf.{link}.proxy_arp=1")
    nsexec(p, "nft", "-f", "-", input_text=PEER_TABLE)
    return Underlay(node, p)


# --- the table itself -----------------------------------------------------------------

EXPECTED_LISTING = """\
table inet meshgress {
\tcomment "managed by meshgress; do not edit"
\tcounter leak_out {
\t\tcomment "plaintext pod traffic dropped before leaving on the underlay"
\t\tpackets 0 bytes 0
\t}

\tcounter spoof_in {
\t\tcomment "packets claiming a pod source dropped on a non-cluster interface"
\t\tpackets 0 bytes 0
\t}

\tset cluster_v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 198.18.0.0/17 }
\t}

\tset nonmasq_v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 198.18.0.0/17, 198.19.0.0/16 }
\t}

\tchain guard_out {
\t\ttype filter hook postrouting priority srcnat + 10; policy accept;
\t\toifname "lo" accept comment "mg:82f6e8cfb24a"
\t\toifname "meshgress0" accept comment "mg:47a44f19ce55"
\t\toifname "mgc*" accept comment "mg:f45d59cf0f74"
\t\toifname "mge*" accept comment "mg:e44d9dd70125"
\t\tip saddr @cluster_v4 counter name "leak_out" drop comment "mg:f2248cf0997b"
\t\tip daddr @cluster_v4 counter name "leak_out" drop comment "mg:0795f279ff78"
\t}

\tchain guard_in {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname "lo" accept comment "mg:e27d29a4aaf9"
\t\tiifname "meshgress0" accept comment "mg:bb0986a37d70"
\t\tiifname "mgc*" accept comment "mg:e66f9004ce02"
\t\tiifname "mge*" accept comment "mg:0b28fe06f852"
\t\tip saddr @cluster_v4 counter name "spoof_in" drop comment "mg:0ed288a8615f"
\t}

\tchain masq {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr @cluster_v4 ip daddr != @nonmasq_v4 oifname != "meshgress0" \
oifname != "mge*" masquerade comment "mg:5c15a444b028"
\t}
}
"""


def test_apply_creates_the_table_nft_lists_and_a_reapply_changes_nothing(node: Node) -> None:
    desired = compute_ruleset(SPEC)
    assert node.nft.read() is None

    plan = node.nft.reconcile(desired)
    assert plan.create_table

    # What nft itself (another process, same namespace) lists is what was planned.
    assert nsexec(node.netns, "nft", "list", "table", "inet", "meshgress").stdout \
        == EXPECTED_LISTING
    listed = nft_json(node.netns, "list", "table", "inet", "meshgress")
    assert plan_ruleset(desired, listed).empty
    assert node.nft.read() == listed

    # Re-applying is a no-op: nothing is sent, so no handle changes.
    handles = nsexec(node.netns, "nft", "-a", "list", "table", "inet", "meshgress").stdout
    assert node.nft.reconcile(desired).empty
    assert nsexec(node.netns, "nft", "-a", "list", "table", "inet", "meshgress").stdout \
        == handles


def test_the_adapter_acts_only_in_its_own_namespace(
        node: Node, make_netns: Callable[[str], str]) -> None:
    other = make_netns("other")
    node.nft.reconcile(compute_ruleset(SPEC))
    assert nft_json(other, "list", "tables")["nftables"][1:] == []
    node.nft.delete_table()
    assert node.nft.read() is None
    node.nft.delete_table()  # idempotent
    assert node.nft.counters() == {}


def test_drift_is_repaired_without_touching_counters(node: Node) -> None:
    desired = compute_ruleset(SPEC)
    node.nft.reconcile(desired)
    counter_handles = {c["counter"]["name"]: c["counter"]["handle"] for c in nft_json(
        node.netns, "list", "counters", "table", "inet", "meshgress")["nftables"]
        if "counter" in c}
    nsexec(node.netns, "nft", "-f", "-", input_text="""
        add rule inet meshgress guard_out meta mark 0x1 accept
        add chain inet meshgress foreign { type filter hook input priority 0; }
        add rule inet meshgress foreign ip saddr @cluster_v4 drop
        add set inet meshgress junk { type ipv4_addr; }
        delete element inet meshgress nonmasq_v4 { 198.19.0.0/16 }
        add element inet meshgress cluster_v4 { 10.9.0.0/16 }
    """)
    plan = node.nft.reconcile(desired)
    assert plan.flush_chains == ("guard_out", "foreign")
    assert plan.delete_chains == ("foreign",)
    assert plan.delete_sets == (("set", "junk"),)
    assert node.nft.reconcile(desired).empty
    assert nsexec(node.netns, "nft", "list", "table", "inet", "meshgress").stdout \
        == EXPECTED_LISTING
    assert counter_handles == {c["counter"]["name"]: c["counter"]["handle"] for c in nft_json(
        node.netns, "list", "counters", "table", "inet", "meshgress")["nftables"]
        if "counter" in c}


def test_a_failed_transaction_changes_nothing_and_reports_nfts_error(node: Node) -> None:
    desired = compute_ruleset(SPEC)
    node.nft.reconcile(desired)
    before = nsexec(node.netns, "nft", "-a", "list", "table", "inet", "meshgress").stdout
    wider = compute_ruleset(WIDE)
    # The kernel refuses a nat chain on the forward hook: the element changes that come
    # before it in the same transaction must not be applied either.
    broken = Ruleset(**TABLE, sets=wider.sets, counters=wider.counters, chains=(
        *wider.chains, NftChain("bad", (Rule.of({"masquerade": None}),),
                                Hook("nat", "forward", 0))))
    with pytest.raises(NftError) as info:
        node.nft.reconcile(broken)
    assert "Operation not supported" in info.value.error
    assert info.value.commands
    assert nsexec(node.netns, "nft", "-a", "list", "table", "inet", "meshgress").stdout == before


def test_egress_shaped_sets_maps_and_chains_converge(node: Node) -> None:
    """What the egress work will add: pod sets, a destination interval set, a mark map,
    a verdict map into a regular chain, a concatenation and a mangle-priority chain."""
    base = compute_ruleset(SPEC)

    def extended(pods: tuple[str, ...], slot: int) -> Ruleset:
        return Ruleset(family=NFT_FAMILY, table=NFT_TABLE,
            sets=(*base.sets,
                  NftSet("pods_p1", "ipv4_addr",
                         elements=tuple(ipaddress.IPv4Address(p) for p in pods)),
                  NftSet("dst_p1", "ipv4_addr", ("interval",),
                         elements=(net("192.0.2.128/25"), net("192.0.2.7/32"))),
                  NftSet("pod_ports", ("ipv4_addr", "inet_service"),
                         elements=((ipaddress.IPv4Address("198.18.1.9"), 443),)),
                  NftMap("slot_marks", "mark", "mark", elements=((0, slot), (1, 0x00020000))),
                  NftMap("policies", "ipv4_addr", "verdict", elements=tuple(
                      (ipaddress.IPv4Address(p), Verdict("jump", "policy_p1")) for p in pods))),
            counters=base.counters,
            chains=(*base.chains,
                    NftChain("policy_p1", (Rule.of(
                        match(payload("ip", "daddr"), set_ref("dst_p1")),
                        {"mangle": {"key": meta("mark"), "value": {"|": [
                            {"&": [meta("mark"), 0xFF00FFFF]}, 0x00010000]}}}),)),
                    NftChain("egress_mark", hook=Hook("filter", "prerouting", -150), rules=(
                        Rule.of({"vmap": {"key": payload("ip", "saddr"),
                                          "data": set_ref("policies")}}),
                        Rule.of(match({"concat": [payload("ip", "saddr"),
                                                  payload("tcp", "dport")]},
                                      set_ref("pod_ports")),
                                {"mangle": {"key": {"ct": {"key": "mark"}},
                                            "value": {"map": {"key": meta("mark"),
                                                              "data": "@slot_marks"}}}}),
                    ))),
        )

    first = extended(("198.18.1.9", "198.18.1.10"), 0x00010000)
    node.nft.reconcile(base)
    assert node.nft.reconcile(first).add_chains
    assert plan_ruleset(first, node.nft.read()).empty

    second = extended(("198.18.1.10", "198.18.1.11"), 0x00030000)
    plan = node.nft.reconcile(second)
    assert not (plan.flush_chains or plan.add_rules or plan.add_sets or plan.delete_sets)
    assert {c.set_name for c in plan.add_elements} == {"pods_p1", "slot_marks", "policies"}
    assert plan_ruleset(second, node.nft.read()).empty

    plan = node.nft.reconcile(base)  # the verdict map goes before the chain it jumps to
    assert set(plan.delete_chains) == {"policy_p1", "egress_mark"}
    assert plan_ruleset(base, node.nft.read()).empty


def test_a_pruned_counter_goes_with_its_rule_in_one_transaction(node: Node) -> None:
    """The kernel refuses to delete a counter a rule uses; the plan flushes the chain and
    deletes the counter in one transaction, and the counters that stay keep counting."""
    base = compute_ruleset(SPEC)

    def with_counters(*names: str) -> Ruleset:
        counters = tuple(NftCounter(f"egress_policy_{n}") for n in names)
        steer = NftChain("steer", hook=Hook("filter", "prerouting", -150), rules=tuple(
            Rule.of(match(meta("mark"), i + 1), counter_ref(c.name))
            for i, c in enumerate(counters)))
        return Ruleset(**TABLE, sets=base.sets, counters=base.counters + counters,
                       chains=(*base.chains, steer), pruned_counters=("egress_policy_",))

    node.nft.reconcile(with_counters("a", "b"))
    plan = node.nft.reconcile(with_counters("b"))
    assert plan.delete_counters == ("egress_policy_a",) and "steer" in plan.flush_chains
    assert set(node.nft.counters()) == {"leak_out", "spoof_in", "egress_policy_b"}
    assert plan_ruleset(with_counters("b"), node.nft.read()).empty


def test_apply_is_fast(node: Node) -> None:
    desired = compute_ruleset(SPEC)
    started = time.perf_counter()
    node.nft.reconcile(desired)
    create = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(20):
        node.nft.reconcile(desired)
    resync = (time.perf_counter() - started) / 20
    assert create < 0.5 and resync < 0.1, (create, resync)


# --- traffic --------------------------------------------------------------------------


def test_leaks_are_dropped_counted_and_counters_survive_a_pod_cidr_change(
        underlay: Underlay) -> None:
    node = underlay.node
    node.nft.reconcile(compute_ruleset(SPEC))  # cluster 198.18.0.0/17

    ping(node.netns, "198.18.2.1", src="198.18.1.5", ok=False)  # from a pod address
    ping(node.netns, "198.18.2.1", src="192.0.2.1", ok=False)  # to a pod address
    leaked = node.nft.counters()["leak_out"]
    assert leaked[0] == 2

    plan = node.nft.reconcile(compute_ruleset(WIDE))
    assert not (plan.flush_chains or plan.add_rules or plan.add_counters or plan.add_sets)
    assert plan.add_elements and plan.delete_elements
    assert node.nft.counters()["leak_out"] == leaked

    ping(node.netns, "198.18.200.1", src="192.0.2.1", ok=False)  # only cluster since now
    assert node.nft.counters()["leak_out"][0] == 3
    assert underlay.peer_counts()["cluster_on_wire"] == 0
    ping(node.netns, "192.0.2.2")  # the underlay itself still works


def test_pod_traffic_is_masqueraded_outside_and_never_leaves_plaintext(
        underlay: Underlay, make_netns: Callable[[str], str]) -> None:
    node = underlay.node
    pod = make_netns("pod")
    underlay.add_pod(pod, "198.18.1.9")
    node.nft.reconcile(compute_ruleset(WIDE))  # the mesh peer 198.18.130.1 is a pod too

    # Outside the cluster: leaves with the node's address, and the reply comes back.
    ping(pod, "192.0.2.2")
    counts = underlay.peer_counts()
    assert counts["node_echo"] == 1
    assert counts["cluster_on_wire"] == 0

    # To a service address on the underlay: not masqueraded (it is in nonmasq_v4), so it
    # still carries the pod source, and the guard drops it. Were it masqueraded, it
    # would pass the guard and the peer would count it.
    ping(pod, "198.19.0.10", ok=False)
    assert node.nft.counters()["leak_out"][0] == 1
    # To a remote pod over the underlay (no mesh route): dropped as well.
    ping(pod, "198.18.40.1", ok=False)
    assert node.nft.counters()["leak_out"][0] == 2

    # To a remote pod over the mesh: not masqueraded, not dropped, and the reply (from a
    # pod address, arriving on the mesh) is not taken for spoofing.
    ping(pod, "198.18.130.1")
    # Through an egress tunnel: keeps the pod source (the gateway selects by it).
    ping(pod, "192.0.2.200")
    counts = underlay.peer_counts()
    assert counts["mesh_pod"] == 1
    assert counts["egress_pod"] == 1
    assert counts["cluster_on_wire"] == 0
    assert counts["node_echo"] == 1
    assert node.nft.counters()["spoof_in"][0] == 0
    assert node.nft.counters()["leak_out"][0] == 2


def test_a_forged_pod_source_from_the_underlay_is_counted_and_dropped(
        underlay: Underlay) -> None:
    node = underlay.node
    node.nft.reconcile(compute_ruleset(SPEC))
    run(["ip", "-n", underlay.peer, "addr", "add", "198.18.7.7/32", "dev", "lo"])

    ping(underlay.peer, "192.0.2.1", src="198.18.7.7", ok=False)
    assert node.nft.counters()["spoof_in"][0] == 1

    ping(underlay.peer, "192.0.2.1")  # the peer's own address is fine
    assert node.nft.counters()["spoof_in"][0] == 1
    assert node.nft.counters()["leak_out"][0] == 0


# --- behind the table: a slot's routing table ---------------------------------------------

SLOT_INTERFACE = "mge0000000a"
PROBE_SOURCE = ipaddress.IPv4Address("198.18.1.1")
# What the node's steering chain does to a pod's packet for slot 0 (nodeagent.steering),
# reduced to one destination.
MARK_FOR_SLOT_0 = f"""
table inet mgtsteer {{
    chain pre {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "mgc0test1" ip daddr 192.0.2.2 meta mark set {slot_mark(0):#x}
    }}
}}
"""


def test_once_a_slot_tunnel_vanished_its_marked_packets_are_dropped_never_masqueraded(
        underlay: Underlay, make_netns: Callable[[str], str]) -> None:
    """The slot's table as steering writes it (`NetlinkSteering`), on a real kernel and
    behind the node's table. While the tunnel lives, a marked packet leaves through it
    with the pod's source. When the tunnel vanishes its route goes with it, and the
    table's blackhole keeps the lookup from falling through to the main table, where the
    packet would be masqueraded out with the node's address."""
    node, n, peer = underlay.node, underlay.node.netns, underlay.peer
    pod = make_netns("pod")
    underlay.add_pod(pod, "198.18.1.9")
    node.nft.reconcile(compute_ruleset(WIDE))
    # The fixture's egress stand-in, renamed to a slot tunnel's name (steering's to own).
    run(["ip", "-n", n, "link", "delete", "mge0test"])
    run(["ip", "-n", n, "link", "add", SLOT_INTERFACE, "type", "veth", "peer", "name", "egw0",
         "netns", peer])
    run(["ip", "-n", n, "link", "set", SLOT_INTERFACE, "up"])
    run(["ip", "-n", peer, "link", "set", "egw0", "up"])
    run(["ip", "-n", peer, "route", "add", "198.18.1.9/32", "dev", "egw0"])
    nsexec(n, "sysctl", "-q", "-w", f"net.ipv4.conf.{SLOT_INTERFACE}.proxy_arp=1")
    nsexec(n, "nft", "-f", "-", input_text=MARK_FOR_SLOT_0)
    table = slot_table(0)
    plan = SteeringPlan(add_probe_addresses=(SLOT_INTERFACE,),
                        set_rp_filter=(SLOT_INTERFACE,),
                        add_routes=slot_table_routes(0, SLOT_INTERFACE),
                        add_rules=((slot_mark(0), table),))
    steering = node.nft.worker.call(NetlinkSteering)
    try:
        node.nft.worker.call(steering.configure, plan, PROBE_SOURCE)

        ping(pod, "192.0.2.2")  # through the slot tunnel, with the pod's source
        assert underlay.peer_counts()["egress_pod"] == 1

        run(["ip", "-n", n, "link", "delete", SLOT_INTERFACE])
        ping(pod, "192.0.2.2", ok=False)
        counts = underlay.peer_counts()
        assert counts["node_echo"] == 0, "a steered packet left with the node's address"
        assert counts["cluster_on_wire"] == 0 and counts["egress_pod"] == 1
        assert node.nft.counters()["leak_out"][0] == 0
        routes = json.loads(run(["ip", "-n", n, "-j", "route", "show", "table",
                                 str(table)]).stdout)
        assert [r.get("type") for r in routes] == ["blackhole"], routes

        # Unmarked traffic still leaves with the node's address, as it should.
        run(["ip", "-n", peer, "addr", "add", "192.0.2.3/32", "dev", "eth0"])
        ping(pod, "192.0.2.3")
        assert underlay.peer_counts()["node_echo"] == 1

        # Removing the slot takes its rule and both routes (the tunnel's is gone already).
        node.nft.worker.call(steering.remove, SteeringPlan(
            remove_rules=plan.add_rules, remove_routes=plan.add_routes))
        assert run(["ip", "-n", n, "route", "show", "table", str(table)]).stdout == ""
        assert f"lookup {table}" not in run(["ip", "-n", n, "rule", "show"]).stdout
    finally:
        node.nft.worker.call(steering.close)
