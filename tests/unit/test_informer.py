"""The informer keeps a cache equal to the store, across deletes, 410 re-lists and objects
the store cannot read."""

import logging
import threading
import time

from meshgress.datastore import Kind
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.informer import Informer
from meshgress.prometheus import Exposition
from meshgress.runtime import LoopMetrics, ReconcileLoop


def ns(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def names(informer):
    return sorted(name for _, name in informer.snapshot())


def test_cache_follows_adds_changes_and_deletes(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=0.01)
    store.create(ns("a"))
    pokes = threading.Semaphore(0)
    informer = Informer(store, Kind.NAMESPACE, on_change=pokes.release).start()
    try:
        assert informer.synced.wait(5)
        assert names(informer) == ["a"]
        store.create(ns("b"))
        store.apply(ns("a", team="x"))
        store.delete(Kind.NAMESPACE, "b")
        assert wait_until(lambda: names(informer) == ["a"] and
                          informer.snapshot()[("", "a")]["metadata"]["labels"] == {"team": "x"})
        assert pokes.acquire(timeout=1)
    finally:
        informer.stop()
        store.close()


def test_relists_after_the_watch_expires(tmp_path):
    # A tiny journal: a burst of writes while the informer is stalled compacts its
    # resource version away, so the watch raises Expired and the informer lists again.
    store = FileDatastore(tmp_path, journal_limit=8, poll_interval=0.01)
    store.create(ns("keep"))
    stalled = threading.Event()
    release = threading.Event()

    def on_change():
        if not stalled.is_set():
            stalled.set()
            release.wait(5)

    informer = Informer(store, Kind.NAMESPACE, on_change=on_change, max_backoff=0.05).start()
    try:
        assert stalled.wait(5)
        writer = FileDatastore(tmp_path, journal_limit=8)
        for i in range(30):
            writer.create(ns(f"n{i}"))
        for i in range(0, 30, 2):
            writer.delete(Kind.NAMESPACE, f"n{i}")
        release.set()
        expected = sorted(["keep", *(f"n{i}" for i in range(1, 30, 2))])
        assert wait_until(lambda: names(informer) == expected)
        assert informer.relists >= 2
        writer.close()
    finally:
        informer.stop()
        store.close()


def test_an_unreadable_object_is_skipped_and_reported_until_the_store_repairs_it(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=0.01)
    store.create(ns("good"))
    (tmp_path / "objects/Namespace/bad.yaml").write_bytes(b"metadata: [unclosed\n")
    informer = Informer(store, Kind.NAMESPACE, on_change=lambda: None).start()
    try:
        assert informer.synced.wait(5), "one bad file must not keep the cache from syncing"
        assert names(informer) == ["good"] and informer.errors == 0
        [rejected] = informer.rejected()
        assert (rejected.kind, rejected.name) == (Kind.NAMESPACE, "bad")
        store.create(ns("later"))  # the watch goes on
        assert wait_until(lambda: names(informer) == ["good", "later"])
        store.apply(ns("bad", fixed="yes"))  # a write through the store replaces it
        assert wait_until(lambda: informer.rejected() == () and "bad" in names(informer))
    finally:
        informer.stop()
        store.close()


def test_a_file_that_yaml_parses_into_an_error_of_another_kind_is_rejected_alone(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=0.01)
    store.create(ns("good"))
    # A safe loader raises ValueError, not a YAMLError, for this one.
    (tmp_path / "objects/Namespace/bad.yaml").write_bytes(
        b"apiVersion: v1\nkind: Namespace\nmetadata: {name: bad}\nsize: !!int many\n")
    informer = Informer(store, Kind.NAMESPACE, on_change=lambda: None).start()
    try:
        assert informer.synced.wait(5)
        assert names(informer) == ["good"]
        [rejected] = informer.rejected()
        assert rejected.name == "bad" and "invalid literal for int()" in rejected.reason
    finally:
        informer.stop()
        store.close()


def test_an_unforeseen_failure_of_the_store_does_not_end_the_informer(tmp_path, caplog):
    store = FileDatastore(tmp_path, poll_interval=0.01)
    store.create(ns("a"))
    failures = [RuntimeError("the store's own bug")]
    real_list = store.list

    def list_failing_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_list(*args, **kwargs)

    store.list = list_failing_once  # type: ignore[method-assign]
    informer = Informer(store, Kind.NAMESPACE, on_change=lambda: None, max_backoff=0.05)
    with caplog.at_level(logging.ERROR, logger="meshgress"):
        informer.start()
        try:
            assert informer.synced.wait(5), "the informer's thread ended"
            assert names(informer) == ["a"] and informer.errors == 1
            assert "unexpected failure" in caplog.text and "the store's own bug" in caplog.text
        finally:
            informer.stop()
            store.close()


def test_the_loop_renders_rejected_objects_by_kind(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=0.01)
    (tmp_path / "objects/EgressPolicy").mkdir(parents=True)
    (tmp_path / "objects/EgressPolicy/bad.yaml").write_bytes(b"\x00")
    loop = ReconcileLoop(store, {Kind.NAMESPACE: None, Kind.EGRESS_POLICY: None},
                         log=logging.getLogger("test"), metrics=LoopMetrics("meshgress_", "e"))
    for informer in loop.informers.values():
        informer.start()
    try:
        assert wait_until(loop.synced)
        page = Exposition()
        loop.metrics.render(page)
        text = page.render()
        assert 'meshgress_datastore_rejected_objects{kind="EgressPolicy"} 1' in text
        assert 'meshgress_datastore_rejected_objects{kind="Namespace"} 0' in text
        assert [r.name for r in loop.rejected()] == ["bad"]
    finally:
        for informer in loop.informers.values():
            informer.stop()
        store.close()


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_lease_renewal_updates_the_cache_without_poking_the_loop(tmp_path):
    """Renewals are most writes of an idle cluster (every held slot, every second): no pass
    computes anything new from one, so only a change of holder (or a lease that had
    expired coming back) pokes the loop."""
    clock = Clock()
    store = FileDatastore(tmp_path, clock=clock)
    loop = ReconcileLoop(store, {Kind.LEASE: None}, log=logging.getLogger("test"),
                         metrics=LoopMetrics("t_", "t_errors_total"), wall_clock=clock)
    informer = loop.informers[Kind.LEASE]
    informer.start()

    def renew_time() -> str | None:
        leases = list(informer.snapshot().values())
        return leases[0]["spec"]["renewTime"] if leases else None

    try:
        assert informer.synced.wait(5)
        store.acquire_lease("slot-0", "gw1", 3.0)
        assert wait_until(lambda: renew_time() is not None)
        assert loop._poke.is_set()  # a new holder
        for step in range(3):
            loop._poke.clear()
            before = renew_time()
            clock.now += 1.0
            store.acquire_lease("slot-0", "gw1", 3.0)
            assert wait_until(lambda b=before: renew_time() != b)
            assert not loop._poke.is_set(), f"renewal {step + 1} poked the loop"
        before = renew_time()
        clock.now += 10.0  # the lease expired before this renewal: readers saw no holder
        store.acquire_lease("slot-0", "gw1", 3.0)
        assert wait_until(lambda: renew_time() != before)
        assert wait_until(loop._poke.is_set)
        loop._poke.clear()
        clock.now += 10.0
        store.acquire_lease("slot-0", "gw2", 3.0)  # taken over
        assert wait_until(loop._poke.is_set)
    finally:
        informer.stop()
        store.close()
