"""The deletion queue's pure parts: what the shim writes reads back as the same DEL, what
it does not write is rejected with a reason, and which files of the folder are replayed,
left alone or removed."""

from __future__ import annotations

import json

import pytest

from cni import protocol as p
from cni.deletion_queue import (
    STALE_WRITE_SECONDS,
    QueuedDelete,
    QueueEntryRejected,
    QueueFile,
    QueuePlan,
    parse_queue_entry,
    plan_queue,
)
from cni.model import AttachmentKey


def entry(container: str = "ctr1", ifname: str = "eth0", netns: str = "/run/netns/p",
          args: dict[str, str] | None = None) -> tuple[str, bytes]:
    return (p.compute_queue_entry_name(container, ifname),
            p.encode_queue_entry(container, ifname, netns, args or {}))


@pytest.mark.parametrize(
    ("container", "ifname", "netns", "args"),
    [
        ("ctr1", "eth0", "/run/netns/p", {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web"}),
        ("a" * p.MAX_CONTAINER_ID, "net1", "", {}),
        ("0a_b.c-d", "äö\"\\\x01", '/run/netns/"quoted"\n\udcff', {"K8S_POD_NAME": "ü"}),
    ],
    ids=["plain", "longest id, no netns", "quotes, escapes, not UTF-8"],
)
def test_what_the_shim_writes_reads_back_as_the_same_del(container, ifname, netns, args):
    name, data = entry(container, ifname, netns, args)
    assert name.startswith(p.QUEUE_ENTRY_PREFIX) and len(name) < 64
    assert len(data) <= p.MAX_QUEUE_ENTRY
    assert parse_queue_entry(name, data) == QueuedDelete(
        name, AttachmentKey(container, ifname), netns, args.get("K8S_POD_NAMESPACE", ""),
        args.get("K8S_POD_NAME", ""))


def test_entry_names_are_one_per_attachment():
    assert p.compute_queue_entry_name("c", "eth0") == p.compute_queue_entry_name("c", "eth0")
    names = {p.compute_queue_entry_name(c, i)
             for c, i in [("abc", "eth0"), ("abce", "th0"), ("abc", "eth1"), ("abd", "eth0")]}
    assert len(names) == 4


def _json(**fields: object) -> bytes:
    return json.dumps({"version": 1, "containerID": "ctr1", "ifname": "eth0", **fields}).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff{", "not JSON"),
        (b"{", "not JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b"[1]", "not a JSON object"),
        (b" " * (p.MAX_QUEUE_ENTRY + 1), "more than"),
        (_json(version=2), "version 2"),
        (_json(version=True), "version true"),
        (_json(containerID=["ctr1"]), "containerID is list"),
        (_json(netns=7), "netns is 7"),
        (_json(containerID="-ctr"), "invalid characters"),
        (_json(containerID=""), "CNI_CONTAINERID is empty"),
        (_json(ifname="way-too-long-name"), "longer than 15 bytes"),
        (_json(ifname="a/b"), "not a valid interface name"),
        (_json(netns="/" * 5000), "longer than"),
        (_json(podName="p" * 300), "K8S_POD_NAME is longer"),
    ],
    ids=["not utf-8", "cut short", "nested", "a list", "oversized", "other version",
         "bool version", "id a list", "netns a number", "bad id", "empty id", "long ifname",
         "slash in ifname", "long netns", "long pod name"],
)
def test_what_the_shim_does_not_write_is_rejected_with_a_reason(data, reason):
    with pytest.raises(QueueEntryRejected, match=reason):
        parse_queue_entry(p.compute_queue_entry_name("ctr1", "eth0"), data)


def test_an_entry_under_another_attachments_name_is_rejected():
    """The name is the attachment's: a DEL found under another one was not queued by the
    shim for it (and would defeat the one-entry-per-attachment bound)."""
    _, data = entry("ctr1")
    with pytest.raises(QueueEntryRejected, match="stored as"):
        parse_queue_entry(p.compute_queue_entry_name("ctr2", "eth0"), data)


def test_the_plan_replays_entries_oldest_first_and_removes_everything_else():
    files = [
        QueueFile("del-b", "file", 100, age=5),
        QueueFile("del-a", "file", 100, age=50),
        QueueFile("del-c", "file", 100, age=5),
        QueueFile("del-big", "file", p.MAX_QUEUE_ENTRY + 1, age=1),
        QueueFile("del-dir", "directory"),
        QueueFile("del-link", "symlink"),
        QueueFile("del-fifo", "other"),
        QueueFile(".del-x.1.tmp", "file", 10, age=1),
        QueueFile(".del-y.2.tmp", "file", 10, age=STALE_WRITE_SECONDS),
        QueueFile(".del-z.3.tmp", "symlink"),
        QueueFile("notes.txt", "file", 3),
    ]
    plan = plan_queue(files)
    assert plan.replay == ("del-a", "del-b", "del-c")
    assert [name for name, _ in plan.discard] == [
        ".del-y.2.tmp", ".del-z.3.tmp", "del-big", "del-dir", "del-fifo", "del-link",
        "notes.txt"]
    reasons = dict(plan.discard)
    assert "left unfinished" in reasons[".del-y.2.tmp"]
    assert "a directory" in reasons["del-dir"]
    assert "more than" in reasons["del-big"]
    assert plan_queue([]) == QueuePlan()
