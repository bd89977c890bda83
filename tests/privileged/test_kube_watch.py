"""Watches of the `kube` backend through what breaks them in a real cluster: an API server
restart and a 410 Gone after etcd compaction, with the watch cache on (as in production:
old versions are served from the cache, and a restarted cache starts later than the
watch) and off (watches go to etcd itself). Either the watch resumes from the last version
it saw, or it ends in `Expired` and the informer lists again; in every case the informer's
cache ends equal to the API server's, and no event reaches it twice.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from meshgress.datastore import Expired, Kind, WatchEvent
from meshgress.datastore.informer import Informer
from meshgress.datastore.kube import KubeDatastore
from tests.datastore_contract import Watcher, gateway, node, rv, wait_for
from tests.privileged.kube_fixtures import KubeCluster, kube, kube_cluster

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

__all__ = ["kube"]


@pytest.fixture(scope="module")
def kube_without_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    with kube_cluster("nocache", logs=tmp_path_factory.mktemp("kube-nocache-logs"),
                      watch_cache=False) as cluster:
        yield cluster


class RecordingStore:
    """A store that keeps every watch event it hands out (to prove none is handed out
    twice), and otherwise is the store it wraps."""

    def __init__(self, store: KubeDatastore) -> None:
        self._store = store
        self.delivered: list[WatchEvent] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def watch(self, *args: Any, **kwargs: Any) -> Iterator[WatchEvent]:
        for event in self._store.watch(*args, **kwargs):
            if event.type != "BOOKMARK":
                self.delivered.append(event)
            yield event


def never_twice(events: list[WatchEvent]) -> None:
    seen = [(e.kind, e.object["metadata"]["name"], e.resource_version) for e in events
            if e.type != "BOOKMARK"]
    assert len(seen) == len(set(seen)), "an event was delivered twice"


def converged(informer: Informer, store: KubeDatastore, kind: Kind, prefix: str) -> bool:
    cached = sorted(n for _, n in informer.snapshot() if n.startswith(prefix))
    listed = sorted(o["metadata"]["name"] for o in store.list(kind).items
                    if o["metadata"]["name"].startswith(prefix))
    return cached == listed


def test_restart_with_the_watch_cache_ends_in_expired_and_the_informer_relists(
        kube: KubeCluster) -> None:
    watching, writing = kube.store(), kube.store(retry_budget=90)
    recording = RecordingStore(watching)
    informer = Informer(recording, Kind.NODE, on_change=lambda: None,  # type: ignore[arg-type]
                        max_backoff=0.5)
    try:
        for i in range(3):
            writing.create(node(f"cache-{i}"))
        informer.start()
        assert informer.synced.wait(30)
        raw = Watcher(watching, {Kind.NODE}, watching.list(Kind.NODE).resource_version)
        last = rv(writing.create(node("cache-3")))
        assert wait_for(lambda: any(e.resource_version == last for e in raw.events))

        kube.plane.restart_apiserver()
        for i in range(4, 7):
            writing.create(node(f"cache-{i}"))
        writing.delete(Kind.NODE, "cache-0")

        # The restarted cache starts at etcd's revision, past the watch's: 410.
        assert wait_for(lambda: raw.error is not None, timeout=60)
        assert isinstance(raw.error, Expired)
        raw.close()
        assert wait_for(lambda: converged(informer, writing, Kind.NODE, "cache-"), timeout=60)
        assert informer.relists >= 2
        never_twice(recording.delivered)
        never_twice(raw.events)
    finally:
        informer.stop()
        watching.close()
        writing.close()


def test_compaction_with_the_watch_cache_is_served_from_the_cache(kube: KubeCluster) -> None:
    store = kube.store()
    try:
        old = store.list(Kind.EGRESS_GATEWAY).resource_version
        made = [rv(store.create(gateway(f"compacted-{i}", f"203.0.113.{70 + i}")))
                for i in range(3)]
        assert kube.plane.compact_etcd() > old + 1
        watcher = Watcher(store, {Kind.EGRESS_GATEWAY}, old)
        try:
            assert wait_for(lambda: len(watcher.changes()) >= 3 or watcher.error is not None)
        finally:
            watcher.close()
        assert watcher.error is None
        assert [e.resource_version for e in watcher.changes()][:3] == made
    finally:
        store.close()


def test_without_the_watch_cache_a_watch_resumes_across_a_restart(
        kube_without_cache: KubeCluster) -> None:
    cluster = kube_without_cache
    watching, writing = cluster.store(), cluster.store(retry_budget=90)
    try:
        start = watching.list(Kind.NODE).resource_version
        watcher = Watcher(watching, {Kind.NODE}, start)
        made = [rv(writing.create(node(f"resume-{i}"))) for i in range(3)]
        assert wait_for(lambda: len(watcher.changes()) >= 3)
        cluster.plane.restart_apiserver()
        made += [rv(writing.create(node(f"resume-{i}"))) for i in range(3, 6)]
        assert wait_for(lambda: len(watcher.changes()) >= 6 or watcher.error is not None,
                        timeout=60)
        watcher.close()
        assert watcher.error is None
        assert [e.resource_version for e in watcher.changes()] == made
        never_twice(watcher.events)
    finally:
        watching.close()
        writing.close()


def test_without_the_watch_cache_compaction_gives_410_and_the_informer_relists(
        kube_without_cache: KubeCluster) -> None:
    cluster = kube_without_cache
    watching, writing = cluster.store(), cluster.store(retry_budget=90)
    recording = RecordingStore(watching)
    informer = Informer(recording, Kind.EGRESS_POLICY,  # type: ignore[arg-type]
                        on_change=lambda: None, max_backoff=0.5)
    policy: dict[str, Any] = {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
                              "spec": {"gateway": "gw", "namespaceSelector": {}}}
    try:
        writing.create({**policy, "metadata": {"name": "gone-0"}})
        informer.start()
        assert informer.synced.wait(30)
        old = writing.list(Kind.EGRESS_POLICY).resource_version
        for i in range(3):  # other kinds move etcd's revision past the informer's
            writing.create(node(f"gone-filler-{i}"))
        assert cluster.plane.compact_etcd() > old + 1

        # A watch from before the compaction: the 410 comes as an ERROR event in the stream.
        with pytest.raises(Expired, match=r"compacted|too old"):
            next(iter(watching.watch(frozenset({Kind.EGRESS_POLICY}), old,
                                     stop=threading.Event())))

        # The informer's own watch breaks with the restart and resumes from `old`: 410.
        relists = informer.relists
        cluster.plane.restart_apiserver()
        writing.create({**policy, "metadata": {"name": "gone-1"}})
        writing.delete(Kind.EGRESS_POLICY, "gone-0")
        assert wait_for(lambda: converged(informer, writing, Kind.EGRESS_POLICY, "gone-"),
                        timeout=60)
        assert wait_for(lambda: informer.relists > relists, timeout=30)
        never_twice(recording.delivered)
    finally:
        informer.stop()
        watching.close()
        writing.close()


def test_a_dead_connection_cannot_hang_a_watch(kube: KubeCluster) -> None:
    """The API server frozen (SIGSTOP): its connections stay open and silent, as a dead
    peer's would, and the server's own timeout cannot end the watch. The client's read
    timeout does; the watch is opened again and, once the server is back, goes on."""
    watching = kube.store(watch_timeout_range=(2, 2), watch_read_slack=1.0)
    writing = kube.store(retry_budget=30)
    apiserver = kube.plane.pids()["kube-apiserver"]
    try:
        watcher = Watcher(watching, {Kind.NODE}, watching.list(Kind.NODE).resource_version)
        os.kill(apiserver, signal.SIGSTOP)
        try:
            # Read timeout 3 s: at least one reopen (refused reads, then reopen attempts).
            assert wait_for(lambda: watching.watch_reopens >= 1, timeout=15)
        finally:
            os.kill(apiserver, signal.SIGCONT)
        made = rv(writing.create(node("after-freeze")))
        assert wait_for(lambda: any(e.resource_version == made for e in watcher.changes())
                        or watcher.error is not None, timeout=30)
        watcher.close()
        assert watcher.error is None
    finally:
        watching.close()
        writing.close()
