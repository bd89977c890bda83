"""The gateway's control loop (`gateway.process.Gateway`) without root: a real file
datastore and informers, fake kernel, nftables and WireGuard, and a clock the test moves.

What is checked here is the logic between the pure parts: claiming and renewing leases,
fencing (the IP goes first, at once), publishing (and publishing again whatever cleared
it), drain, two gateways sharing slots, and how soon a pass with a failure is followed by
another.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.dataplane import EgressAddress, FakeKernel, KernelError
from gateway.probe import ProbeSocket
from gateway.process import Gateway, GatewayConfig, GatewayPorts
from gateway.uplink import UplinkWatcher
from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    SLOT_LEASE_ANNOTATIONS,
)
from meshgress.config import ClusterConfig
from meshgress.datastore import LEASE_NAMESPACE, DatastoreError, Kind, Unavailable
from meshgress.datastore.file import FileDatastore
from meshgress.kernel.nftables import FakeNftablesAdapter, NftError
from meshgress.kernel_ids import GATEWAY_NFT_TABLE as NFT_TABLE
from meshgress.slots import SlotId
from wireguard.fake import FakeBackend
from wireguard.keys import generate_private_key, public_key
from wireguard.plan import DevicePlan

CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("10.96.0.0/12"),))
SLOT0, SLOT1 = SlotId("egw", 0), SlotId("egw", 1)
E0, E1 = ipaddress.IPv4Address("192.0.2.50"), ipaddress.IPv4Address("192.0.2.51")
NODE_KEY = public_key(generate_private_key())


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class LinkedBackend(FakeBackend):
    """A fake WireGuard backend whose interfaces appear as links in the fake kernel."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__()
        self.kernel = kernel

    def apply(self, plan: DevicePlan) -> None:
        super().apply(plan)
        self.kernel.links.setdefault(plan.name, (1440, b""))

    def delete(self, name: str) -> None:
        super().delete(name)
        self.kernel.delete_link(name)


class FakeProbe:
    def __init__(self) -> None:
        self.serving: dict[str, ProbeSocket] = {}

    def ensure(self, wanted: dict[str, ProbeSocket]) -> None:
        self.serving = dict(wanted)

    def close(self) -> None:
        self.serving = {}


class FlakyStore:
    """Delegates to a store; `fail` makes lease calls raise a transient error."""

    def __init__(self, store: FileDatastore) -> None:
        self._store = store
        self.fail = False

    def acquire_lease(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise DatastoreError("the datastore is unreachable")
        return self._store.acquire_lease(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def objects(ips: list[str], interface: str | None = None) -> list[dict[str, Any]]:
    def node(name: str, address: str, **extra: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, **extra.pop("meta", {})},
                "spec": extra.pop("spec", {}),
                "status": {"addresses": [{"type": "InternalIP", "address": address}]}}

    gateway_labels = {"labels": {"meshgress.io/gateway": "true"}}
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "ns-a", "labels": {"team": "a"}}},
        node("n1", "192.0.2.1", spec={"podCIDRs": ["198.18.1.0/24"]},
             meta={"annotations": {PUBLIC_KEY_ANNOTATION: NODE_KEY}}),
        node("gw1", "192.0.2.11", meta=gateway_labels),
        node("gw2", "192.0.2.12", meta=gateway_labels),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": "ns-a"},
         "spec": {"nodeName": "n1"}, "status": {"podIP": "198.18.1.10"}},
        {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
         "metadata": {"name": "egw"},
         "spec": {"egressIPs": ips, **({"interface": interface} if interface else {})}},
        {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
         "metadata": {"name": "team-a"},
         "spec": {"gateway": "egw", "namespaceSelector": {"matchLabels": {"team": "a"}}}},
    ]


class Harness:
    def __init__(self, root: Path, clock: Clock, ips: list[str],
                 interface: str | None = None) -> None:
        self.root = root
        self.clock = clock
        self.store = FileDatastore(root / "store", poll_interval=0.01, clock=clock)
        for obj in objects(ips, interface):
            self.store.create(obj)
        self.gateways: list[Gateway] = []

    def gateway(self, node: str = "gw1", *, store: Any = None, max_slots: int = 1,
                identity: str | None = None, uplink_watch: Any = None,
                start_informers: bool = True, **config: Any) -> Gateway:
        """A gateway on fakes; its informers started (unless the test runs its loop)."""
        kernel = FakeKernel({"eth0": (1500, bytes.fromhex("020000000001"))})
        garps: list[tuple[str, bytes, ipaddress.IPv4Address]] = []
        gw = Gateway(GatewayConfig(node_name=node, cluster=CLUSTER,
                                   state_dir=self.root / f"{node}-state",
                                   max_slots=max_slots,
                                   identity=identity or f"{node}/{len(self.gateways)}",
                                   **config),
                     store or self.store,
                     GatewayPorts(kernel=kernel, wireguard=LinkedBackend(kernel),
                                  nft=FakeNftablesAdapter("inet", NFT_TABLE),
                                  probe=FakeProbe(),  # type: ignore[arg-type]
                                  garp=lambda *args: garps.append(args),
                                  uplink_watch=uplink_watch),
                     clock=self.clock)
        gw.garps = garps  # type: ignore[attr-defined]
        if not start_informers:
            return gw  # its own loop starts and stops them
        for informer in gw.loop.informers.values():
            informer.start()
        assert all(i.synced.wait(5) for i in gw.loop.informers.values())
        self.gateways.append(gw)
        return gw

    def settle(self, *gateways: Gateway, passes: int = 2) -> None:
        """A few passes, letting the informers catch up with each pass's writes."""
        for _ in range(passes):
            for gw in gateways:
                gw.reconcile()
            time.sleep(0.05)

    def annotations(self, slot: SlotId) -> dict[str, str]:
        obj = self.store.get(Kind.LEASE, slot.lease_name, LEASE_NAMESPACE)
        return dict((obj.get("metadata") or {}).get("annotations") or {})

    def holder(self, slot: SlotId) -> str | None:
        lease = self.store.get_lease(slot.lease_name)
        return None if lease is None or lease.expired(self.clock()) else lease.holder

    def close(self) -> None:
        for gw in self.gateways:
            for informer in gw.loop.informers.values():
                informer.stop()
        self.store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lab(tmp_path: Path, clock: Clock):
    made: list[Harness] = []

    def make(ips: list[str], interface: str | None = None) -> Harness:
        h = Harness(tmp_path, clock, ips, interface)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def kernel(gw: Gateway) -> FakeKernel:
    assert isinstance(gw.kernel, FakeKernel)
    return gw.kernel


def test_claims_serves_and_publishes_a_slot(lab):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0"
    k = kernel(gw)
    assert k.egress == {EgressAddress("eth0", E0): 2}  # a lifetime shorter than the lease
    assert gw.garps == [("eth0", bytes.fromhex("020000000001"), E0)]  # once, when it came up
    iface = SLOT0.gateway_interface
    assert iface in k.links and k.rp == {iface: 2}
    assert {(r.table, r.interface) for r in k.routes} == {(52076, iface)}
    assert {(r.mark, r.table) for r in k.rules} == {(0x800000, 52076)}
    device = gw.ports.wireguard.read(iface)
    assert device is not None and device.listen_port == 51900
    assert [p.public_key for p in device.peers] == [NODE_KEY]
    assert gw.ports.probe.serving == {  # type: ignore[union-attr]
        iface: ProbeSocket(k.link_index(iface) or 0, 0x800000, E0)}
    assert h.annotations(SLOT0) | {} == {
        **h.annotations(SLOT0),
        PUBLIC_KEY_ANNOTATION: gw.public_key, ENDPOINT_ANNOTATION: "192.0.2.11:51900",
        EGRESS_IP_ANNOTATION: "192.0.2.50", HOLDER_NODE_ANNOTATION: "gw1"}
    nft = gw.ports.nft
    assert isinstance(nft, FakeNftablesAdapter) and nft.state is not None
    assert "src_" + iface[4:] in nft.state.sets
    status = h.store.get(Kind.EGRESS_GATEWAY, "egw")["status"]
    assert status["conditions"][0]["status"] == "True"
    assert status["slots"][0]["holder"] == "gw1/0" and status["slots"][0]["ready"]
    assert gw.health()["ready"] is True  # a pass succeeded and every held slot is ready
    # Nothing changes on further passes: no new GARP, no kernel write at all (the IP's
    # lifetime is refreshed by renewals only, never shortened by a pass).
    log_len = len(k.log)
    h.settle(gw)
    assert len(gw.garps) == 1
    assert k.log[log_len:] == []


def test_a_slot_whose_nftables_rules_failed_is_not_published_until_they_apply(lab):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    nft = gw.ports.nft
    assert isinstance(nft, FakeNftablesAdapter)
    nft.fail_next = NftError("apply", 1, "Could not process rule: No buffer space")
    gw.reconcile()
    assert h.holder(SLOT0) == "gw1/0"  # held, its IP up: a standby gains nothing
    assert gw.held()[SLOT0].ready is False and gw.health()["ready"] is False
    assert PUBLIC_KEY_ANNOTATION not in h.annotations(SLOT0)  # no node sends to it yet
    h.settle(gw)
    assert gw.held()[SLOT0].ready and h.annotations(SLOT0)[PUBLIC_KEY_ANNOTATION] == \
        gw.public_key


def test_renewal_refreshes_the_ip_lifetime(lab, clock):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    k = kernel(gw)
    k.log.clear()
    clock.now += 1.0
    assert gw.leases.renew(SLOT0)
    assert k.log == ["+ip 192.0.2.50 2"]
    assert gw.held()[SLOT0].valid_until == pytest.approx(clock.now + 3.0)


def test_a_renewal_refused_fences_the_slot_at_once(lab, clock):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    # Someone else holds the lease now (as after a partition longer than the lease).
    h.store.release_lease(SLOT0.lease_name, "gw1/0")
    h.store.acquire_lease(SLOT0.lease_name, "thief", 3.0)
    k = kernel(gw)
    assert gw.leases.renew(SLOT0)
    assert k.egress == {}, "the IP must go the moment the lease is lost"
    assert SLOT0 not in gw.held() and gw.leases.metrics.fenced == 1
    # The next pass tears the rest down; the interface itself stays while the process is
    # young (a restart that regains the slot keeps the nodes' sessions).
    clock.now += 0.5
    h.settle(gw)
    assert k.routes == set() and k.rules == set() and k.egress == {}
    assert SLOT0.gateway_interface in k.links
    assert gw.ports.probe.serving == {}  # type: ignore[union-attr]
    # The thief never renews: once its lease expired the slot is claimed again.
    clock.now += 30
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in k.egress


def test_renewals_failing_until_the_lease_would_expire_fence_the_slot(lab, clock):
    h = lab(["192.0.2.50"])
    flaky = FlakyStore(h.store)
    gw = h.gateway(store=flaky)
    h.settle(gw)
    k = kernel(gw)
    flaky.fail = True
    clock.now += 1.0
    assert not gw.leases.renew(SLOT0)  # transient: retried, the IP stays
    assert EgressAddress("eth0", E0) in k.egress and gw.leases.metrics.renew_failures == 1
    clock.now += 1.6  # 2.6 s after the last renewal: within FENCE_MARGIN of expiry
    gw.leases.renew(SLOT0)
    assert k.egress == {} and SLOT0 not in gw.held()


def test_the_ip_is_not_brought_up_when_the_lease_is_about_to_expire(lab, clock):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    k = kernel(gw)
    k.egress.clear()  # as if the kernel removed it (lifetime ran out)
    gw.leases._held[SLOT0].valid_until = clock.now + 1.2  # renewals are overdue
    gw.reconcile()
    assert k.egress == {}


class WatchingStore(FlakyStore):
    """Records what the fake kernel held at the moment each lease was released."""

    def __init__(self, store: FileDatastore) -> None:
        super().__init__(store)
        self.kernel: FakeKernel | None = None
        self.at_release: list[dict[EgressAddress, int]] = []

    def release_lease(self, name: str, holder: str, **kwargs: Any) -> bool:
        assert self.kernel is not None
        self.at_release.append(dict(self.kernel.egress))
        return self._store.release_lease(name, holder, **kwargs)


def test_drain_releases_right_after_removing_the_ip_and_leaves_nothing(lab):
    h = lab(["192.0.2.50"])
    store = WatchingStore(h.store)
    gw = h.gateway(store=store)
    k = store.kernel = kernel(gw)
    h.settle(gw)
    gw.drain()
    assert store.at_release == [{}], "the IP must be gone before the lease is released"
    lease = h.store.get_lease(SLOT0.lease_name)
    assert lease is not None and lease.holder is None
    assert not {EGRESS_IP_ANNOTATION, PUBLIC_KEY_ANNOTATION, ENDPOINT_ANNOTATION,
                HOLDER_NODE_ANNOTATION} & set(h.annotations(SLOT0))
    assert k.egress == {} and k.routes == set() and k.rules == set()
    assert [n for n in k.links if n.startswith("mgeg")] == []
    assert gw.ports.nft.state is None  # type: ignore[union-attr]
    assert gw.ports.probe.serving == {}  # type: ignore[union-attr]


def test_a_release_after_the_lease_passed_on_says_so_and_writes_nothing(lab, caplog):
    """A release that finds its lease taken by another holder (after it expired) is not
    reported, logged or counted as a release, and leaves the new holder's lease alone."""
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    h.store.release_lease(SLOT0.lease_name, "gw1/0")
    taken = h.store.acquire_lease(SLOT0.lease_name, "thief", 3.0)
    caplog.set_level("INFO", logger="meshgress.gateway")
    assert gw.leases.release(SLOT0, "draining")
    assert h.store.get_lease(SLOT0.lease_name) == taken
    assert gw.leases.metrics.releases == 0 and SLOT0 not in gw.held()
    assert kernel(gw).egress == {}
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "slot released" in m]
    assert [m for m in messages if "already passed to another holder" in m]


def test_two_gateways_end_with_one_slot_each(lab):
    h = lab(["192.0.2.50", "192.0.2.51"])
    a, b = h.gateway("gw1"), h.gateway("gw2")
    h.settle(a, b, passes=3)
    holders = {h.holder(SLOT0), h.holder(SLOT1)}
    assert holders == {"gw1/0", "gw2/1"}
    assert len(kernel(a).egress) == len(kernel(b).egress) == 1
    assert set(kernel(a).egress) != set(kernel(b).egress)


def test_a_full_gateway_takes_an_orphaned_slot_after_the_grace(lab, clock):
    h = lab(["192.0.2.50", "192.0.2.51"])
    gw = h.gateway()
    h.settle(gw)
    assert len(gw.held()) == 1
    clock.now += 2.0
    h.settle(gw)
    assert len(gw.held()) == 1  # starting up: another gateway may be starting too
    clock.now += 1.2  # past the startup grace; the slot has been free for long
    h.settle(gw)
    assert set(gw.held()) == {SLOT0, SLOT1}
    assert {a.ip for a in kernel(gw).egress} == {E0, E1}


def test_a_node_the_gateway_does_not_select_claims_nothing(lab):
    h = lab(["192.0.2.50"])
    h.store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                   "metadata": {"name": "egw"},
                   "spec": {"egressIPs": ["192.0.2.50"],
                            "nodeSelector": {"matchLabels": {"zone": "eu"}}}})
    gw = h.gateway()
    h.settle(gw)
    assert gw.held() == {} and h.holder(SLOT0) is None
    status = h.store.get(Kind.EGRESS_GATEWAY, "egw")["status"]
    assert status["conditions"][0]["reason"] == "SlotsNotReady"


def test_a_gateway_removed_from_the_spec_releases_its_slot(lab):
    h = lab(["192.0.2.50", "192.0.2.51"])
    gw = h.gateway(max_slots=2)
    h.settle(gw)
    assert set(gw.held()) == {SLOT0, SLOT1}
    h.store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                   "metadata": {"name": "egw"}, "spec": {"egressIPs": ["192.0.2.50"]}})
    time.sleep(0.1)
    h.settle(gw)
    assert set(gw.held()) == {SLOT0}
    assert {a.ip for a in kernel(gw).egress} == {E0}
    lease = h.store.get_lease(SLOT1.lease_name)
    assert lease is not None and lease.holder is None


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"])
            for c in (obj.get("status") or {}).get("conditions") or []}


def events(h: Harness, reason: str) -> list[dict[str, Any]]:
    return [e for e in h.store.list(Kind.EVENT).items if e["reason"] == reason]


def test_an_invalid_gateway_spec_keeps_its_slots_served_even_across_a_restart(lab, clock):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0"
    h.store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                   "metadata": {"name": "egw"},
                   "spec": {"egressIPs": ["192.0.2.50", "192.0.2.300"]}})
    time.sleep(0.1)
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in kernel(gw).egress
    stored = h.store.get(Kind.EGRESS_GATEWAY, "egw")
    invalid = ('generation 2 is invalid: spec.egressIPs[1]: "192.0.2.300" is not an IP '
               "address; generation 1, the last valid one, still applies")
    assert conditions(stored)["InvalidSpec"] == ("True", "Invalid", invalid)
    assert stored["status"]["observedGeneration"] == 1
    assert stored["status"]["acceptedSpec"] == {"egressIPs": ["192.0.2.50"]}
    [event] = events(h, "InvalidSpec")
    assert (event["type"], event["note"], event["regarding"]["name"]) == (
        "Warning", invalid, "egw")
    assert event["regarding"]["uid"] == stored["metadata"]["uid"]
    # The gateway crashes; a new process (which never saw a valid spec itself) takes the
    # slot over once the lease expires, and serves the last valid generation.
    for informer in gw.loop.informers.values():
        informer.stop()
    clock.now += 30
    again = h.gateway("gw2")
    h.settle(again)
    assert h.holder(SLOT0) == "gw2/1" and EgressAddress("eth0", E0) in kernel(again).egress
    [takeover] = events(h, "SlotTakenOver")
    assert takeover["type"] == "Normal" and takeover["reportingInstance"] == "gw2/1"
    assert takeover["note"] == ("egress IP 192.0.2.50 (slot 0) taken over by gw2/1 on node "
                                "gw2: the lease of gw1/0 had expired")
    assert len(events(h, "InvalidSpec")) == 1  # the status was written once: one Event


def test_a_newcomer_listing_a_served_ip_never_takes_it(lab, clock):
    h = lab(["192.0.2.50"])
    gw1, gw2 = h.gateway("gw1"), h.gateway("gw2")
    h.settle(gw1, gw2)
    assert h.holder(SLOT0) == "gw1/0"
    clock.now += 2  # creationTimestamps have whole seconds
    # Named to sort first, so only its age can make it lose.
    h.store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                    "metadata": {"name": "aa-new"},
                    "spec": {"egressIPs": ["192.0.2.50", "192.0.2.61"]}})
    time.sleep(0.1)
    h.settle(gw1, gw2, passes=3)
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in kernel(gw1).egress
    assert h.holder(SlotId("aa-new", 0)) is None
    assert h.holder(SlotId("aa-new", 1)) == "gw2/1"  # its other IP works
    assert all(a.ip != E0 for a in kernel(gw2).egress)
    newcomer = h.store.get(Kind.EGRESS_GATEWAY, "aa-new")
    status, reason, message = conditions(newcomer)["EgressIPConflict"]
    assert (status, reason) == ("True", "EgressIPConflict")
    assert message.startswith("egress IP 192.0.2.50 is served by EgressGateway egw, created "
                              "first")
    owner = conditions(h.store.get(Kind.EGRESS_GATEWAY, "egw"))
    assert owner["Ready"][0] == "True" and owner["Degraded"][0] == "False"
    assert owner["EgressIPConflict"][0] == "False"
    [event] = events(h, "EgressIPConflict")
    assert event["regarding"]["name"] == "aa-new" and event["note"] == message


def lose_default_route(k: FakeKernel) -> None:
    k.default_routes.remove("eth0")


@pytest.mark.parametrize("lose_uplink", [
    lambda k: k.set_link("eth0", up=False),  # `ip link set eth0 down`: the route goes too
    lambda k: k.set_link("eth0", running=False),  # cable pulled, switch port down
    lose_default_route,
], ids=["link set down", "carrier lost", "default route lost"])
def test_a_holder_that_loses_its_uplink_releases_at_once_and_the_standby_takes_over(
        lab, clock, lose_uplink):
    """The datastore is still reachable (a local folder here), so renewals would go on:
    the slot must be let go because the node's own link can no longer carry it."""
    h = lab(["192.0.2.50"], interface="eth0")
    store = WatchingStore(h.store)
    holder = h.gateway("gw1", store=store)
    k = store.kernel = kernel(holder)
    h.settle(holder)
    standby = h.gateway("gw2")
    h.settle(holder, standby)
    assert h.holder(SLOT0) == "gw1/0" and standby.held() == {}
    lose_uplink(k)
    holder.reconcile()  # the pass a kernel notification pokes
    assert store.at_release == [{}], "the IP must be gone before the lease is released"
    assert holder.held() == {} and k.egress == {}
    lease = h.store.get_lease(SLOT0.lease_name)
    assert lease is not None and lease.holder is None  # released, not left to expire
    assert not {PUBLIC_KEY_ANNOTATION, ENDPOINT_ANNOTATION} & set(h.annotations(SLOT0))
    assert holder.leases.renew(SLOT0)  # nothing left to renew: a no-op
    assert h.store.get_lease(SLOT0.lease_name).holder is None  # type: ignore[union-attr]
    time.sleep(0.05)  # the standby's informer sees the release
    h.settle(standby)
    assert h.holder(SLOT0) == "gw2/1"
    assert EgressAddress("eth0", E0) in kernel(standby).egress
    # While the link is down the old holder takes nothing, even a slot that is free.
    standby.leases.release(SLOT0, "test")
    clock.now += 10
    holder.reconcile()
    assert holder.held() == {} and k.egress == {}
    # Tear-down of the rest (past the restart grace, which keeps interfaces).
    assert k.routes == set() and k.rules == set()
    assert [n for n in k.links if n.startswith("mgeg")] == []
    assert holder.ports.probe.serving == {}  # type: ignore[union-attr]


def test_when_the_link_returns_the_old_holder_is_a_clean_standby(lab, clock):
    h = lab(["192.0.2.50"], interface="eth0")
    holder, standby = h.gateway("gw1"), h.gateway("gw2")
    h.settle(holder, standby)
    k = kernel(holder)
    assert h.holder(SLOT0) == "gw1/0"
    k.set_link("eth0", up=False)
    holder.reconcile()
    time.sleep(0.05)
    h.settle(standby, holder)
    assert h.holder(SLOT0) == "gw2/1"
    # The link comes back, and its default route with it (the host's network manager).
    k.set_link("eth0", up=True)
    k.default_routes.append("eth0")
    clock.now += 10  # past the restart grace, renewals of the standby made by hand
    standby.leases.renew(SLOT0)
    h.settle(holder, standby)
    assert h.holder(SLOT0) == "gw2/1" and holder.held() == {}
    assert k.egress == {} and k.routes == set() and k.rules == set()
    assert [n for n in k.links if n.startswith("mgeg")] == []
    nft = holder.ports.nft
    assert isinstance(nft, FakeNftablesAdapter) and nft.state is not None
    assert not any(name.startswith("src_") for name in nft.state.sets)
    # A standby with spare capacity serves again as soon as a slot is free.
    standby.leases.release(SLOT0, "test")
    time.sleep(0.05)
    h.settle(holder)
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in k.egress


def test_links_that_cannot_be_read_keep_the_slot(lab):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    k = kernel(gw)
    k.fail_uplinks = True  # a netlink hiccup: no reason to give anything up
    h.settle(gw)
    assert set(gw.held()) == {SLOT0} and EgressAddress("eth0", E0) in k.egress


def test_a_slot_on_another_interface_stays_when_one_link_goes_down(lab):
    h = lab(["192.0.2.50", "192.0.2.51"])
    h.store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                   "metadata": {"name": "other"},
                   "spec": {"egressIPs": ["192.0.2.60"], "interface": "eth1"}})
    time.sleep(0.05)
    gw = h.gateway(max_slots=3)
    k = kernel(gw)
    k.links["eth1"] = (1500, bytes.fromhex("020000000002"))
    k.default_routes.append("eth1")
    h.settle(gw)
    assert set(gw.held()) == {SLOT0, SLOT1, SlotId("other", 0)}
    k.set_link("eth1", running=False)
    gw.reconcile()
    assert set(gw.held()) == {SLOT0, SLOT1}
    assert {a.interface for a in k.egress} == {"eth0"}


class OneShotWatch:
    """A kernel notification, delivered when the test says so."""

    def __init__(self) -> None:
        self.fire = threading.Event()
        self.interrupted = False
        self.closed = False

    def wait(self, timeout: float | None = None) -> bool:
        fired = self.fire.wait(timeout) and not self.interrupted
        self.fire.clear()
        return fired

    def interrupt(self) -> None:
        self.interrupted = True
        self.fire.set()

    def close(self) -> None:
        self.closed = True


def test_a_link_notification_alone_makes_the_running_gateway_let_go(lab, clock):
    """Nothing in the datastore changes and no resync is due (renewals and resyncs a
    minute apart): the kernel's notification is what brings the pass that releases."""
    h = lab(["192.0.2.50"], interface="eth0")
    watch = OneShotWatch()
    gw = h.gateway(uplink_watch=watch, start_informers=False, resync_interval=60.0,
                   renew_interval=60.0)
    runner = threading.Thread(target=gw.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while h.holder(SLOT0) != "gw1/0" or EgressAddress("eth0", E0) not in kernel(gw).egress:
            assert time.monotonic() < deadline, "the gateway never served its slot"
            time.sleep(0.02)
        time.sleep(0.3)  # quiet: the passes its own writes caused are over
        kernel(gw).set_link("eth0", up=False)
        lost = time.monotonic()
        watch.fire.set()
        while h.holder(SLOT0) is not None:
            assert time.monotonic() - lost < 2.0, "the slot was not released"
            time.sleep(0.01)
        assert kernel(gw).egress == {}
    finally:
        gw.stop.set()
        gw.poke()
        runner.join(timeout=10)
    assert not runner.is_alive() and watch.closed


def test_the_links_are_read_again_when_the_kernel_says_so_and_on_every_resync(lab, clock):
    """A pass does not dump the links and the main table (a route per mesh node) when
    nothing was announced: only after a notification, on a resync, or every pass while
    the watch does not work."""
    h = lab(["192.0.2.50"], interface="eth0")
    gw = h.gateway()
    k = kernel(gw)
    reads: list[float] = []
    read = k.read_uplinks

    def counted() -> Any:
        reads.append(clock.now)
        return read()

    k.read_uplinks = counted  # type: ignore[method-assign]
    watcher = UplinkWatcher(OneShotWatch(), gw._on_uplink_change)  # never started
    gw._uplink_watcher = watcher
    h.settle(gw)
    assert len(reads) == 1  # the first pass; the next ones plan against it
    gw._on_uplink_change()  # what the watcher thread does on a notification
    k.set_link("eth0", running=False)
    gw.reconcile()
    assert len(reads) == 2 and gw.held() == {}
    gw.reconcile()
    assert len(reads) == 2
    clock.now += gw.config.resync_interval
    gw.reconcile()
    assert len(reads) == 3
    watcher.working = False
    gw.reconcile()
    gw.reconcile()
    assert len(reads) == 5


class CutOffStore(FlakyStore):
    """The datastore behind the lost link too: writes about leases fail when `fail`."""

    def patch_annotations(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise DatastoreError("the datastore is unreachable")
        return self._store.patch_annotations(*args, **kwargs)

    def release_lease(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise DatastoreError("the datastore is unreachable")
        return self._store.release_lease(*args, **kwargs)


def test_a_holder_cut_off_from_the_datastore_too_stops_renewing_and_the_lease_expires(
        lab, clock):
    """When the lost link also carried the datastore, the release cannot be written: the
    IP goes anyway, renewals stop, and the standby takes the slot once the lease expired."""
    h = lab(["192.0.2.50"], interface="eth0")
    store = CutOffStore(h.store)
    holder = h.gateway("gw1", store=store)
    standby = h.gateway("gw2")
    h.settle(holder, standby)
    assert h.holder(SLOT0) == "gw1/0"
    k = kernel(holder)
    store.fail = True
    k.set_link("eth0", up=False)
    holder.reconcile()
    assert holder.held() == {} and k.egress == {}
    assert h.holder(SLOT0) == "gw1/0"  # the release could not be written
    h.settle(standby)
    assert h.holder(SLOT0) == "gw1/0" and standby.held() == {}
    clock.now += 3.1  # the lease duration: nobody renewed it
    time.sleep(0.05)
    h.settle(standby, holder)
    assert h.holder(SLOT0) == "gw2/1" and holder.held() == {}


def fail_once(target: Any, method: str, error: Exception) -> None:
    """`target.method` raises `error` on its next call, then works again."""
    def failing(*_args: Any, **_kwargs: Any) -> Any:
        delattr(target, method)
        raise error

    setattr(target, method, failing)


RETRY = 0.5
"""The retry interval of the gateways below (the resync stays at 10 s)."""


def test_a_standby_whose_takeover_fails_once_tries_again_after_the_retry_backoff(lab, clock):
    """Failover: the holder died, and the standby's acquire of the expired lease fails once
    (on kube, a PUT answered 503 without Retry-After, or a reset connection, is not
    retried). Nothing else pokes the standby: its failed acquire must bring the next pass
    after the retry backoff, not the resync."""
    h = lab(["192.0.2.50"])
    holder = h.gateway("gw1")
    flaky = FlakyStore(h.store)
    standby = h.gateway("gw2", store=flaky, retry_interval=RETRY)
    h.settle(holder, standby)
    assert h.holder(SLOT0) == "gw1/0"
    for informer in holder.loop.informers.values():
        informer.stop()  # it dies (its renewals never ran: the test renews by hand)
    clock.now += 3.1  # its lease expired
    fail_once(flaky, "acquire_lease", Unavailable("PUT lease: HTTP 503"))
    wait = standby.loop.run_once(standby.reconcile)
    assert standby.held() == {} and h.holder(SLOT0) is None
    assert wait <= 1.2 * RETRY
    standby.loop.run_once(standby.reconcile)
    assert h.holder(SLOT0) == "gw2/1" and EgressAddress("eth0", E0) in kernel(standby).egress


@pytest.mark.parametrize(("port", "method", "error"), [
    ("store", "acquire_lease", Unavailable("PUT lease: connection reset")),
    ("store", "get", Unavailable("GET lease: timed out")),
    ("kernel", "read_uplinks", KernelError("list links: interrupted")),
    ("kernel", "read", KernelError("dump routes: interrupted")),
    ("kernel", "replace_egress_address", KernelError("add address: no buffer space")),
])
def test_every_failure_of_a_pass_brings_the_next_pass_after_the_retry_backoff(
        lab, port, method, error):
    h = lab(["192.0.2.50"])
    store = FlakyStore(h.store)
    gw = h.gateway(store=store, retry_interval=RETRY)
    fail_once(store if port == "store" else kernel(gw), method, error)
    wait = gw.loop.run_once(gw.reconcile)
    assert wait <= 1.2 * RETRY, f"a failed {method} waits for the resync"
    assert gw.loop.metrics.failures == 1  # the pass counts as failed
    time.sleep(0.05)  # the informers see the first pass's writes
    assert gw.loop.run_once(gw.reconcile) == gw.config.resync_interval
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in kernel(gw).egress


def test_a_release_that_fails_brings_the_next_pass_after_the_retry_backoff(lab):
    h = lab(["192.0.2.50"], interface="eth0")
    store = FlakyStore(h.store)
    gw = h.gateway(store=store, retry_interval=RETRY)
    h.settle(gw)
    fail_once(store, "release_lease", Unavailable("PUT lease: HTTP 503"))
    kernel(gw).set_link("eth0", up=False)
    wait = gw.loop.run_once(gw.reconcile)
    assert gw.held() == {} and kernel(gw).egress == {}
    assert h.holder(SLOT0) == "gw1/0"  # not released: it expires instead
    assert wait <= 1.2 * RETRY


def published(h: Harness, slot: SlotId) -> dict[str, str]:
    return {k: v for k, v in h.annotations(slot).items() if k in SLOT_LEASE_ANNOTATIONS}


def test_the_holder_publishes_again_when_its_annotations_are_cleared_behind_its_back(lab):
    """A late clear by an old holder (or a person) must not leave the slot dark on every
    node while its holder reports ready: what the holder reads on its lease counts, not
    what it remembers writing."""
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    mine = published(h, SLOT0)
    assert mine[HOLDER_ANNOTATION] == "gw1/0" and mine[PUBLIC_KEY_ANNOTATION] == gw.public_key
    h.store.patch_annotations(Kind.LEASE, SLOT0.lease_name,
                              dict.fromkeys(SLOT_LEASE_ANNOTATIONS), namespace=LEASE_NAMESPACE)
    time.sleep(0.05)  # the informer sees it (and pokes the loop)
    h.settle(gw)
    assert published(h, SLOT0) == mine


def test_the_holder_publishes_again_on_a_lease_deleted_and_recreated_by_its_renewal(lab):
    """`kubectl delete lease`: the next renewal creates a bare Lease."""
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    mine = published(h, SLOT0)
    h.store.delete(Kind.LEASE, SLOT0.lease_name, LEASE_NAMESPACE)
    time.sleep(0.05)
    h.settle(gw, passes=1)  # a pass before the renewal: no lease to publish on
    assert gw.leases.renew(SLOT0)
    assert h.holder(SLOT0) == "gw1/0" and published(h, SLOT0) == {}
    time.sleep(0.05)
    h.settle(gw)
    assert published(h, SLOT0) == mine
    assert EgressAddress("eth0", E0) in kernel(gw).egress


def test_a_late_release_leaves_the_next_holders_annotations_alone(lab, clock):
    """The old holder gives the slot up after its lease expired and a standby took it
    and published (its release was delayed: the kube client retries for up to 10 s)."""
    h = lab(["192.0.2.50"])
    old, new = h.gateway("gw1"), h.gateway("gw2")
    h.settle(old, new)
    assert h.holder(SLOT0) == "gw1/0"
    clock.now += 3.1  # the old holder's renewals stalled; its lease expired
    time.sleep(0.05)
    h.settle(new)
    assert h.holder(SLOT0) == "gw2/1"
    theirs = published(h, SLOT0)
    assert theirs[HOLDER_ANNOTATION] == "gw2/1" and theirs[PUBLIC_KEY_ANNOTATION] == new.public_key
    assert SLOT0 in old.held()  # it has not noticed yet
    old.leases.release(SLOT0, "no longer servable here")
    assert h.holder(SLOT0) == "gw2/1" and published(h, SLOT0) == theirs


def test_more_egress_ips_than_slots_in_the_cluster_never_cost_a_held_slot(lab, clock):
    """A newer gateway of 126 egress IPs (within the API's limit) makes 127 in the
    cluster: numbering them all failed, and the gateway released every slot it held.
    The newer gateway gets the slots left (125) and says why its last IP has none."""
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0"
    clock.now += 2  # creationTimestamps have whole seconds
    big = [f"10.1.{i // 100}.{i % 100 + 1}" for i in range(126)]
    # Named to sort first, so only its age can make it lose.
    h.store.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                    "metadata": {"name": "aa-big"}, "spec": {"egressIPs": big}})
    time.sleep(0.1)
    h.settle(gw)
    assert h.holder(SLOT0) == "gw1/0" and EgressAddress("eth0", E0) in kernel(gw).egress
    assert SLOT0 in gw.held()
    status, reason, message = conditions(h.store.get(Kind.EGRESS_GATEWAY, "aa-big"))[
        "SlotLimitExceeded"]
    assert (status, reason) == ("True", "SlotLimitExceeded")
    assert message.startswith(f"1 egress IPs get no slot and are not served ({big[-1]}): at "
                              "most 126 egress IPs are served across all EgressGateways")
    assert conditions(h.store.get(Kind.EGRESS_GATEWAY, "egw"))["SlotLimitExceeded"][0] == \
        "False"
    [event] = events(h, "SlotLimitExceeded")
    assert event["regarding"]["name"] == "aa-big" and event["note"] == message


def test_slots_that_cannot_be_numbered_never_cost_a_held_slot(lab, monkeypatch):
    h = lab(["192.0.2.50"])
    gw = h.gateway()
    h.settle(gw)
    assert set(gw.held()) == {SLOT0}

    def broken(model: Any, kept: Any) -> Any:
        raise ValueError("127 egress IP slots: at most 126 are supported")

    monkeypatch.setattr("gateway.process.compute_slot_numbers", broken)
    h.settle(gw)
    assert set(gw.held()) == {SLOT0} and h.holder(SLOT0) == "gw1/0"
    assert EgressAddress("eth0", E0) in kernel(gw).egress
    assert h.annotations(SLOT0)[ENDPOINT_ANNOTATION] == "192.0.2.11:51900"  # same number
