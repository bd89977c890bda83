"""The node agent's loop without root: a real file datastore and informers, every kernel
port a fake. What is checked is what makes a node fail closed — the order of start-up —
and that a pod's ADD waits for its steering."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgress.cluster import ENDPOINT_ANNOTATION, PUBLIC_KEY_ANNOTATION
from meshgress.config import ClusterConfig
from meshgress.datastore import Kind
from meshgress.datastore.file import FileDatastore
from meshgress.kernel.nft_model import parse_observed
from meshgress.kernel.nftables import FakeNftablesAdapter, NftError
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE, WIREGUARD_INTERFACE
from meshgress.slots import SlotId
from nodeagent.agent import Agent, AgentConfig, AgentPorts
from nodeagent.firewall import (
    CHAIN_GUARD_ENDPOINTS,
    CHAIN_GUARD_IN,
    CHAIN_GUARD_OUT,
    COUNTER_LEAK_OUT,
    SET_ENDPOINT_PODS,
    SET_NODES,
)
from nodeagent.firewall import SET_ENDPOINT_PORTS as SET_ENDPOINT_PORTS_NAME
from nodeagent.mesh import RouteSpec
from nodeagent.routes import FakeRoutes
from nodeagent.steering import CHAIN_STEER, LocalPod
from nodeagent.steering_kernel import FakeSteering
from wireguard.fake import FakeBackend
from wireguard.keys import generate_private_key, parse_key, public_key

CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("198.19.0.0/16"),))
FALLBACK = RouteSpec(dst=ipaddress.IPv4Network("198.18.0.0/16"), type="unreachable")
PEER_KEY = public_key(generate_private_key())


class FakeHost:
    def __init__(self) -> None:
        self.forwarding = False

    def underlay_mtu(self, address: str) -> int:
        return 1500

    def ensure_ip_forwarding(self) -> None:
        self.forwarding = True


class IdleProber:
    def __init__(self, source: str, on_change: Callable[[], None]) -> None:
        self.targets: tuple[Any, ...] = ()

    def start(self) -> IdleProber:
        return self

    def stop(self) -> None:
        pass

    def set_targets(self, targets: tuple[Any, ...]) -> None:
        self.targets = targets

    def healthy(self) -> frozenset[Any]:
        return frozenset()

    def stats(self) -> dict[Any, Any]:
        return {}


class RecordingPods:
    """A PodNetwork that notes the kernel as the fakes hold it when it starts serving."""

    def __init__(self, ports: dict[str, Any]) -> None:
        self.ports = ports
        self.at_start: dict[str, Any] | None = None
        self.serving = threading.Event()
        self.listening = threading.Event()
        """Cleared, the server stays in its start-up (replaying queued DELs) until set."""
        self.listening.set()
        self.hooks: dict[str, Callable[[LocalPod], None]] = {}

    def local_pods(self, pod_cidr: ipaddress.IPv4Network) -> list[LocalPod]:
        return []

    def serve(self, pod_cidr: ipaddress.IPv4Network, mtu: int, *, on_ready: Any,
              on_removed: Any, stop: threading.Event, on_listening: Any) -> None:
        nft, routes, wg = self.ports["nft"], self.ports["routes"], self.ports["wireguard"]
        self.at_start = {"table": nft.state, "routes": set(routes.table),
                         "device": wg.read(WIREGUARD_INTERFACE), "mtu": mtu, "cidr": pod_cidr}
        self.hooks = {"ready": on_ready, "removed": on_removed}
        self.serving.set()
        while not (self.listening.wait(0.01) or stop.is_set()):
            pass
        if not stop.is_set():
            on_listening()
        stop.wait()

    def render_metrics(self, page: Any) -> None:
        """No metrics of its own."""


def node(name: str, address: str, cidr: str, **annotations: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileDatastore]:
    store = FileDatastore(tmp_path / "store", poll_interval=0.01)
    store.create(node("node1", "192.0.2.11", "198.18.1.0/24"))
    store.create(node("node2", "192.0.2.12", "198.18.2.0/24", **{
        PUBLIC_KEY_ANNOTATION: PEER_KEY, ENDPOINT_ANNOTATION: "192.0.2.12:51820"}))
    yield store
    store.close()


def make_agent(tmp_path: Path, store: FileDatastore, nft: FakeNftablesAdapter | None = None,
               **config: Any) -> tuple[Agent, RecordingPods, dict[str, Any]]:
    wireguard = FakeBackend()
    fakes: dict[str, Any] = {"nft": nft or FakeNftablesAdapter(NFT_FAMILY, NFT_TABLE),
                             "routes": FakeRoutes(), "wireguard": wireguard,
                             "steering": FakeSteering(wireguard), "host": FakeHost()}
    pods = RecordingPods(fakes)
    settings = AgentConfig(**{"node_name": "node1", "cluster": CLUSTER,
                              "state_dir": tmp_path / "state", "metrics_address": None,
                              "retry_interval": 0.05, **config})
    agent = Agent(settings, store, AgentPorts(**fakes, pods=pods, prober=IdleProber))
    return agent, pods, fakes


def run_in_background(agent: Agent) -> threading.Thread:
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return thread


def stop(agent: Agent, thread: threading.Thread) -> None:
    agent.stop.set()
    agent.loop.poke()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_guard_fallback_and_peers_are_in_place_before_the_first_pod_is_served(tmp_path, store):
    agent, pods, fakes = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert pods.serving.wait(10), "the CNI server never started"
        seen = pods.at_start
        assert seen is not None
        table = seen["table"]
        assert table is not None and {CHAIN_GUARD_OUT, CHAIN_GUARD_IN} <= set(table.chains)
        assert COUNTER_LEAK_OUT in table.counters
        assert FALLBACK in seen["routes"]
        assert seen["device"] is not None
        assert [p.public_key for p in seen["device"].peers] == [PEER_KEY]
        assert seen["mtu"] == 1440 and str(seen["cidr"]) == "198.18.1.0/24"
        assert fakes["host"].forwarding
        # Published only once the dataplane was in place.
        deadline = time.monotonic() + 5
        while not agent.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        annotations = store.get(Kind.NODE, "node1")["metadata"]["annotations"]
        assert annotations[PUBLIC_KEY_ANNOTATION] == agent.public_key
    finally:
        stop(agent, thread)


def test_not_ready_until_the_cni_server_listens_with_queued_deletions_run(tmp_path, store):
    agent, pods, _ = make_agent(tmp_path, store)
    pods.listening.clear()
    thread = run_in_background(agent)
    try:
        assert pods.serving.wait(10), "the CNI server never started"
        deadline = time.monotonic() + 5
        while not agent.state.published and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.state.published and agent.loop.synced()
        assert not agent.ready()
        assert agent.health() == {"live": True, "ready": False}
        pods.listening.set()
        deadline = time.monotonic() + 5
        while not agent.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.ready()
    finally:
        stop(agent, thread)


def test_no_pod_is_served_while_the_guard_cannot_be_programmed(tmp_path, store):
    class BrokenNft(FakeNftablesAdapter):
        def apply(self, plan: Any) -> None:
            raise NftError("apply", 1, "Operation not supported")

    agent, pods, _ = make_agent(tmp_path, store, BrokenNft(NFT_FAMILY, NFT_TABLE))
    thread = run_in_background(agent)
    try:
        time.sleep(1.0)  # several retries
        assert not pods.serving.is_set()
        assert agent.loop.metrics.errors.get("nftables", 0) >= 2
        assert not agent.ready()
        assert PUBLIC_KEY_ANNOTATION not in (
            store.get(Kind.NODE, "node1")["metadata"].get("annotations") or {})
    finally:
        stop(agent, thread)


def test_concurrent_pod_hooks_never_trip_over_each_other(tmp_path, store):
    agent, pods, _ = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert pods.serving.wait(10)
        errors: list[BaseException] = []

        def churn(worker: int) -> None:
            try:
                for n in range(40):
                    pod = LocalPod("web", f"p{worker}-{n}",
                                   ipaddress.IPv4Address(f"198.18.1.{worker * 40 + n + 2}"))
                    pods.hooks["ready"](pod)
                    if n % 3:
                        pods.hooks["removed"](pod)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=churn, args=(w,)) for w in range(5)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
    finally:
        stop(agent, thread)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def manager_with(own: str, clock: Clock) -> tuple[Any, FakeBackend, FakeRoutes]:
    from nodeagent.managers import MeshManager

    wireguard, routes = FakeBackend(), FakeRoutes()
    return (MeshManager(wireguard, routes, resync_interval=10.0, own_public_key=own,
                        clock=clock), wireguard, routes)


def one_peer_mesh(own_private: str, peer_key: str) -> Any:
    from meshgress.cluster import parse_node
    from nodeagent.mesh import MeshInputs, compute_mesh

    return compute_mesh(MeshInputs(
        self_name="node1", private_key=own_private, mtu=1420, cluster=CLUSTER,
        nodes=(parse_node(node("node1", "192.0.2.11", "198.18.1.0/24")),
               parse_node(node("node2", "192.0.2.12", "198.18.2.0/24", **{
                   PUBLIC_KEY_ANNOTATION: peer_key,
                   ENDPOINT_ANNOTATION: "192.0.2.12:51820"})))))


def keys_in_order() -> tuple[str, str, str, str]:
    """(private, public) of the pair's initiator, then of the other side."""
    from nodeagent.mesh import is_initiator

    a, b = generate_private_key(), generate_private_key()
    if not is_initiator(public_key(a), public_key(b)):
        a, b = b, a
    return a, public_key(a), b, public_key(b)


def test_the_lower_key_kicks_the_handshake_in_the_pass_that_adds_the_peer():
    low_private, low, _, high = keys_in_order()
    clock = Clock()
    manager, wireguard, routes = manager_with(low, clock)
    mesh = one_peer_mesh(low_private, high)
    manager.apply_device(mesh.device)
    assert manager.kick_handshakes("meshgress0") and wireguard.kicks == [("meshgress0", (high,))]
    manager.apply_routes(manager.routes(mesh))
    assert RouteSpec(ipaddress.IPv4Network("198.18.2.0/24"), oif="meshgress0") in routes.table
    # Nothing more to do: no second kick, no timer.
    assert manager.kick_handshakes("meshgress0") == [] and manager.resync_in() > 5


def test_the_higher_key_holds_its_routes_back_then_kicks_once_when_the_grace_ends():
    _, low, high_private, high = keys_in_order()
    clock = Clock()
    manager, wireguard, routes = manager_with(high, clock)
    mesh = one_peer_mesh(high_private, low)
    manager.apply_device(mesh.device)
    assert manager.kick_handshakes("meshgress0") == [] and wireguard.kicks == []
    manager.apply_routes(manager.routes(mesh))
    held = RouteSpec(ipaddress.IPv4Network("198.18.2.0/24"), type="blackhole")
    assert held in routes.table and FALLBACK in routes.table
    assert 0.3 <= manager.resync_in() <= 0.4  # the loop wakes when the grace ends
    clock.now += 0.45
    manager.apply_device(mesh.device)
    assert manager.kick_handshakes("meshgress0") and wireguard.kicks == [("meshgress0", (low,))]
    manager.apply_routes(manager.routes(mesh))
    assert RouteSpec(ipaddress.IPv4Network("198.18.2.0/24"), oif="meshgress0") in routes.table
    assert held not in routes.table


def test_a_grace_that_ends_while_the_pass_runs_on_brings_the_next_pass_at_once():
    """A joining node waits out one grace per existing node whose key is lower. When the
    second grace ends after the kick step looked but before the pass asks when to wake,
    the pass must ask for another at once: waiting for the next resync held that peer's
    routes back as blackholes for seconds (the join stall the graces exist to prevent)."""
    from meshgress.cluster import parse_node
    from nodeagent.mesh import MeshInputs, compute_mesh

    while True:  # three keys; this node's is the highest, so both peers are pending
        *lower, private = sorted((generate_private_key() for _ in range(3)),
                                 key=lambda k: parse_key(public_key(k)))
        clock = Clock()
        manager, wireguard, _ = manager_with(public_key(private), clock)
        mesh = compute_mesh(MeshInputs(
            self_name="node1", private_key=private, mtu=1420, cluster=CLUSTER,
            nodes=(parse_node(node("node1", "192.0.2.11", "198.18.1.0/24")),
                   *(parse_node(node(f"node{n}", f"192.0.2.1{n}", f"198.18.{n}.0/24", **{
                       PUBLIC_KEY_ANNOTATION: public_key(k),
                       ENDPOINT_ANNOTATION: f"192.0.2.1{n}:51820"}))
                     for n, k in ((2, lower[0]), (3, lower[1]))))))
        manager.apply_device(mesh.device)
        manager.apply_routes(manager.routes(mesh))
        first, second = sorted(manager.pending.values())
        if first < second:  # equal jitter, about 1 draw in 65,536: draw again
            break
    clock.now = first
    assert len(manager.kick_handshakes("meshgress0")) == 1
    clock.now = second + 0.01  # the rest of the pass took a while
    assert manager.resync_in() == 0.0
    assert len(manager.kick_handshakes("meshgress0")) == 1 and manager.pending == {}
    assert manager.resync_in() > 5
    assert len(wireguard.kicks) == 2


def test_a_failed_kick_of_an_ended_grace_does_not_spin_the_loop():
    _, low, high_private, high = keys_in_order()
    clock = Clock()
    manager, wireguard, _ = manager_with(high, clock)
    mesh = one_peer_mesh(high_private, low)
    manager.apply_device(mesh.device)
    manager.apply_routes(manager.routes(mesh))
    clock.now += 0.45

    def refuse(*_args: Any) -> None:
        raise OSError("the UAPI socket is gone")

    wireguard.kick = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError):
        manager.kick_handshakes("meshgress0")
    assert manager.pending and manager.resync_in() > 5  # the failed step brings the retry


def test_a_peer_added_by_an_apply_that_then_failed_still_gets_its_handshake():
    """The backend added the peer, then failed (a UAPI error further on): the next pass
    finds the peer on the device, so only what was planned before says it is new."""
    from wireguard.errors import UapiError

    low_private, low, _, high = keys_in_order()
    clock = Clock()
    manager, wireguard, _ = manager_with(low, clock)
    mesh = one_peer_mesh(low_private, high)

    def add_then_fail(plan: Any) -> None:
        FakeBackend.apply(wireguard, plan)
        raise UapiError("meshgress0", "set", 5, "I/O error after the peers")

    wireguard.apply = add_then_fail  # type: ignore[method-assign]
    with pytest.raises(UapiError):
        manager.apply_device(mesh.device)
    del wireguard.apply
    manager.apply_device(mesh.device)
    assert manager.kick_handshakes("meshgress0") and wireguard.kicks == [("meshgress0", (high,))]


def test_peers_found_on_the_device_after_a_restart_are_routed_and_never_kicked():
    _, low, high_private, high = keys_in_order()
    clock = Clock()
    mesh = one_peer_mesh(high_private, low)
    before, wireguard, _ = manager_with(high, clock)
    before.apply_device(mesh.device)
    after, _, _ = manager_with(high, clock)
    after._wireguard = wireguard  # the same device, a new agent
    after.apply_device(mesh.device)
    assert after.pending == {} and after.kick_handshakes("meshgress0") == []
    assert RouteSpec(ipaddress.IPv4Network("198.18.2.0/24"), oif="meshgress0") in \
        after.routes(mesh)


def wait_ready(agent: Agent, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.ready():
            return True
        time.sleep(0.02)
    return False


def test_a_restarted_agent_becomes_ready_with_unreadable_objects_in_the_store(tmp_path, store):
    agent, _, _ = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent)
    finally:
        stop(agent, thread)
    # Garbage lands in the store while the agent is away: a policy and a pod file.
    objects = store.root / "objects"
    (objects / "EgressPolicy").mkdir(parents=True)
    (objects / "EgressPolicy" / "typo.yaml").write_bytes(b"spec: {gateway: [unclosed\n")
    (objects / "Pod" / "web").mkdir(parents=True)
    (objects / "Pod" / "web" / "half.yaml").write_bytes(b"\x00\x01")
    agent, pods, _ = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent), "one unreadable object kept the agent from becoming ready"
        assert pods.serving.is_set()  # so CNI ADDs on this node are served
        assert sorted((r.kind, r.name) for r in agent.loop.rejected()) == [
            (Kind.EGRESS_POLICY, "typo"), (Kind.POD, "half")]
    finally:
        stop(agent, thread)


def egress_objects(policy_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "payments", "labels": {"team": "payments"}}},
            {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
             "metadata": {"name": "egress"}, "spec": {"egressIPs": ["192.0.2.201"]}},
            {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
             "metadata": {"name": "payments"}, "spec": policy_spec}]


VALID_POLICY = {"gateway": "egress", "namespaceSelector": {"matchLabels": {"team": "payments"}}}
TYPO_POLICY = {**VALID_POLICY, "destinationCIDRs": ["0.0.0.0/0", "10.0.0.0/33"]}


@pytest.mark.parametrize(("recorded", "steered"), [
    (None, False),
    ({"observedGeneration": 1, "acceptedSpec": VALID_POLICY}, True),
], ids=["never-recorded-valid", "last-valid-generation-recorded"])
def test_a_starting_agent_steers_by_the_last_valid_generation_of_an_invalid_policy(
        tmp_path, store, recorded, steered):
    for obj in egress_objects(VALID_POLICY):
        store.apply(obj)
    if recorded is not None:  # what a gateway wrote for generation 1
        store.patch_status(Kind.EGRESS_POLICY, "payments", recorded)
    store.apply(egress_objects(TYPO_POLICY)[2])  # generation 2, with a typo
    assert store.get(Kind.EGRESS_POLICY, "payments")["metadata"]["generation"] == 2
    agent, pods, _ = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent)
        pod = LocalPod("payments", "app", ipaddress.IPv4Address("198.18.1.9"))
        pods.hooks["ready"](pod)
        assert agent.state.steering is not None
        assert (pod.ip in agent.state.steering.steered_ips) is steered
    finally:
        stop(agent, thread)


def test_a_restart_never_takes_the_steering_it_finds_out_of_the_table(tmp_path, store):
    """The previous run's egress steering stays in the table until this run's replaces it
    in one transaction: in between, new flows of selected pods would leave unsteered,
    with the node's address."""
    for obj in egress_objects(VALID_POLICY):
        store.apply(obj)
    agent, pods, fakes = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent)
        pods.hooks["ready"](LocalPod("payments", "app", ipaddress.IPv4Address("198.18.1.9")))
    finally:
        stop(agent, thread)
    nft = fakes["nft"]
    assert nft.state is not None and CHAIN_STEER in nft.state.chains
    applied_before = len(nft.applied)
    agent, pods, _ = make_agent(tmp_path, store, nft)
    pods.local_pods = lambda cidr: [  # type: ignore[method-assign]
        LocalPod("payments", "app", ipaddress.IPv4Address("198.18.1.9"))]
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent)
        restarted = nft.applied[applied_before:]
        assert not [plan for plan in restarted if CHAIN_STEER in plan.delete_chains
                    or CHAIN_STEER in plan.flush_chains]
        assert CHAIN_STEER in nft.state.chains
    finally:
        stop(agent, thread)


def set_addresses(nft: FakeNftablesAdapter, name: str) -> set[ipaddress.IPv4Address]:
    """Every address a set of the fake table covers."""
    table = parse_observed(nft.read(), NFT_FAMILY, NFT_TABLE)
    assert table is not None
    covered: set[ipaddress.IPv4Address] = set()
    for element in (json.loads(e) for e in table.sets[name].elements):
        if isinstance(element, dict):
            net = ipaddress.IPv4Network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
            covered |= set(net)
        else:
            covered.add(ipaddress.IPv4Address(element))
    return covered


def test_the_endpoint_guard_follows_the_nodes_and_the_allowed_pods(tmp_path, store):
    """Every node's address (to keep pods away from theirs too, and to let them scrape)
    and this node's pods of the allowed namespaces are in the table, as they come."""
    agent, pods, fakes = make_agent(tmp_path, store, metrics_allow_namespaces=("monitoring",),
                                    endpoint_ports=(9820, 9821, 9900))
    nft = fakes["nft"]
    thread = run_in_background(agent)
    try:
        assert pods.serving.wait(10)
        a = ipaddress.IPv4Address
        pods.hooks["ready"](LocalPod("monitoring", "prometheus-0", a("198.18.1.9")))
        pods.hooks["ready"](LocalPod("web", "app", a("198.18.1.10")))
        store.create(node("node3", "192.0.2.13", "198.18.3.0/24"))
        want_nodes = {a("192.0.2.11"), a("192.0.2.12"), a("192.0.2.13")}
        deadline = time.monotonic() + 5
        while (set_addresses(nft, SET_NODES) != want_nodes
               or set_addresses(nft, SET_ENDPOINT_PODS) != {a("198.18.1.9")}):
            assert time.monotonic() < deadline, (set_addresses(nft, SET_NODES),
                                                 set_addresses(nft, SET_ENDPOINT_PODS))
            time.sleep(0.02)
        table = parse_observed(nft.read(), NFT_FAMILY, NFT_TABLE)
        assert table is not None and CHAIN_GUARD_ENDPOINTS in table.chains
        ports = {json.loads(e) for e in table.sets[SET_ENDPOINT_PORTS_NAME].elements}
        assert ports == {9820, 9821, 9900}
        pods.hooks["removed"](LocalPod("monitoring", "prometheus-0", a("198.18.1.9")))
        deadline = time.monotonic() + 5
        while set_addresses(nft, SET_ENDPOINT_PODS):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        stop(agent, thread)


def test_the_agent_guards_its_own_metrics_ports_too():
    config = AgentConfig(node_name="n", metrics_address="127.0.0.1:9900,node-ip:9901")
    assert config.guarded_ports == (9820, 9821, 9900, 9901)
    assert AgentConfig(node_name="n", endpoint_ports=()).guarded_ports == ()  # no guard


def gateway_with(name: str, count: int, prefix: str) -> dict[str, Any]:
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name},
            "spec": {"egressIPs": [f"{prefix}.{i}" for i in range(1, count + 1)]}}


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_more_egress_ips_than_slots_in_the_cluster_stop_nothing(tmp_path, store):
    """Two valid gateways of 64 egress IPs (each within the API's 126): 128 slots were an
    error on every pass, so the node never got its mesh, routes or CNI server. The 126
    slots go to the gateway created first, then to the other's first 62."""
    store.create(gateway_with("egress-a", 64, "10.1.0"))  # the older (or, same second, by name)
    store.create(gateway_with("egress-b", 64, "10.2.0"))
    agent, pods, fakes = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent), "the agent never became ready"
        assert pods.serving.is_set()
        device = fakes["wireguard"].read(WIREGUARD_INTERFACE)
        assert device is not None and [p.public_key for p in device.peers] == [PEER_KEY]
        annotations = store.get(Kind.NODE, "node1")["metadata"]["annotations"]
        assert annotations[PUBLIC_KEY_ANNOTATION] == agent.public_key
        slots = {SlotId("egress-a", i) for i in range(64)} | {
            SlotId("egress-b", i) for i in range(62)}
        assert agent.state.steering is not None and set(agent.state.steering.numbers) == slots
        assert fakes["steering"].interfaces == {s.node_interface for s in slots}
        assert agent.state.over_slot_limit == {"egress-b": ("10.2.0.63", "10.2.0.64")}
        # A pod's ADD goes through (it failed too).
        pods.hooks["ready"](LocalPod("web", "app", ipaddress.IPv4Address("198.18.1.9")))
    finally:
        stop(agent, thread)


def test_steering_that_cannot_be_computed_holds_up_nothing_else(tmp_path, store, monkeypatch):
    """A bug in the steering computation fails its step (retried), not the node: the mesh,
    routes, publishing and the CNI server go ahead; pods' ADDs fail meanwhile (none may
    leave unsteered), and the agent is not ready (a rollout stops at this node)."""
    def broken(inputs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("nodeagent.agent.compute_steering", broken)
    agent, pods, fakes = make_agent(tmp_path, store)
    thread = run_in_background(agent)
    try:
        assert wait_for(lambda: agent.state.published and agent.cni_ready.is_set())
        assert not agent.ready() and agent.state.steering is None
        assert FALLBACK in fakes["routes"].table
        device = fakes["wireguard"].read(WIREGUARD_INTERFACE)
        assert device is not None and [p.public_key for p in device.peers] == [PEER_KEY]
        assert wait_for(lambda: agent.loop.metrics.errors.get("steering", 0) >= 2), \
            "the failed step is not retried"
        with pytest.raises(RuntimeError, match="not computed yet"):
            pods.hooks["ready"](LocalPod("web", "app", ipaddress.IPv4Address("198.18.1.9")))
    finally:
        stop(agent, thread)


def test_a_mesh_device_that_keeps_failing_is_retried_with_backoff_not_at_once(
        tmp_path, store):
    """A failed apply leaves its view unread; that must not ask for the next pass at once
    (it spun at 100 % of a core while the device kept failing)."""
    from wireguard.errors import UapiError

    agent, _, fakes = make_agent(tmp_path, store, retry_interval=0.05, resync_interval=10.0)

    def failing(plan: Any) -> None:
        raise UapiError(plan.name, "set", 5, "I/O error")

    fakes["wireguard"].apply = failing
    thread = run_in_background(agent)
    try:
        assert wait_for(lambda: agent.loop.metrics.failures >= 2)
        first = agent.loop.metrics.reconciles
        time.sleep(1.0)
        # Backoff from 0.05 s doubling: a handful of passes in a second, not thousands.
        assert agent.loop.metrics.reconciles - first <= 8
    finally:
        stop(agent, thread)


def test_no_pass_runs_before_the_pods_wired_earlier_are_known(tmp_path, store):
    """A restarted agent whose pods cannot be read yet must not apply a ruleset without
    them: their steering would be gone, and a FailClosed pod would leave with the node's
    address."""
    readable = threading.Event()
    agent, pods, fakes = make_agent(tmp_path, store)

    def local_pods(pod_cidr: ipaddress.IPv4Network) -> list[LocalPod]:
        if not readable.is_set():
            raise OSError(24, "Too many open files")
        return []

    pods.local_pods = local_pods  # type: ignore[method-assign]
    thread = run_in_background(agent)
    try:
        assert wait_for(lambda: agent.loop.metrics.errors.get("before-pass", 0) >= 2)
        assert fakes["nft"].state is None and fakes["routes"].table == set()
        assert not agent.ready() and agent.prober is None
        readable.set()
        assert wait_ready(agent), "the agent never became ready"
    finally:
        stop(agent, thread)


def test_a_failure_before_the_pass_is_retried_and_never_ends_the_loop(tmp_path, store):
    calls: list[str] = []

    def flaky_prober(source: str, on_change: Callable[[], None]) -> IdleProber:
        calls.append(source)
        if len(calls) == 1:
            raise OSError("cannot open the probe socket")
        return IdleProber(source, on_change)

    agent, _, _ = make_agent(tmp_path, store)
    agent.ports.prober = flaky_prober  # type: ignore[assignment]
    thread = run_in_background(agent)
    try:
        assert wait_ready(agent), "the agent never became ready"
        assert wait_for(lambda: agent.prober is not None), "never tried again"
        assert thread.is_alive() and not agent.stop.is_set()
        assert agent.loop.metrics.errors.get("before-pass") == 1
    finally:
        stop(agent, thread)
