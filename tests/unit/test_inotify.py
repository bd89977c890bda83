"""inotify through ctypes: the record parser, a directory watcher that tells of appends and
renames, and one instance per process however many watches it has."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from meshgress.kernel.inotify import (
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    DirectoryWatcher,
    InotifyEvent,
    parse_events,
    shared_watcher,
)


def record(wd: int, mask: int, name: bytes = b"", cookie: int = 0, pad: int = 16) -> bytes:
    padded = name + b"\0" * (pad - len(name)) if name else b""
    return struct.pack("=iIII", wd, mask, cookie, len(padded)) + padded


def test_records_are_parsed_with_their_padded_names():
    data = (record(1, IN_MODIFY, b"journal.jsonl") + record(2, IN_IGNORED)
            + record(1, IN_MOVED_TO, b"x", cookie=7))
    assert parse_events(data) == [InotifyEvent(1, IN_MODIFY, 0, "journal.jsonl"),
                                  InotifyEvent(2, IN_IGNORED, 0, ""),
                                  InotifyEvent(1, IN_MOVED_TO, 7, "x")]


def test_a_truncated_record_is_left_out():
    whole = record(1, IN_MODIFY, b"a")
    assert parse_events(whole + whole[:20]) == [InotifyEvent(1, IN_MODIFY, 0, "a")]
    assert parse_events(b"") == []


def inotify_instances() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:inotify":
                count += 1
        except OSError:
            continue
    return count


@pytest.fixture
def watcher():
    w = DirectoryWatcher()
    yield w
    w.close()


def test_appends_and_renames_of_a_watched_name_call_back(tmp_path, watcher):
    seen = threading.Semaphore(0)
    other = threading.Semaphore(0)
    sub = watcher.subscribe(tmp_path, ("journal",), seen.release)
    watcher.subscribe(tmp_path, ("something-else",), other.release)
    with (tmp_path / "journal").open("ab") as f:
        f.write(b"line\n")
        f.flush()
    assert seen.acquire(timeout=5)
    (tmp_path / "tmp").write_bytes(b"compacted\n")
    while seen.acquire(timeout=0.2):  # the write's own events
        pass
    os.replace(tmp_path / "tmp", tmp_path / "journal")
    assert seen.acquire(timeout=5)
    assert not other.acquire(timeout=0.2)
    sub.cancel()
    assert watcher.subscriptions() == 1


def test_a_removed_directory_tells_its_subscribers(tmp_path, watcher):
    folder = tmp_path / "store"
    folder.mkdir()
    told = threading.Event()
    watcher.subscribe(folder, ("journal",), told.set)
    folder.rmdir()
    assert told.wait(5)


def test_an_overflow_tells_everyone(tmp_path, watcher):
    told = threading.Event()
    watcher.subscribe(tmp_path, ("journal",), told.set)
    watcher._dispatch([InotifyEvent(-1, IN_Q_OVERFLOW, 0, "")])
    assert told.is_set()


def test_a_missing_directory_is_an_error(tmp_path, watcher):
    with pytest.raises(OSError):
        watcher.subscribe(tmp_path / "absent", None, lambda: None)


def test_the_process_has_one_instance_for_all_its_watches(tmp_path):
    shared = shared_watcher()
    assert shared_watcher() is shared
    before = inotify_instances()
    folders = [tmp_path / str(i) for i in range(20)]
    subs = []
    for folder in folders:
        folder.mkdir()
        subs += [shared.subscribe(folder, ("journal",), lambda: None) for _ in range(3)]
    assert inotify_instances() == before
    for sub in subs:
        sub.cancel()
