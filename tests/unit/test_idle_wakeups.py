"""Threads of an idle agent or gateway sleep until something arrives: none wakes up on a
timer to look for work (the informers' watches, the metrics server, the probe responder,
the prober with no slot to probe). Counted as the thread's voluntary context switches
(/proc/self/task/<tid>/status): a thread blocked with no timeout adds none, whatever the
machine's load; one polling every 50-500 ms adds several in the window."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from gateway.probe import ProbeResponder
from meshgress import prometheus
from meshgress.datastore import Kind, WatchStop
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.informer import Informer
from nodeagent.prober import SlotProber

WINDOW = 1.5
MOST = 1
"""Wake-ups a sleeping thread may show in the window (one that was on its way to sleep
when the window began)."""


def switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


def thread_named(name: str, after: set[int]) -> threading.Thread:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for thread in threading.enumerate():
            if thread.name == name and thread.ident not in after:
                return thread
        time.sleep(0.01)
    raise AssertionError(f"no thread {name!r} started")


def wakeups(thread: threading.Thread) -> int:
    time.sleep(0.2)  # let it reach its wait
    before = switches(thread)
    time.sleep(WINDOW)
    return switches(thread) - before


def existing() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


def test_an_informer_sleeps_until_a_write_and_wakes_for_it(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=0.05)
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}})
    changed = threading.Event()
    before = existing()
    informer = Informer(store, Kind.NAMESPACE, on_change=changed.set).start()
    try:
        assert informer.synced.wait(5)
        thread = thread_named("informer-Namespace", before)
        assert wakeups(thread) <= MOST
        changed.clear()
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}})
        assert changed.wait(2)
    finally:
        informer.stop()
        store.close()


def test_a_watch_with_a_watch_stop_ends_at_once(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=60.0)
    stop = WatchStop()
    done = threading.Event()

    def follow() -> None:
        for _ in store.watch(frozenset({Kind.NODE}), 0, stop=stop, bookmark_interval=60.0):
            pass
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    stop.set()
    assert done.wait(2), "the watch did not end when its WatchStop was set"


def test_the_store_closing_ends_its_watches_at_once(tmp_path):
    store = FileDatastore(tmp_path, poll_interval=60.0)
    done = threading.Event()

    def follow() -> None:
        for _ in store.watch(frozenset({Kind.NODE}), 0, bookmark_interval=60.0):
            pass
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    store.close()
    assert done.wait(2), "the watch did not end when its store closed"


def test_the_metrics_server_sleeps_until_asked_and_stops_at_once():
    stop = threading.Event()
    before = existing()
    server = prometheus.serve("127.0.0.1:0", lambda: "x 1\n",
                              lambda: {"live": True, "ready": True}, stop)
    thread = thread_named("metrics", before)
    assert wakeups(thread) <= MOST
    import urllib.request

    port = server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.read() == b"x 1\n"
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_the_probe_responder_sleeps_with_no_slot_held():
    before = existing()
    responder = ProbeResponder()
    try:
        assert wakeups(thread_named("probe", before)) <= MOST
    finally:
        responder.close()


def test_the_prober_sleeps_with_no_slot_to_probe():
    before = existing()
    prober = SlotProber("198.18.0.1", lambda: None).start()
    try:
        assert wakeups(thread_named("prober", before)) <= MOST
    finally:
        prober.stop()
