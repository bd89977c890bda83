"""The Datastore contract: what every backend must do, written once and run on each.

`DatastoreContract` holds the tests; a backend's test module subclasses it (as `Test...`)
and provides the fixtures:

- `store`: a fresh store (or a fresh view of a shared one) for the test;
- `clock`: the `FakeClock` the store writes Leases with;
- `other`: a factory of another, independent instance on the same backend (another
  process, in production);
- `unique`: a prefix no other test uses, so tests can share one API server. Every name a
  test makes starts with it, and what a test lists is filtered by it.

Objects are ones a real API server accepts (Pods have containers, Nodes only real spec
fields, EgressGateways valid specs), and resource versions are compared, never predicted:
on Kubernetes they are etcd's revisions, shared with everything else in the cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshgress.datastore import (
    LEASE_DURATION_ANNOTATION,
    LEASE_NAMESPACE,
    AlreadyExists,
    Conflict,
    Datastore,
    Invalid,
    Kind,
    LeaseHeld,
    NotFound,
    WatchEvent,
)

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def node(name: str, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"kind": "Node", "metadata": meta, "spec": {}}


def namespace(name: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name}}


def pod(name: str, ns: str, node_name: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node_name,
                     "containers": [{"name": "main", "image": "registry.invalid/app:1"}]}}


def gateway(name: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name}, "spec": {"egressIPs": list(ips or ["203.0.113.10"])}}


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def ensure_namespace(store: Datastore, name: str) -> None:
    with contextlib.suppress(AlreadyExists):
        store.create(namespace(name))


def names(items: Any, prefix: str) -> list[str]:
    return [o["metadata"]["name"] for o in items if o["metadata"]["name"].startswith(prefix)]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Watcher:
    """A watch consumed on a thread, its events kept in order."""

    def __init__(self, store: Datastore, kinds: set[Kind], resource_version: int,
                 **options: Any) -> None:
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._it = store.watch(frozenset(kinds), resource_version, stop=self.stop, **options)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self._it:
                self.events.append(event)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def changes(self) -> list[WatchEvent]:
        return [e for e in self.events if e.type != "BOOKMARK"]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "the watch did not end when stopped"


class DatastoreContract:
    @pytest.fixture
    def unique(self, request: pytest.FixtureRequest) -> str:
        """A name prefix of this test's own (a lowercase DNS label)."""
        digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
        return f"t{digest}"

    def ensure_namespace(self, store: Datastore, name: str) -> None:
        """A namespace pods can be created in (a backend may need more than the object)."""
        ensure_namespace(store, name)

    # CRUD and metadata

    def test_create_sets_identity(self, store: Datastore, unique: str) -> None:
        created = store.create(node(f"{unique}-n1"))
        meta = created["metadata"]
        assert created["apiVersion"] == "v1"
        assert created["kind"] == "Node"
        assert rv(created) > 0
        assert len(meta["uid"]) == 36
        assert meta["creationTimestamp"].endswith("Z")
        assert store.get(Kind.NODE, f"{unique}-n1") == created

    def test_callers_own_their_copies(self, store: Datastore, unique: str) -> None:
        created = store.create(node(f"{unique}-n1", zone="a"))
        created["metadata"]["labels"]["zone"] = "b"
        got = store.get(Kind.NODE, f"{unique}-n1")
        got["metadata"]["labels"]["zone"] = "c"
        assert store.get(Kind.NODE, f"{unique}-n1")["metadata"]["labels"] == {"zone": "a"}

    def test_create_twice_is_already_exists(self, store: Datastore, unique: str) -> None:
        store.create(node(f"{unique}-n1"))
        with pytest.raises(AlreadyExists):
            store.create(node(f"{unique}-n1"))
        for ns in (f"{unique}-a", f"{unique}-b"):
            self.ensure_namespace(store, ns)
            store.create(pod("p1", ns, "n1"))  # the same name in another namespace

    def test_create_rejects_a_resource_version(self, store: Datastore, unique: str) -> None:
        obj = node(f"{unique}-n1")
        obj["metadata"]["resourceVersion"] = "5"
        with pytest.raises(Invalid, match="resourceVersion"):
            store.create(obj)

    def test_missing_objects_are_not_found(self, store: Datastore, unique: str) -> None:
        missing = f"{unique}-nope"
        with pytest.raises(NotFound):
            store.get(Kind.NODE, missing)
        with pytest.raises(NotFound):
            store.replace(node(missing))
        with pytest.raises(NotFound):
            store.delete(Kind.NODE, missing)
        with pytest.raises(NotFound):
            store.patch_status(Kind.EGRESS_GATEWAY, missing, {})
        with pytest.raises(NotFound):
            store.patch_annotations(Kind.NODE, missing, {"a": "b"})

    def test_generation_follows_the_spec_and_status_is_its_own(self, store: Datastore,
                                                               unique: str) -> None:
        name = f"{unique}-gw"
        created = store.create({**gateway(name), "status": {"observedGeneration": 7}})
        assert created["metadata"]["generation"] == 1
        assert created["status"] == {"observedGeneration": 7}  # status is kept on create

        labelled = store.get(Kind.EGRESS_GATEWAY, name)
        labelled["metadata"]["labels"] = {"zone": "a"}
        labelled["status"] = {"observedGeneration": 9}  # replace keeps the stored status
        r1 = store.replace(labelled)
        assert r1["metadata"]["generation"] == 1
        assert rv(r1) > rv(created)
        assert r1["status"] == {"observedGeneration": 7}
        assert r1["metadata"]["uid"] == created["metadata"]["uid"]
        assert r1["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]

        r2 = store.replace(gateway(name, "203.0.113.11"))  # no resourceVersion: unconditional
        assert r2["metadata"]["generation"] == 2
        assert rv(r2) > rv(r1)
        assert "labels" not in r2["metadata"]

        s = store.patch_status(Kind.EGRESS_GATEWAY, name, {"observedGeneration": 2})
        assert s["status"] == {"observedGeneration": 2}
        assert s["metadata"]["generation"] == 2
        a = store.patch_annotations(Kind.EGRESS_GATEWAY, name, {"x": "1", "y": "2"})
        assert a["metadata"]["annotations"] == {"x": "1", "y": "2"}
        assert a["metadata"]["generation"] == 2
        a = store.patch_annotations(Kind.EGRESS_GATEWAY, name, {"x": None, "z": "3"})
        assert a["metadata"]["annotations"] == {"y": "2", "z": "3"}

    def test_replace_with_a_stale_resource_version_conflicts(self, store: Datastore,
                                                           unique: str) -> None:
        name = f"{unique}-gw"
        first = store.create(gateway(name, "203.0.113.1"))
        second = store.replace({**first, "spec": {"egressIPs": ["203.0.113.2"]}})
        assert rv(second) > rv(first)
        with pytest.raises(Conflict):
            store.replace({**first, "spec": {"egressIPs": ["203.0.113.3"]}})
        assert store.get(Kind.EGRESS_GATEWAY, name)["spec"] == {"egressIPs": ["203.0.113.2"]}
        third = store.replace({**second, "spec": {"egressIPs": ["203.0.113.3"]}})
        assert rv(third) > rv(second)

    def test_replace_of_a_recreated_object_conflicts_on_uid(self, store: Datastore,
                                                          unique: str) -> None:
        old = store.create(node(f"{unique}-n1"))
        store.delete(Kind.NODE, f"{unique}-n1")
        store.create(node(f"{unique}-n1"))
        del old["metadata"]["resourceVersion"]
        with pytest.raises(Conflict):
            store.replace(old)

    def test_apply_creates_then_overwrites(self, store: Datastore, unique: str) -> None:
        name = f"{unique}-gw"
        created = store.apply({**gateway(name, "203.0.113.1"),
                               "status": {"observedGeneration": 1}})
        assert created["status"] == {"observedGeneration": 1}
        assert created["metadata"]["generation"] == 1
        stale = dict(created, metadata={**created["metadata"], "resourceVersion": "1"})
        updated = store.apply({**stale, "spec": {"egressIPs": ["203.0.113.2"]},
                               "status": {"observedGeneration": 5}})
        assert updated["spec"] == {"egressIPs": ["203.0.113.2"]}
        assert updated["status"] == {"observedGeneration": 1}
        assert updated["metadata"]["generation"] == 2
        assert updated["metadata"]["uid"] == created["metadata"]["uid"]

    def test_a_write_that_changes_nothing_is_not_stored(self, store: Datastore,
                                                        unique: str) -> None:
        name = f"{unique}-gw"
        first = store.apply(gateway(name))
        again = store.apply(gateway(name))
        assert rv(again) == rv(first)
        patched = store.patch_annotations(Kind.EGRESS_GATEWAY, name, {"absent": None})
        assert rv(patched) == rv(first)

    def test_delete_removes_the_object(self, store: Datastore, unique: str) -> None:
        store.create(node(f"{unique}-n1"))
        self.ensure_namespace(store, unique)
        store.create(pod("p1", unique, "n1"))
        store.delete(Kind.NODE, f"{unique}-n1")
        store.delete(Kind.POD, "p1", unique)  # at once: no kubelet has to confirm it
        with pytest.raises(NotFound):
            store.get(Kind.NODE, f"{unique}-n1")
        with pytest.raises(NotFound):
            store.get(Kind.POD, "p1", unique)

    @pytest.mark.parametrize("name", ["../x", "", "a/b", "..", "A", "-a", "a_b", "x" * 254],
                             ids=lambda n: repr(n)[:12])
    def test_invalid_names_are_rejected_everywhere(self, store: Datastore, name: str) -> None:
        with pytest.raises(Invalid):
            store.create(node(name))
        with pytest.raises(Invalid):
            store.get(Kind.NODE, name)
        with pytest.raises(Invalid):
            store.delete(Kind.NODE, name)
        with pytest.raises(Invalid):
            store.patch_annotations(Kind.NODE, name, {"a": "b"})
        with pytest.raises(Invalid):
            store.acquire_lease(name, "me", 1.0)

    @pytest.mark.parametrize(
        ("obj", "message"),
        [
            ({"kind": "Secret", "metadata": {"name": "a"}}, "unknown kind"),
            ({"metadata": {"name": "a"}}, "unknown kind"),
            ({"kind": "Node", "apiVersion": "apps/v1", "metadata": {"name": "a"}},
             "apiVersion"),
            ({"kind": "Node"}, "metadata"),
            ({"kind": "Node", "metadata": {"name": "a", "namespace": "x"}}, "cluster-scoped"),
            ({"kind": "Pod", "metadata": {"name": "a"}}, "namespace"),
            ({"kind": "Pod", "metadata": {"name": "a", "namespace": "a.b"}}, "namespace"),
            ({"kind": "Node", "metadata": {"name": 5}}, "string"),
            ({"kind": "Node", "metadata": {"name": "a"}, "spec": {"x": float("nan")}}, "JSON"),
            ({"kind": "Node", "metadata": {"name": "a"}, "spec": {"x": {1, 2}}}, "JSON"),
        ],
        ids=["unknown-kind", "no-kind", "wrong-apiversion", "no-metadata", "cluster-with-ns",
             "pod-without-ns", "bad-ns", "name-not-str", "nan", "set"],
    )
    def test_malformed_objects_are_invalid(self, store: Datastore, obj: dict[str, Any],
                                           message: str) -> None:
        with pytest.raises(Invalid, match=message):
            store.create(obj)

    def test_list_is_sorted_filtered_and_current(self, store: Datastore, unique: str) -> None:
        ns1, ns2 = f"{unique}-ns1", f"{unique}-ns2"
        for ns in (ns1, ns2):
            self.ensure_namespace(store, ns)
        store.create(pod("b", ns2, f"{unique}-n1"))
        store.create(pod("a", ns2, f"{unique}-n2"))
        last = store.create(pod("z", ns1, f"{unique}-n1"))
        result = store.list(Kind.POD)
        ours = [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in result.items
                if p["metadata"]["namespace"].startswith(unique)]
        assert ours == [(ns1, "z"), (ns2, "a"), (ns2, "b")]
        assert all(p["kind"] == "Pod" and p["apiVersion"] == "v1" for p in result.items)
        assert result.resource_version >= rv(last)
        assert result.rejected == ()
        assert [p["metadata"]["name"] for p in store.list(Kind.POD, namespace=ns2).items] == [
            "a", "b"]
        on_n1 = store.list(Kind.POD, field_node_name=f"{unique}-n1").items
        assert [p["metadata"]["name"] for p in on_n1] == ["z", "b"]
        assert store.list(Kind.POD, namespace=f"{unique}-empty").items == ()
        with pytest.raises(Invalid):
            store.list(Kind.NODE, field_node_name="n1")
        with pytest.raises(Invalid):
            store.list(Kind.NODE, namespace=ns1)

    def test_a_second_instance_sees_the_same_store(self, store: Datastore, unique: str,
                                                   other: Callable[[], Datastore]) -> None:
        first = store.create(node(f"{unique}-n1"))
        second_store = other()
        try:
            assert second_store.list(Kind.NODE).resource_version >= rv(first)
            second = second_store.create(node(f"{unique}-n2"))
            assert rv(store.create(node(f"{unique}-n3"))) > rv(second)
        finally:
            second_store.close()

    # Concurrency between instances

    def test_patch_annotations_from_two_instances_loses_no_update(
            self, store: Datastore, unique: str, other: Callable[[], Datastore]) -> None:
        name = f"{unique}-counter"
        store.create(node(name))
        rounds = 40
        errors: list[BaseException] = []

        def increment(me: str) -> None:
            mine = other()
            try:
                for _ in range(rounds):
                    annotations = mine.get(Kind.NODE, name)["metadata"].get("annotations") or {}
                    key = f"count-{me}"
                    mine.patch_annotations(Kind.NODE, name,
                                           {key: str(int(annotations.get(key, "0")) + 1)})
            except BaseException as exc:
                errors.append(exc)
            finally:
                mine.close()

        threads = [threading.Thread(target=increment, args=(me,)) for me in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        annotations = store.get(Kind.NODE, name)["metadata"]["annotations"]
        assert annotations == {"count-a": str(rounds), "count-b": str(rounds)}

    def test_compare_and_swap_from_two_instances_loses_no_update(
            self, store: Datastore, unique: str, other: Callable[[], Datastore]) -> None:
        name = f"{unique}-counter"
        store.create({**node(name), "metadata": {"name": name, "annotations": {"n": "0"}}})
        rounds = 40
        conflicts: list[int] = []

        def increment() -> None:
            mine = other()
            seen = 0
            try:
                for _ in range(rounds):
                    while True:
                        obj = mine.get(Kind.NODE, name)
                        obj["metadata"]["annotations"]["n"] = str(
                            int(obj["metadata"]["annotations"]["n"]) + 1)
                        try:
                            mine.replace(obj)
                            break
                        except Conflict:
                            seen += 1
            finally:
                conflicts.append(seen)
                mine.close()

        threads = [threading.Thread(target=increment) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(conflicts) == 2
        assert store.get(Kind.NODE, name)["metadata"]["annotations"]["n"] == str(2 * rounds)

    # Watch

    def test_watch_sees_every_change_of_its_kind_in_order(
            self, store: Datastore, unique: str, other: Callable[[], Datastore]) -> None:
        store.create(node(f"{unique}-before"))
        start = store.list(Kind.NODE).resource_version
        watcher = Watcher(store, {Kind.NODE}, start)
        writer = other()
        made: list[tuple[str, str, int]] = []
        try:
            for i in range(8):
                made.append(("ADDED", f"{unique}-n{i}",
                             rv(writer.create(node(f"{unique}-n{i}")))))
            for i in range(0, 8, 2):
                made.append(("MODIFIED", f"{unique}-n{i}", rv(writer.patch_annotations(
                    Kind.NODE, f"{unique}-n{i}", {"touched": "yes"}))))
            self.ensure_namespace(writer, unique)
            writer.create(pod("unwatched", unique, "n1"))
            for i in range(1, 8, 2):
                writer.delete(Kind.NODE, f"{unique}-n{i}")
                made.append(("DELETED", f"{unique}-n{i}", 0))
            assert wait_for(lambda: len([e for e in watcher.changes()
                                         if e.object["metadata"]["name"].startswith(unique)])
                            >= len(made))
        finally:
            watcher.close()
            writer.close()
        assert watcher.error is None
        got = [(e.type, e.object["metadata"]["name"], e.resource_version)
               for e in watcher.changes() if e.object["metadata"]["name"].startswith(unique)]
        assert [(t, n) for t, n, _ in got] == [(t, n) for t, n, _ in made]
        assert [v for t, _, v in got if t != "DELETED"] == [v for t, _, v in made
                                                           if t != "DELETED"]
        versions = [v for *_, v in got]
        assert versions == sorted(set(versions)), "versions must rise strictly"
        assert all(e.kind is Kind.NODE for e in watcher.events)

    def test_watch_of_one_node_s_pods(self, store: Datastore, unique: str) -> None:
        self.ensure_namespace(store, unique)
        start = store.list(Kind.POD, field_node_name=f"{unique}-n1").resource_version
        watcher = Watcher(store, {Kind.POD}, start, field_node_name=f"{unique}-n1")
        try:
            store.create(pod("elsewhere", unique, f"{unique}-n2"))
            store.create(pod("here", unique, f"{unique}-n1"))
            store.delete(Kind.POD, "elsewhere", unique)
            store.delete(Kind.POD, "here", unique)
            assert wait_for(lambda: len(watcher.changes()) >= 2)
            time.sleep(0.2)  # nothing else may follow
        finally:
            watcher.close()
        seen = [(e.type, e.object["metadata"]["name"]) for e in watcher.changes()]
        # Kubernetes marks a pod deleted (MODIFIED, deletionTimestamp) before removing it.
        assert seen[0] == ("ADDED", "here")
        assert seen[-1] == ("DELETED", "here")
        assert {name for _, name in seen} == {"here"}
        with pytest.raises(Invalid):
            store.watch(frozenset({Kind.NODE}), start, field_node_name="n1")

    def test_bookmarks_while_idle(self, store: Datastore, unique: str) -> None:
        self.ensure_namespace(store, unique)
        start = store.list(Kind.EGRESS_POLICY).resource_version
        it = store.watch(frozenset({Kind.EGRESS_POLICY}), start, bookmark_interval=0.2)
        t = time.monotonic()
        first = next(it)
        assert time.monotonic() - t >= 0.15
        assert (first.type, first.object, first.kind) == ("BOOKMARK", {}, Kind.EGRESS_POLICY)
        assert first.resource_version >= start
        second = next(it)
        assert second.type == "BOOKMARK"
        assert second.resource_version >= first.resource_version

    def test_stop_ends_a_watch_promptly(self, store: Datastore, unique: str) -> None:
        start = store.list(Kind.NODE).resource_version
        watcher = Watcher(store, {Kind.NODE}, start)
        store.create(node(f"{unique}-n1"))
        assert wait_for(lambda: bool(watcher.changes()))
        t = time.monotonic()
        watcher.close()
        assert time.monotonic() - t < 0.5
        assert [e.object["metadata"]["name"] for e in watcher.changes()] == [f"{unique}-n1"]

    def test_close_ends_watches(self, store: Datastore,
                                other: Callable[[], Datastore]) -> None:
        closing = other()
        start = closing.list(Kind.NODE).resource_version
        watcher = threading.Thread(
            target=lambda: list(closing.watch(frozenset({Kind.NODE}), start)), daemon=True)
        watcher.start()
        time.sleep(0.1)
        closing.close()
        watcher.join(timeout=2)
        assert not watcher.is_alive()

    def test_watch_rejects_bad_arguments(self, store: Datastore) -> None:
        with pytest.raises(Invalid):
            store.watch(frozenset(), 0)
        with pytest.raises(Invalid):
            store.watch(frozenset({Kind.NODE}), -1)

    # Leases

    def test_lease_acquire_renew_hold_expire_and_take_over(self, store: Datastore,
                                                           clock: FakeClock,
                                                           unique: str) -> None:
        name = f"{unique}-slot"
        assert store.get_lease(name) is None
        a = store.acquire_lease(name, "gw-a", 2.5)
        assert (a.holder, a.duration_seconds, a.acquire_time, a.renew_time, a.transitions) == (
            "gw-a", 2.5, clock.now, clock.now, 0)
        obj = store.get(Kind.LEASE, name, LEASE_NAMESPACE)
        assert obj["apiVersion"] == "coordination.k8s.io/v1"
        assert obj["spec"]["leaseDurationSeconds"] == 3  # Kubernetes' integer, rounded up
        assert obj["metadata"]["annotations"][LEASE_DURATION_ANNOTATION] == "2.5"
        assert obj["spec"]["renewTime"] == "2023-11-14T22:13:20.000000Z"

        clock.now = T0 + 1.0
        renewed = store.acquire_lease(name, "gw-a", 2.5)
        assert (renewed.renew_time, renewed.acquire_time, renewed.transitions) == (
            T0 + 1, T0, 0)
        assert renewed.resource_version > a.resource_version

        clock.now = T0 + 3.4  # still valid: renewed at +1 for 2.5 s
        with pytest.raises(LeaseHeld, match=r"gw-a until 2023-11-14T22:13:23\.500000Z"):
            store.acquire_lease(name, "gw-b", 2.5)

        clock.now = T0 + 3.5  # expired exactly now
        b = store.acquire_lease(name, "gw-b", 1.0)
        assert (b.holder, b.acquire_time, b.renew_time, b.transitions) == (
            "gw-b", T0 + 3.5, T0 + 3.5, 1)
        assert store.get_lease(name) == b
        with pytest.raises(LeaseHeld):
            store.acquire_lease(name, "gw-a", 1.0)

    def test_lease_release_lets_another_take_it_at_once(self, store: Datastore,
                                                        clock: FakeClock,
                                                        unique: str) -> None:
        name = f"{unique}-slot"
        store.acquire_lease(name, "gw-a", 60)
        assert store.release_lease(name, "gw-b") is False  # not the holder: no-op
        held = store.get_lease(name)
        assert held is not None
        assert held.holder == "gw-a"
        assert store.release_lease(name, "gw-a") is True
        assert store.release_lease(name, "gw-a") is False  # released already
        released = store.get_lease(name)
        assert released is not None
        assert released.holder is None
        assert released.expired(clock.now)
        clock.now += 1
        b = store.acquire_lease(name, "gw-b", 60)
        assert (b.holder, b.transitions, b.acquire_time) == ("gw-b", 1, T0 + 1)
        assert store.release_lease(f"{unique}-never-taken", "gw-a") is False
        assert store.get_lease(f"{unique}-never-taken") is None

    def test_lease_release_clears_annotations_in_the_same_write_only_for_its_holder(
            self, store: Datastore, clock: FakeClock, unique: str) -> None:
        """What a holder published goes with its release, and a late release (after the
        lease expired and was taken) never touches what the next holder published."""
        name = f"{unique}-slot"

        def annotations() -> dict[str, str]:
            obj = store.get(Kind.LEASE, name, LEASE_NAMESPACE)
            return dict(obj["metadata"].get("annotations") or {})

        store.acquire_lease(name, "gw-a", 2.0)
        store.patch_annotations(Kind.LEASE, name, {"example.com/key": "a",
                                                   "example.com/other": "kept"},
                                namespace=LEASE_NAMESPACE)
        store.release_lease(name, "gw-b", clear_annotations=["example.com/key"])  # no-op
        assert annotations()["example.com/key"] == "a"
        with pytest.raises(Invalid):
            store.release_lease(name, "gw-a", clear_annotations=[""])
        before = store.get_lease(name)
        store.release_lease(name, "gw-a",
                            clear_annotations=["example.com/key", "example.com/absent"])
        released = store.get_lease(name)
        assert released is not None and before is not None
        assert released.holder is None
        assert released.resource_version > before.resource_version
        left = annotations()
        assert "example.com/key" not in left and left["example.com/other"] == "kept"
        assert LEASE_DURATION_ANNOTATION in left

        clock.now += 1
        store.acquire_lease(name, "gw-b", 2.0)
        store.patch_annotations(Kind.LEASE, name, {"example.com/key": "b"},
                                namespace=LEASE_NAMESPACE)
        store.release_lease(name, "gw-a", clear_annotations=["example.com/key"])
        assert annotations()["example.com/key"] == "b"
        taken = store.get_lease(name)
        assert taken is not None and taken.holder == "gw-b"

    @pytest.mark.parametrize("duration", [0, -1, float("inf"), float("nan")])
    def test_lease_duration_must_be_positive(self, store: Datastore, unique: str,
                                             duration: float) -> None:
        with pytest.raises(Invalid):
            store.acquire_lease(f"{unique}-slot", "gw-a", duration)

    def test_two_instances_racing_for_a_free_lease_one_wins(
            self, store: Datastore, unique: str, other: Callable[[], Datastore]) -> None:
        race_for_leases(store, other, unique, rounds=10)


def race_for_leases(store: Datastore, other: Callable[[], Datastore], unique: str,
                    rounds: int) -> None:
    """Two holders, each with its own store instance on its own thread, race for each of
    `rounds` free leases (released at once by a barrier): exactly one wins every time, and
    the stored lease names the winner."""
    contenders = {me: other() for me in ("gw-a", "gw-b")}
    barrier = threading.Barrier(2)
    results: dict[str, list[str]] = {me: [] for me in contenders}

    def contend(me: str) -> None:
        mine = contenders[me]
        for r in range(rounds):
            barrier.wait(timeout=60)
            try:
                mine.acquire_lease(f"{unique}-race-{r}", me, 30.0)
                results[me].append("won")
            except LeaseHeld:
                results[me].append("held")

    threads = [threading.Thread(target=contend, args=(me,)) for me in contenders]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for mine in contenders.values():
            mine.close()
    assert all(len(r) == rounds for r in results.values()), results
    for r in range(rounds):
        winners = [me for me, outcome in results.items() if outcome[r] == "won"]
        assert len(winners) == 1, f"round {r}: {results}"
        lease = store.get_lease(f"{unique}-race-{r}")
        assert lease is not None
        assert (lease.holder, lease.transitions) == (winners[0], 0)
