"""The tracked dataplane (nodeagent.tracker), compute_device_after and the node parse cache:
table-driven, no root."""

import copy
import ipaddress

import pytest

from meshgress.cluster import ENDPOINT_ANNOTATION, PUBLIC_KEY_ANNOTATION, NodeParseCache, parse_node
from meshgress.config import ClusterConfig
from nodeagent.mesh import MeshInputs, compute_mesh
from nodeagent.tracker import TrackedDataplane, apply_device_tracked
from wireguard.errors import UapiError
from wireguard.fake import FakeBackend
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Device, Peer
from wireguard.plan import compute_device_after, plan_device


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- TrackedDataplane: when does a pass read the kernel? ------------------------------------

# Each step: "pass" (observe then wrote), "fail" (observe, then the pass raises before
# wrote), "invalidate", or ("wait", seconds). Expected: for every pass/fail, whether it read.
CASES = {
    "the first pass reads": (["pass"], [True]),
    "passes within the interval plan against the tracked state":
        (["pass", ("wait", 3), "pass", ("wait", 3), "pass"], [True, False, False]),
    "the pass once the interval is over reads (the periodic resync)":
        (["pass", ("wait", 9.9), "pass", ("wait", 0.1), "pass", "pass"],
         [True, False, True, False]),
    "a failed pass makes the next one read":
        (["pass", "fail", "pass", "pass"], [True, False, True, False]),
    "a failed first read makes the next one read again": (["fail", "pass"], [True, True]),
    "invalidate makes the next pass read": (["pass", "invalidate", "pass"], [True, True]),
    "a tracked pass does not postpone the resync":
        (["pass", ("wait", 6), "pass", ("wait", 6), "pass"], [True, False, True]),
}


@pytest.mark.parametrize(("steps", "reads"), CASES.values(), ids=CASES.keys())
def test_when_a_pass_reads_the_kernel(steps, reads):
    clock = Clock()
    tracked = TrackedDataplane("t", resync_interval=10.0, clock=clock)
    kernel = {"state": "as read"}
    seen = []
    for step in steps:
        if isinstance(step, tuple):
            clock.now += step[1]
        elif step == "invalidate":
            tracked.invalidate()
        else:
            before = tracked.full_reads
            state = tracked.observed(lambda: kernel["state"])
            seen.append(tracked.full_reads > before)
            assert tracked.last_pass_read == seen[-1]
            if step == "pass":
                tracked.wrote(state)
    assert seen == reads
    assert tracked.full_reads == sum(reads)


def test_the_tracked_state_is_what_was_written_and_none_is_a_valid_state():
    tracked = TrackedDataplane("t", resync_interval=10.0, clock=Clock())
    assert tracked.observed(lambda: None) is None  # e.g. no such interface yet
    tracked.wrote(None)
    assert tracked.trusted
    assert tracked.observed(lambda: pytest.fail("must not read")) is None
    tracked.wrote("after the writes")
    assert tracked.observed(lambda: pytest.fail("must not read")) == "after the writes"


def test_resync_in_counts_down_to_the_next_full_read():
    clock = Clock()
    tracked = TrackedDataplane("t", resync_interval=10.0, clock=clock)
    assert tracked.resync_in() == 0.0
    tracked.wrote(tracked.observed(lambda: 1))
    clock.now += 4
    assert tracked.resync_in() == pytest.approx(6.0)
    # A failed write leaves the view invalid: the next pass reads, but the view asks for
    # no pass of its own (the failure's retry brings it; asking now would spin).
    tracked.invalidate()
    assert not tracked.trusted and tracked.resync_in() == pytest.approx(6.0)


# --- apply_device_tracked against the fake backend ---------------------------------------

KEY = generate_private_key()
PEERS = {n: public_key(generate_private_key()) for n in ("a", "b", "c")}


def device(*names, endpoint_of=None):
    endpoint_of = endpoint_of or {}
    return Device("mg0", private_key=KEY, listen_port=51820, mtu=1420, peers=[
        Peer(PEERS[n], endpoint=endpoint_of.get(n, f"192.0.2.{ord(n)}:51820"),
             allowed_ips=[f"198.18.{ord(n)}.0/24"]) for n in names])


class CountingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, name):
        self.reads += 1
        return super().read(name)


def test_event_passes_apply_changes_without_reading_and_converge():
    clock = Clock()
    backend = CountingBackend()
    tracked = TrackedDataplane("wireguard", resync_interval=10.0, clock=clock)
    assert apply_device_tracked(backend, device("a", "b"), tracked).create
    assert backend.reads == 1
    plan = apply_device_tracked(backend, device("a", "b", "c"), tracked)
    assert [p.public_key for p in plan.add_peers] == [PEERS["c"]]
    plan = apply_device_tracked(backend, device("a", "c", endpoint_of={"a": "192.0.2.9:1"}),
                                tracked)
    assert [u.public_key for u in plan.update_peers] == [PEERS["a"]]
    assert plan.remove_peers == (PEERS["b"],)
    assert backend.reads == 1
    assert plan_device(device("a", "c", endpoint_of={"a": "192.0.2.9:1"}),
                       backend.read("mg0")).empty


def test_drift_behind_the_agents_back_is_repaired_by_the_next_resync():
    clock = Clock()
    backend = CountingBackend()
    tracked = TrackedDataplane("wireguard", resync_interval=10.0, clock=clock)
    apply_device_tracked(backend, device("a", "b"), tracked)
    # Someone removes a peer by hand: the tracked state does not know.
    backend.devices["mg0"] = device("a")
    assert apply_device_tracked(backend, device("a", "b"), tracked).empty
    clock.now += 10
    plan = apply_device_tracked(backend, device("a", "b"), tracked)
    assert [p.public_key for p in plan.add_peers] == [PEERS["b"]]
    assert backend.read("mg0") == device("a", "b")


def test_an_apply_error_forces_a_full_read_next_pass():
    backend = CountingBackend()
    tracked = TrackedDataplane("wireguard", resync_interval=10.0, clock=Clock())
    apply_device_tracked(backend, device("a"), tracked)
    backend.fail_next = UapiError("mg0", "set", 5)
    with pytest.raises(UapiError):
        apply_device_tracked(backend, device("a", "b"), tracked)
    assert not tracked.trusted
    reads = backend.reads
    plan = apply_device_tracked(backend, device("a", "b"), tracked)
    assert backend.reads == reads + 1
    assert [p.public_key for p in plan.add_peers] == [PEERS["b"]]


# --- compute_device_after ------------------------------------------------------------------

ROAMING = Device("mg0", private_key=KEY, peers=[Peer(PEERS["a"], allowed_ips=["10.0.0.0/8"])])
AFTER_CASES = {
    "no interface yet": (device("a", "b"), None),
    "in sync": (device("a", "b"), device("a", "b")),
    "peers added, removed and moved":
        (device("a", "c"), device("b", "a", endpoint_of={"a": "192.0.2.77:1"})),
    "desired leaves key and port alone": (
        Device("mg0", peers=device("a").peers), device("b")),
    "a roaming peer keeps the endpoint the kernel learnt": (
        ROAMING, Device("mg0", private_key=KEY, listen_port=4242, peers=[
            Peer(PEERS["a"], endpoint="198.51.100.7:9", allowed_ips=["10.0.0.0/8"])])),
}


@pytest.mark.parametrize(("desired", "observed"), AFTER_CASES.values(), ids=AFTER_CASES.keys())
def test_compute_device_after_is_what_the_plan_makes(desired, observed):
    after = compute_device_after(desired, observed)
    assert plan_device(desired, after).empty
    backend = FakeBackend({"mg0": observed} if observed is not None else {})
    plan = plan_device(desired, observed)
    if not plan.empty:
        backend.apply(plan)
    assert after == backend.read("mg0")


def test_compute_device_after_keeps_the_learnt_endpoint_and_port():
    after = compute_device_after(ROAMING, AFTER_CASES[
        "a roaming peer keeps the endpoint the kernel learnt"][1])
    assert after.peers[0].endpoint == "198.51.100.7:9"
    assert after.listen_port == 4242


# --- NodeParseCache ------------------------------------------------------------------------

CLUSTER = ClusterConfig(pod_cidrs=(ipaddress.ip_network("198.18.0.0/16"),),
                        service_cidrs=(ipaddress.ip_network("198.19.0.0/16"),))


def node_obj(i, version="1", endpoint=None):
    meta = {"name": f"node{i}", "annotations": {
        PUBLIC_KEY_ANNOTATION: PEERS["abc"[i % 3]] if i < 3 else public_key(KEY),
        ENDPOINT_ANNOTATION: endpoint or f"192.0.2.{i + 1}:51820"}}
    if version is not None:
        meta["resourceVersion"] = version
    return {"metadata": meta, "spec": {"podCIDRs": [f"198.18.{i}.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": f"192.0.2.{i + 1}"}]}}


SAME = node_obj(1)
PARSE_CASES = {
    "the same object is not parsed again": (SAME, SAME, False),
    "an equal copy with the same resourceVersion is not parsed again":
        (node_obj(1), node_obj(1), False),
    "a new resourceVersion is parsed": (node_obj(1), node_obj(1, "2", "192.0.2.99:1"), True),
    "without a resourceVersion, another object is parsed":
        (node_obj(1, None), node_obj(1, None), True),
    "without a resourceVersion, the same object is not": ((o := node_obj(1, None)), o, False),
}


@pytest.mark.parametrize(("first", "second", "parsed"), PARSE_CASES.values(),
                         ids=PARSE_CASES.keys())
def test_parse_cache_parses_only_what_changed(first, second, parsed):
    cache = NodeParseCache()
    assert cache.parse(first) == parse_node(first)
    before = cache.parsed
    assert cache.parse(second) == parse_node(second)
    assert (cache.parsed > before) == parsed


def test_parse_all_forgets_nodes_that_are_gone_and_equals_parse_node():
    cache = NodeParseCache()
    objs = [node_obj(i) for i in range(3)]
    assert cache.parse_all(objs) == [parse_node(o) for o in objs]
    assert len(cache) == 3
    assert cache.parse_all(objs[:2]) == [parse_node(o) for o in objs[:2]]
    assert len(cache) == 2 and cache.parsed == 3


def test_compute_mesh_from_cached_nodes_equals_from_fresh_ones():
    """The memos (parse cache, per-node parts) change the cost, never the answer."""
    cache = NodeParseCache()
    objs = [node_obj(i) for i in range(3)]

    def mesh(nodes):
        return compute_mesh(MeshInputs(self_name="node0", nodes=tuple(nodes),
                                       private_key=KEY, mtu=1420, cluster=CLUSTER))

    first = mesh(cache.parse_all(objs))
    changed = copy.deepcopy(objs)
    changed[2]["metadata"]["resourceVersion"] = "2"
    changed[2]["metadata"]["annotations"][ENDPOINT_ANNOTATION] = "192.0.2.50:1"
    again = mesh(cache.parse_all(changed))
    assert again == mesh(parse_node(o) for o in changed)
    assert again != first
    assert [p.endpoint for p in again.device.peers if p.public_key == PEERS["c"]] == \
        ["192.0.2.50:1"]
