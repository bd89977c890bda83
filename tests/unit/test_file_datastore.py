"""The `file` datastore: Kubernetes semantics on a directory shared by several processes.

Concurrency is tested with real processes (subprocesses running WORKER), because flock and
atomic renames are what make the store safe between processes, and threads would not
exercise them the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgress.datastore import (
    Expired,
    Invalid,
    Kind,
    NotFound,
    WatchEvent,
)
from meshgress.datastore.file import FileDatastore

# A broken watch blocks in next(); fail instead of hanging the run.
pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0

# A worker process. argv[1] is a JSON job; it prints "ready", then does the job.
WORKER = r'''
import json, random, sys
from pathlib import Path
from meshgress.datastore import Conflict, Kind, LeaseHeld
from meshgress.datastore.file import FileDatastore

job = json.loads(sys.argv[1])
store = FileDatastore(Path(job["root"]), journal_limit=job.get("journal_limit", 10000))
print("ready", flush=True)
op = job["op"]
me = job.get("me", "")

if op == "patch_increment":
    sys.stdin.readline()
    key = f"count-{me}"
    for i in range(job["n"]):
        annotations = store.get(Kind.NODE, "counter")["metadata"].get("annotations", {})
        store.patch_annotations(Kind.NODE, "counter",
                                {key: str(int(annotations.get(key, "0")) + 1)})
    print("done", flush=True)

elif op == "cas_increment":
    sys.stdin.readline()
    conflicts = 0
    for _ in range(job["n"]):
        while True:
            node = store.get(Kind.NODE, "counter")
            node["spec"]["count"] += 1
            try:
                store.replace(node)
                break
            except Conflict:
                conflicts += 1
    print(json.dumps({"conflicts": conflicts}), flush=True)

elif op == "rewrite_big":
    for v in range(1, job["n"] + 1):
        node = store.get(Kind.NODE, "big")
        node["metadata"]["labels"] = {f"key-{i:05d}": f"v{v}-{'x' * 40}"
                                      for i in range(job["labels"])}
        node["metadata"]["annotations"] = {"version": str(v)}
        store.replace(node)
    print("done", flush=True)

elif op == "mixed":
    rng = random.Random(job["seed"])
    kinds = [Kind.NODE, Kind.POD, Kind.EGRESS_GATEWAY, Kind.NAMESPACE]
    live = {k: [] for k in kinds}
    log = []
    serial = 0
    while len(log) < job["n"]:
        kind = rng.choice(kinds)
        names = live[kind]
        choice = rng.random()
        ns = {"namespace": "team-a"} if kind is Kind.POD else {}
        if not names or choice < 0.4:
            serial += 1
            name = f"{kind.value.lower()}-{serial}"
            obj = store.create({"kind": kind.value, "metadata": {"name": name, **ns},
                                "spec": {"n": 0}})
            names.append(name)
            log.append(["ADDED", kind.value, name, int(obj["metadata"]["resourceVersion"])])
        elif choice < 0.8:
            name = rng.choice(names)
            obj = store.get(kind, name, ns.get("namespace", ""))
            obj["spec"]["n"] += 1
            obj = store.replace(obj)
            log.append(["MODIFIED", kind.value, name, int(obj["metadata"]["resourceVersion"])])
        else:
            name = names.pop(rng.randrange(len(names)))
            store.delete(kind, name, ns.get("namespace", ""))
            log.append(["DELETED", kind.value, name, None])
    print(json.dumps(log), flush=True)

elif op == "lease_race":
    for line in sys.stdin:
        round_ = line.strip()
        try:
            store.acquire_lease(f"race-{round_}", me, 30.0)
            print(f"won {round_}", flush=True)
        except LeaseHeld:
            print(f"held {round_}", flush=True)
'''


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[FileDatastore]:
    s = FileDatastore(tmp_path / "store", poll_interval=0.01, clock=clock)
    yield s
    s.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(job: dict[str, Any]) -> subprocess.Popen[str]:
        job = {"root": str(tmp_path / "store"), **job}
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(job)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def node(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name}, "spec": dict(spec)}


def pod(name: str, namespace: str = "team-a", node_name: str = "n1") -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node_name}}


def journal(store: FileDatastore) -> list[dict[str, Any]]:
    lines = (store.root / "journal.jsonl").read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line.endswith(b"}")]


def collect(it: Iterator[WatchEvent], n: int) -> list[WatchEvent]:
    return [next(it) for _ in range(n)]


# CRUD and metadata


def test_create_sets_metadata_and_lays_out_files(store: FileDatastore) -> None:
    created = store.create(node("n1", podCIDR="10.0.1.0/24"))
    meta = created["metadata"]
    assert created["apiVersion"] == "v1"
    assert meta["resourceVersion"] == "1"
    assert meta["generation"] == 1
    assert meta["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert len(meta["uid"]) == 36
    assert store.get(Kind.NODE, "n1") == created

    store.create(pod("p1"))
    assert (store.root / "objects/Node/n1.yaml").is_file()
    assert (store.root / "objects/Pod/team-a/p1.yaml").is_file()
    assert (store.root / "revision").read_text().strip() == "2"
    assert [(e["rv"], e["type"], e["kind"], e["object"]["metadata"]["name"])
            for e in journal(store)] == [(1, "ADDED", "Node", "n1"), (2, "ADDED", "Pod", "p1")]
    on_disk = yaml.safe_load((store.root / "objects/Node/n1.yaml").read_text())
    assert on_disk == created


def test_replace_generation_and_status_rules(store: FileDatastore) -> None:
    created = store.create({**node("n1", a=1), "status": {"ready": True}})
    assert created["status"] == {"ready": True}

    labelled = store.get(Kind.NODE, "n1")
    labelled["metadata"]["labels"] = {"zone": "a"}
    labelled["status"] = {"ready": False}  # replace keeps the stored status
    r1 = store.replace(labelled)
    assert r1["metadata"]["generation"] == 1
    assert r1["metadata"]["resourceVersion"] == "2"
    assert r1["status"] == {"ready": True}
    assert r1["metadata"]["uid"] == created["metadata"]["uid"]
    assert r1["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]

    r2 = store.replace(node("n1", a=2))  # no resourceVersion: unconditional
    assert r2["metadata"]["generation"] == 2
    assert r2["metadata"]["resourceVersion"] == "3"
    assert "labels" not in r2["metadata"]

    s = store.patch_status(Kind.NODE, "n1", {"ready": False})
    assert s["status"] == {"ready": False}
    assert s["metadata"]["generation"] == 2
    a = store.patch_annotations(Kind.NODE, "n1", {"x": "1", "y": "2"})
    assert a["metadata"]["annotations"] == {"x": "1", "y": "2"}
    assert a["metadata"]["generation"] == 2
    a = store.patch_annotations(Kind.NODE, "n1", {"x": None, "z": "3"})
    assert a["metadata"]["annotations"] == {"y": "2", "z": "3"}
    assert a["metadata"]["resourceVersion"] == "6"


def test_apply_creates_then_overwrites(store: FileDatastore) -> None:
    created = store.apply({**node("n1", a=1), "status": {"s": 1}})
    assert created["status"] == {"s": 1}
    assert created["metadata"]["generation"] == 1
    stale = dict(created, metadata={**created["metadata"], "resourceVersion": "999"})
    updated = store.apply({**stale, "spec": {"a": 2}, "status": {"s": 2}})
    assert updated["spec"] == {"a": 2}
    assert updated["status"] == {"s": 1}
    assert updated["metadata"]["generation"] == 2
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]


def test_a_write_that_changes_nothing_is_not_stored(store: FileDatastore) -> None:
    store.apply(node("n1", a=1))
    again = store.apply(node("n1", a=1))
    assert again["metadata"]["resourceVersion"] == "1"
    store.patch_annotations(Kind.NODE, "n1", {"absent": None})
    assert store.list(Kind.NODE).resource_version == 1
    assert len(journal(store)) == 1


def test_delete_journals_the_last_state_at_the_new_revision(store: FileDatastore) -> None:
    store.create(node("n1", a=1))
    store.delete(Kind.NODE, "n1")
    assert not (store.root / "objects/Node/n1.yaml").exists()
    entry = journal(store)[-1]
    assert (entry["rv"], entry["type"]) == (2, "DELETED")
    assert entry["object"]["spec"] == {"a": 1}
    assert entry["object"]["metadata"]["resourceVersion"] == "2"
    with pytest.raises(NotFound):
        store.get(Kind.NODE, "n1")


@pytest.mark.parametrize("name", ["../x", "", "a/b", "..", ".", "/etc", "A", "-a", "a_b",
                                  "x" * 251], ids=lambda n: repr(n)[:12])
def test_invalid_names_are_rejected_everywhere(store: FileDatastore, name: str) -> None:
    with pytest.raises(Invalid):
        store.create(node(name))
    with pytest.raises(Invalid):
        store.create(pod(name))
    with pytest.raises(Invalid):
        store.get(Kind.NODE, name)
    with pytest.raises(Invalid):
        store.delete(Kind.NODE, name)
    with pytest.raises(Invalid):
        store.create(pod("p", namespace=name))
    with pytest.raises(Invalid):
        store.acquire_lease(name, "me", 1.0)
    assert sorted(p.name for p in store.root.iterdir()) == [
        "journal.jsonl", "lock", "objects", "revision"]
    assert journal(store) == []


def test_longest_name_the_file_system_allows_is_accepted(store: FileDatastore) -> None:
    store.create(node("x" * 250))
    assert store.get(Kind.NODE, "x" * 250)["metadata"]["name"] == "x" * 250


def test_list_is_sorted_filtered_and_at_the_current_revision(store: FileDatastore) -> None:
    store.create(pod("b", "ns2", node_name="n1"))
    store.create(pod("a", "ns2", node_name="n2"))
    store.create(pod("z", "ns1", node_name="n1"))
    store.create(node("n1"))
    result = store.list(Kind.POD)
    assert [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in result.items] == [
        ("ns1", "z"), ("ns2", "a"), ("ns2", "b")]
    assert result.resource_version == 4
    assert [p["metadata"]["name"] for p in store.list(Kind.POD, namespace="ns2").items] == [
        "a", "b"]
    assert [p["metadata"]["name"]
            for p in store.list(Kind.POD, field_node_name="n1").items] == ["z", "b"]
    assert store.list(Kind.POD, namespace="empty").items == ()
    assert store.list(Kind.EGRESS_POLICY).items == ()
    with pytest.raises(Invalid):
        store.list(Kind.NODE, field_node_name="n1")
    with pytest.raises(Invalid):
        store.list(Kind.NODE, namespace="ns1")


# Concurrency between processes


def test_patch_annotations_from_two_processes_loses_no_update(
        store: FileDatastore, spawn: Any) -> None:
    store.create(node("counter"))
    # Each process increments its own counter annotation, reading it back from the store
    # every time. patch_annotations merges inside the store; a merge from a stale read
    # would put the other process's counter back, and that process would carry on from
    # the old value: an increment lost for good.
    workers = [spawn({"op": "patch_increment", "n": 200, "me": me}) for me in ("a", "b")]
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in workers:
        assert w.stdout.readline().strip() == "done"
        assert w.wait(timeout=30) == 0
    annotations = store.get(Kind.NODE, "counter")["metadata"]["annotations"]
    assert int(annotations["count-a"]) + int(annotations["count-b"]) == 400
    assert annotations == {"count-a": "200", "count-b": "200"}
    assert store.list(Kind.NODE).resource_version == 401


def test_compare_and_swap_from_two_processes_loses_no_update(
        store: FileDatastore, spawn: Any) -> None:
    store.create(node("counter", count=0))
    workers = [spawn({"op": "cas_increment", "n": 150}) for _ in range(2)]
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    results = [json.loads(w.stdout.readline()) for w in workers]
    for w in workers:
        assert w.wait(timeout=30) == 0
    assert store.get(Kind.NODE, "counter")["spec"]["count"] == 300
    # Every write is one increment, retried ones included.
    assert store.list(Kind.NODE).resource_version == 301
    assert all(r["conflicts"] >= 0 for r in results)


def test_readers_never_see_a_torn_object(tmp_path: Path, spawn: Any) -> None:
    store = FileDatastore(tmp_path / "store", journal_limit=6)
    store.create({**node("big"), "metadata": {"name": "big", "annotations": {"version": "0"}}})
    path = store.root / "objects/Node/big.yaml"
    labels = 4000  # about 200 KB of YAML
    writer = spawn({"op": "rewrite_big", "n": 15, "labels": labels, "journal_limit": 6})
    seen: set[str] = set()
    reads = 0

    def check(obj: dict[str, Any]) -> None:
        version = obj["metadata"]["annotations"]["version"]
        values = set((obj["metadata"].get("labels") or {}).values())
        if version == "0":
            assert values == set()
        else:
            assert values == {f"v{version}-{'x' * 40}"}
            assert len(obj["metadata"]["labels"]) == labels
        seen.add(version)

    def check_raw(data: bytes) -> None:
        # The file itself, read without the store and without parsing (so the reader
        # samples often): it is only ever replaced whole.
        match = re.search(rb"version: '(\d+)'", data)
        assert match is not None, f"no version in {len(data)} bytes"
        version = match.group(1).decode()
        expected = 0 if version == "0" else labels
        assert data.count(b"key-") == expected
        assert data.count(f": v{version}-".encode()) == expected
        assert data.endswith(b"\n")
        seen.add(version)

    while writer.poll() is None:
        check_raw(path.read_bytes())
        reads += 1
        if reads % 50 == 0:
            check(store.get(Kind.NODE, "big"))
    assert writer.returncode == 0
    check(store.get(Kind.NODE, "big"))
    check(yaml.load(path.read_bytes(), Loader=yaml.CSafeLoader))
    assert "15" in seen
    assert len(seen) >= 5, f"the reader only saw versions {seen} in {reads} reads"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_watch_sees_every_change_of_its_kinds_in_order(store: FileDatastore,
                                                         spawn: Any) -> None:
    store.create(node("before"))
    start = store.list(Kind.NODE).resource_version
    wanted = frozenset({Kind.NODE, Kind.POD, Kind.EGRESS_GATEWAY})
    stop = threading.Event()
    events: list[WatchEvent] = []

    def run() -> None:
        for event in store.watch(wanted, start, stop=stop):
            events.append(event)

    watcher = threading.Thread(target=run)
    watcher.start()
    try:
        writer = spawn({"op": "mixed", "n": 300, "seed": 7})
        made = json.loads(writer.stdout.readline())
        assert writer.wait(timeout=30) == 0
        entries = [e for e in journal(store) if e["rv"] > start]
        assert len(entries) == 300
        expected = [(e["type"], e["kind"], e["object"]["metadata"]["name"], e["rv"])
                    for e in entries if e["kind"] in wanted]
        deadline = time.monotonic() + 10
        while (not events or events[-1].resource_version < expected[-1][3]) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert not watcher.is_alive()
    got = [(e.type, e.kind.value, e.object["metadata"]["name"], e.resource_version)
           for e in events if e.type != "BOOKMARK"]
    assert got == expected
    # The journal is what the writer did, in the order it did it.
    assert [(t, k, n) for t, k, n, _ in made] == [
        (e["type"], e["kind"], e["object"]["metadata"]["name"]) for e in entries]
    assert [rv for *_, rv in made if rv is not None] == [
        e["rv"] for e in entries if e["type"] != "DELETED"]
    skipped = [e for e in entries if e["kind"] not in wanted]
    assert skipped, "the mix should include an unwatched kind"
    assert {e.type for e in events} <= {"ADDED", "MODIFIED", "DELETED"}
    assert {"ADDED", "MODIFIED", "DELETED"} <= {t for t, *_ in got}


# Watch: history, compaction, bookmarks, stopping


def test_watch_from_a_compacted_revision_is_expired(tmp_path: Path) -> None:
    store = FileDatastore(tmp_path / "s", journal_limit=10, poll_interval=0.01)
    for i in range(30):
        store.create(node(f"n{i}"))
    lines = journal(store)
    assert 5 <= len(lines) <= 10
    first = lines[0]["rv"]
    with pytest.raises(Expired):
        next(store.watch(frozenset({Kind.NODE}), first - 2))
    # The oldest kept change is still deliverable.
    event = next(store.watch(frozenset({Kind.NODE}), first - 1))
    assert event.resource_version == first


def test_watch_continues_across_a_compaction_it_survives(tmp_path: Path) -> None:
    store = FileDatastore(tmp_path / "s", journal_limit=10, poll_interval=0.01)
    for i in range(3):
        store.create(node(f"n{i}"))
    it = store.watch(frozenset({Kind.NODE}), 0)
    seen = [e.resource_version for e in collect(it, 3)]
    inode = (store.root / "journal.jsonl").stat().st_ino
    for i in range(3, 15):  # compaction at rv 11 keeps 7..11
        store.create(node(f"n{i}"))
    assert (store.root / "journal.jsonl").stat().st_ino != inode
    seen += [e.resource_version for e in collect(it, 12)]
    store.create(node("late"))
    seen.append(next(it).resource_version)
    assert seen == list(range(1, 17))


def test_watch_tailing_a_replaced_journal_expires_when_history_is_gone(
        tmp_path: Path) -> None:
    store = FileDatastore(tmp_path / "s", journal_limit=10, poll_interval=0.01)
    for i in range(3):
        store.create(node(f"n{i}"))
    it = store.watch(frozenset({Kind.NODE}), 0)
    seen = [e.resource_version for e in collect(it, 3)]
    for i in range(3, 30):  # compacted at 11, 17, 23, 29: the oldest kept is 25
        store.create(node(f"n{i}"))
    with pytest.raises(Expired):
        while True:
            seen.append(next(it).resource_version)
    # What it delivered before expiring was the complete history up to the first compaction.
    assert seen == list(range(1, 12))


def test_watch_waits_for_a_future_revision(store: FileDatastore) -> None:
    store.create(node("n0"))
    it = store.watch(frozenset({Kind.NODE}), 3)
    for i in range(1, 5):
        store.create(node(f"n{i}"))
    event = next(it)
    assert (event.type, event.resource_version, event.object["metadata"]["name"]) == (
        "ADDED", 4, "n3")


def test_bookmarks_while_idle_carry_the_latest_revision(store: FileDatastore) -> None:
    store.create(node("n1"))
    it = store.watch(frozenset({Kind.POD}), 1, bookmark_interval=0.05)
    t = time.monotonic()
    first = next(it)
    assert time.monotonic() - t >= 0.04
    assert (first.type, first.object, first.resource_version, first.kind) == (
        "BOOKMARK", {}, 1, Kind.POD)
    store.create(node("n2"))  # not watched, but it moves the revision
    second = next(it)
    assert (second.type, second.resource_version) == ("BOOKMARK", 2)
    store.create(pod("p1"))
    assert next(it).type == "ADDED"


# Leases


def test_two_processes_racing_for_a_free_lease_one_wins(tmp_path: Path, spawn: Any) -> None:
    workers = {me: spawn({"op": "lease_race", "me": me}) for me in ("a", "b")}
    rounds = 20
    winners = []
    for r in range(rounds):
        for w in workers.values():
            w.stdin.write(f"{r}\n")
            w.stdin.flush()
        answers = {me: w.stdout.readline().split() for me, w in workers.items()}
        assert {a[1] for a in answers.values()} == {str(r)}
        won = [me for me, a in answers.items() if a[0] == "won"]
        assert len(won) == 1, answers
        winners.append(won[0])
    for w in workers.values():
        w.stdin.close()
        assert w.wait(timeout=10) == 0
    check = FileDatastore(tmp_path / "store")
    for r, winner in enumerate(winners):
        lease = check.get_lease(f"race-{r}")
        assert lease is not None
        assert (lease.holder, lease.transitions) == (winner, 0)


# Leftovers of a crashed writer


def test_stale_temp_files_are_ignored_and_cleaned(store: FileDatastore) -> None:
    store.create(node("n1"))
    stale = store.root / "objects/Node/.tmp-abc123"
    stale.write_text("apiVersion: v1\nkind: No")  # half-written, never renamed
    whole = store.root / "objects/Node/.tmp-n2.yaml"
    whole.write_text(yaml.safe_dump(node("n2")))  # written, never renamed
    (store.root / ".tmp-revision").write_text("9")
    assert [n["metadata"]["name"] for n in store.list(Kind.NODE).items] == ["n1"]
    assert store.get(Kind.NODE, "n1")["metadata"]["name"] == "n1"
    fresh = FileDatastore(store.root)  # a restarted process sweeps every directory
    fresh.create(pod("p1"))
    assert not stale.exists()
    assert not whole.exists()
    assert not (store.root / ".tmp-revision").exists()
    assert store.list(Kind.NODE).resource_version == 2


def test_a_journal_fragment_without_newline_is_ignored_then_dropped(
        store: FileDatastore) -> None:
    store.create(node("n1"))
    with open(store.root / "journal.jsonl", "ab") as f:
        f.write(b'{"rv": 2, "type": "ADDED", "kind": "Node", "obj')
    assert store.list(Kind.NODE).resource_version == 1
    it = store.watch(frozenset({Kind.NODE}), 0)
    assert next(it).resource_version == 1
    created = store.create(node("n2"))
    assert created["metadata"]["resourceVersion"] == "2"
    event = next(it)
    assert (event.resource_version, event.object["metadata"]["name"]) == (2, "n2")
    assert [e["rv"] for e in journal(store)] == [1, 2]
    assert (store.root / "journal.jsonl").read_bytes().endswith(b"}\n")


def test_a_write_interrupted_after_its_journal_line_is_completed(
        store: FileDatastore) -> None:
    created = store.create(node("n1", a=1))
    # A writer that died right after committing rv 2 to the journal.
    crashed = json.loads(json.dumps(created))
    crashed["spec"] = {"a": 2}
    crashed["metadata"]["resourceVersion"] = "2"
    with open(store.root / "journal.jsonl", "ab") as f:
        f.write(json.dumps({"rv": 2, "type": "MODIFIED", "kind": "Node",
                            "object": crashed}).encode() + b"\n")
    assert store.get(Kind.NODE, "n1")["spec"] == {"a": 1}
    store.create(node("n2"))
    assert store.get(Kind.NODE, "n1")["spec"] == {"a": 2}
    assert store.get(Kind.NODE, "n2")["metadata"]["resourceVersion"] == "3"
    assert [e["rv"] for e in journal(store)] == [1, 2, 3]
