"""Linux inotify through ctypes: learn that a file changed without polling it.

Why it exists: the file datastore's watchers must notice a new journal line at once, and
an idle process must not wake up to look for one (polling every 50 ms in each of a
process's informers cost more than everything else an idle agent does). Python's standard
library has no inotify, so this module calls libc's `inotify_init1`, `inotify_add_watch`
and `inotify_rm_watch` and parses what `read` returns.

The kernel caps inotify instances per user (`fs.inotify.max_user_instances`, 128 on the
project's machines) and a lab runs dozens of processes, each with several watchers (and
wireguard-go takes one per interface). So a process has one instance, with one thread,
for all its watches: `shared_watcher()`. Watches of the same directory share one kernel
watch (the kernel hands out the same descriptor for the same inode).

Directory watches only: a file replaced by rename (the journal's compaction) is a new
inode that a watch on the old file would never see, while the directory sees both the
appends (IN_MODIFY with the file's name) and the rename (IN_MOVED_TO).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

IN_MODIFY: Final = 0x00000002
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000

DIRECTORY_CHANGES: Final = (IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
                            | IN_DELETE_SELF | IN_MOVE_SELF)
"""What a directory watch asks for: any entry written, created, moved or removed, and the
directory itself going away."""

_EVENT: Final = struct.Struct("=iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_SIZE: Final = 64 * 1024


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str
    """The entry's name inside a watched directory ("" for the directory itself)."""


def parse_events(data: bytes) -> list[InotifyEvent]:
    """What one `read` of an inotify descriptor returned, as events. Purely computational;
    a truncated trailing record (which the kernel never produces) is ignored."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, cookie, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        if start + length > len(data):
            break
        raw = data[start:start + length].split(b"\0", 1)[0]
        events.append(InotifyEvent(wd, mask, cookie, os.fsdecode(raw)))
        offset = start + length
    return events


def _libc() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc: ask the linker (slower: it may run ldconfig)
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.inotify_init1.argtypes = [ctypes.c_int]
    lib.inotify_init1.restype = ctypes.c_int
    lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    lib.inotify_add_watch.restype = ctypes.c_int
    lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.inotify_rm_watch.restype = ctypes.c_int
    return lib


class Inotify:
    """One inotify instance (non-blocking, close-on-exec). OSError when the kernel refuses
    one (EMFILE: the user's instances are used up)."""

    def __init__(self) -> None:
        self._lib = _libc()
        fd = self._lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            hint = (" (fs.inotify.max_user_instances reached: every instance of this user "
                    "is in use)" if code == errno.EMFILE else "")
            raise OSError(code, f"inotify_init1: {os.strerror(code)}{hint}")
        self._fd = int(fd)

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        wd = self._lib.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch {os.fspath(path)}: {os.strerror(code)}")
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        """Stop watching; a watch the kernel already dropped (EINVAL) is not an error."""
        if self._lib.inotify_rm_watch(self._fd, wd) < 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:
                raise OSError(code, f"inotify_rm_watch: {os.strerror(code)}")

    def read(self) -> list[InotifyEvent]:
        """The events queued now ([] when there are none; never blocks)."""
        try:
            return parse_events(os.read(self._fd, _READ_SIZE))
        except BlockingIOError:
            return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


Callback = Callable[[], None]


class Subscription:
    """One caller's interest in some entries of a directory; `cancel` ends it."""

    def __init__(self, watcher: DirectoryWatcher, wd: int, names: frozenset[str] | None,
                 callback: Callback) -> None:
        self._watcher = watcher
        self.wd = wd
        self.names = names
        self.callback = callback

    def cancel(self) -> None:
        self._watcher._cancel(self)


class DirectoryWatcher:
    """Every directory watch of a process on one inotify instance and one thread.

    `subscribe(directory, names, callback)`: `callback()` runs on the watcher's thread
    whenever an entry named in `names` (None: any) of `directory` is written, created,
    moved or removed, when the directory itself goes, and when the kernel's queue
    overflowed (events may have been lost: everyone is told). Callbacks must be cheap and
    must not raise (set an Event, return). The thread blocks in poll(2) with no timeout:
    an idle process is never woken by it.
    """

    def __init__(self, inotify: Inotify | None = None) -> None:
        self._inotify = inotify if inotify is not None else Inotify()
        self._lock = threading.Lock()
        self._subscriptions: dict[int, list[Subscription]] = {}
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    def subscribe(self, directory: str | os.PathLike[str], names: Iterable[str] | None,
                  callback: Callback) -> Subscription:
        """Raises OSError when the directory cannot be watched (missing, or the user's
        fs.inotify.max_user_watches reached)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the directory watcher is closed")
            wd = self._inotify.add_watch(directory, DIRECTORY_CHANGES | IN_ONLYDIR)
            sub = Subscription(self, wd, frozenset(names) if names is not None else None,
                               callback)
            self._subscriptions.setdefault(wd, []).append(sub)
            return sub

    def _cancel(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subscriptions.get(sub.wd)
            if subs is None or sub not in subs:
                return
            subs.remove(sub)
            if not subs:
                del self._subscriptions[sub.wd]
                if not self._closed:
                    try:
                        self._inotify.remove_watch(sub.wd)
                    except OSError as exc:
                        log.debug("inotify: %s", exc)

    def subscriptions(self) -> int:
        with self._lock:
            return sum(len(subs) for subs in self._subscriptions.values())

    def close(self) -> None:
        """Stop the thread and release the instance (subscriptions are dropped)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_write, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._inotify.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            try:
                poller.poll()
            except InterruptedError:
                continue
            with self._lock:
                if self._closed:
                    return
            self._dispatch(self._inotify.read())

    def _dispatch(self, events: list[InotifyEvent]) -> None:
        due: dict[int, Subscription] = {}
        with self._lock:
            for event in events:
                if event.mask & IN_Q_OVERFLOW:
                    for subs in self._subscriptions.values():
                        due.update((id(s), s) for s in subs)
                    continue
                subs = self._subscriptions.get(event.wd, [])
                gone = bool(event.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF))
                due.update((id(s), s) for s in subs
                           if gone or s.names is None or event.name in s.names)
                if event.mask & IN_IGNORED:
                    # The kernel dropped the watch (the directory was removed): its
                    # subscribers were told above; a new subscribe makes a new watch.
                    self._subscriptions.pop(event.wd, None)
        for sub in due.values():
            try:
                sub.callback()
            except Exception:  # a subscriber's bug must not end everyone's watching
                log.exception("inotify subscriber failed")


_shared: dict[int, DirectoryWatcher] = {}
"""PID → that process's watcher (a forked child finds its parent's entry and makes its own)."""
_shared_lock = threading.Lock()


def shared_watcher() -> DirectoryWatcher:
    """This process's one DirectoryWatcher, made on first use (and anew in a forked
    child: the parent's thread does not exist there). OSError when the kernel gives this
    process no inotify instance; the next call tries again."""
    pid = os.getpid()
    with _shared_lock:
        watcher = _shared.get(pid)
        if watcher is None:
            _shared.clear()
            watcher = _shared[pid] = DirectoryWatcher()
        return watcher
