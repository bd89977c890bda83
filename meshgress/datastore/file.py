"""The `file` datastore: the cluster's objects as YAML files in one directory.

The lab and single-machine users have no kube-apiserver, yet every meshgress process (node
agents, gateways, the CLI, tests) must share one view of the cluster with the semantics the
rest of the code relies on: one store-wide resource version, lists that are consistent
snapshots, watches that resume after a resource version or raise `Expired`, `Conflict` on a
stale replace, and leases that exactly one process can hold. This module gives those
semantics on a local directory, shared between processes through `fcntl.flock`.

On-disk layout under `root`:

    objects/<Kind>/<name>.yaml               a cluster-scoped object
    objects/<Kind>/<namespace>/<name>.yaml   a namespaced object (see NAMESPACED)
    journal.jsonl   append-only change log, one JSON line per write, oldest first:
                    {"rv": N, "type": "ADDED|MODIFIED|DELETED", "kind": "...", "object": {...}}
                    It holds the newest `journal_limit // 2` to `journal_limit` writes.
    revision        the last resource version whose object file has been written
    lock            flock'd: exclusive by every write, shared by `list`
    .tmp-*          a file being written; ignored by readers, removed by the next writer

A write, under the exclusive lock: repair what a crashed writer left (below), append the
journal line with one `write(2)` on an O_APPEND descriptor, write the object file (temp file,
fsync, rename) or unlink it, then write `revision`. The journal line is the commit point: a
writer killed after it but before the object file or `revision` is finished leaves the
journal one entry ahead of `revision`, and the next writer re-applies that entry (it is
idempotent) before its own. A journal ending in a partial line (a write cut short) is
truncated back to its last complete line. So resource versions are never reused or
skipped, and a watcher never misses a committed change.

A file that does not hold a readable object of its place (not YAML, not a mapping, or a
name, namespace or kind other than its path says) is corrupt: `list` leaves it out and
names it in `ListResult.rejected`, `get` raises Invalid naming the file, and `apply` or
`delete` through the store replace or remove it (journalled, so watchers learn of it).

Events (`record_event`) are Event objects in their namespace like any other; a repeat of
an Event bumps its series count. At most `event_limit` Events are kept: recording a new
one removes the least recently observed beyond that.

Readers: `get` reads one file without locking (an object file is only ever replaced by
rename, so it is whole); `list` holds the shared lock so it is one snapshot at one revision;
`watch` tails the journal with no lock at all, and reads only complete lines. It learns of
growth and compaction (a new inode) from inotify on the store's directory, through the one
inotify instance its process shares between all its watches (`meshgress.kernel.inotify`):
an idle watch sleeps until a write, its stop or its next bookmark. Where the kernel gives
the process no inotify instance, it looks (`stat`) every `poll_interval` instead, and logs
that it does.

Leases are coordination.k8s.io/v1 Lease objects in LEASE_NAMESPACE. Kubernetes types
`spec.leaseDurationSeconds` as an integer, while meshgress uses fractional durations, so the
store writes the duration rounded up there (an outside reader never thinks a lease expired
early) and the exact value in the annotation LEASE_DURATION_ANNOTATION, which it reads back.
acquireTime and renewTime are MicroTime strings (RFC 3339, microseconds, UTC), from the
injected clock.

The directory must be on a local file system (flock over NFS is not to be trusted). Object
files and journal lines are fsync'd; `revision` and directory entries are not, because the
journal lets the next writer rebuild them after a process crash. Durability across a power
cut is best effort.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

import yaml

from meshgress import kube_yaml
from meshgress.datastore import (
    API_VERSIONS,
    LEASE_DURATION_ANNOTATION,
    LEASE_NAMESPACE,
    NAMESPACED,
    AlreadyExists,
    Conflict,
    EventRecord,
    EventType,
    Expired,
    Invalid,
    Kind,
    Lease,
    LeaseHeld,
    ListResult,
    NotFound,
    Object,
    RejectedObject,
    WatchEvent,
    WatchStop,
    event_name,
    event_namespace,
    event_object,
    event_repeated,
    micro_time,
    object_key,
    parse_lease,
    wake_on_stop,
)
from meshgress.datastore.objects import (
    check_annotation_patch,
    check_lease_request,
    checked_annotation_keys,
    checked_namespace,
    describe,
    json_copy,
    prepare,
    released_lease,
)
from meshgress.datastore.objects import checked_kind as _kind
from meshgress.kernel.inotify import Subscription, shared_watcher
from meshgress.validation import dns1123_subdomain_problem

log = logging.getLogger(__name__)

_TMP_PREFIX: Final = ".tmp-"
_SUFFIX: Final = ".yaml"
# NAME_MAX (255) less ".yaml": Kubernetes allows 253, a file name cannot hold that many.
_MAX_NAME: Final = 255 - len(_SUFFIX)
# Journal lines are written by _encode_entry with this fixed key order, so rv, type and kind
# can be read without parsing the (possibly large) object.
_ENTRY_HEAD: Final = re.compile(rb'\{"rv": (\d+), "type": "([A-Z]+)", "kind": "([A-Za-z]+)"')
_CHUNK: Final = 1 << 20
_EVENT_TYPES: Final = frozenset({"ADDED", "MODIFIED", "DELETED"})

_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass
class _Writer:
    """The state of one write transaction: the journal descriptor and current revision."""

    journal_fd: int
    revision: int


class FileDatastore:
    """The `Datastore` protocol on a directory shared by several processes.

    Thread-safe: every call opens its own descriptors, and flock locks taken through
    separate descriptors exclude each other within one process as well as between processes.
    """

    def __init__(self, root: Path, *, journal_limit: int = 10000, poll_interval: float = 0.05,
                 clock: Callable[[], float] = time.time, event_limit: int = 1000) -> None:
        if journal_limit < 2:
            raise ValueError(f"journal_limit must be at least 2, got {journal_limit}")
        if event_limit < 1:
            raise ValueError(f"event_limit must be at least 1, got {event_limit}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self._root = Path(root)
        self._objects = self._root / "objects"
        self._journal = self._root / "journal.jsonl"
        self._revision_path = self._root / "revision"
        self._lock_path = self._root / "lock"
        self._journal_limit = journal_limit
        self._event_limit = event_limit
        self._poll_interval = poll_interval
        self._clock = clock
        self._closed = WatchStop()
        self._polling_reported = False
        self._swept = False
        # path -> (file bytes, parsed object). Keyed by the exact bytes, so it is never
        # stale; it saves the YAML parse (0.3 to 1 ms per KB even with libyaml) of a file
        # unchanged since this process last read or wrote it.
        self._parsed: dict[Path, tuple[bytes, Object]] = {}
        self._objects.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            os.close(os.open(self._journal, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            if not self._revision_path.exists():
                self._write_revision(0)

    @property
    def root(self) -> Path:
        return self._root

    # Reads

    def list(self, kind: Kind, *, namespace: str | None = None,
             field_node_name: str | None = None) -> ListResult:
        kind = _kind(kind)
        if field_node_name is not None and kind is not Kind.POD:
            raise Invalid(f"the spec.nodeName field selector applies to Pods, not {kind}")
        kind_dir = self._objects / kind.value
        if kind in NAMESPACED:
            dirs = [kind_dir / checked_namespace(namespace)] if namespace else None
        elif namespace:
            raise Invalid(f"{kind} is cluster-scoped; got namespace {namespace!r}")
        else:
            dirs = [kind_dir]
        items: list[Object] = []
        rejected: list[RejectedObject] = []
        with self._locked(exclusive=False):
            revision = self._read_revision()
            if dirs is None:
                dirs = [kind_dir / ns for ns in _visible_entries(kind_dir, dirs=True)]
            for directory in dirs:
                for file_name in _visible_entries(directory, dirs=False):
                    path = directory / file_name
                    try:
                        obj = self._read(path)
                    except _Corrupt as exc:
                        rejected.append(RejectedObject(
                            kind=kind, namespace=directory.name if kind in NAMESPACED else "",
                            name=file_name.removesuffix(_SUFFIX), source=str(path),
                            reason=exc.reason))
                        continue
                    if obj is not None:
                        items.append(obj)
        if field_node_name is not None:
            items = [o for o in items if (o.get("spec") or {}).get("nodeName") == field_node_name]
        items.sort(key=object_key)
        rejected.sort(key=lambda r: (r.namespace, r.name))
        return ListResult(items=tuple(items), resource_version=revision,
                          rejected=tuple(rejected))

    def get(self, kind: Kind, name: str, namespace: str = "") -> Object:
        kind = _kind(kind)
        obj = self._read(self._path(kind, namespace, name))
        if obj is None:
            raise NotFound(f"{describe(kind, namespace, name)} not found")
        return obj

    def watch(self, kinds: frozenset[Kind], resource_version: int, *,
              stop: threading.Event | None = None,
              bookmark_interval: float = 10.0,
              field_node_name: str | None = None) -> Iterator[WatchEvent]:
        wanted = frozenset(_kind(k) for k in kinds)
        if not wanted:
            raise Invalid("watch needs at least one kind")
        if field_node_name is not None and wanted != {Kind.POD}:
            raise Invalid("the spec.nodeName field selector applies to Pods only")
        if isinstance(resource_version, bool) or not isinstance(resource_version, int) \
                or resource_version < 0:
            raise Invalid(f"resource_version must be an integer >= 0, got {resource_version!r}")
        return self._watch(wanted, resource_version, stop, bookmark_interval, field_node_name)

    def get_lease(self, name: str) -> Lease | None:
        try:
            return parse_lease(self.get(Kind.LEASE, name, LEASE_NAMESPACE))
        except NotFound:
            return None

    # Writes

    def create(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        if new["metadata"].get("resourceVersion") not in (None, ""):
            raise Invalid("metadata.resourceVersion must not be set on create")
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            if self._read(path) is not None:
                raise AlreadyExists(f"{describe(kind, namespace, name)} already exists")
            self._stamp_new(new)
            return self._commit(w, "ADDED", kind, new, None)

    def replace(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        meta = new["metadata"]
        expected = meta.get("resourceVersion")
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            current = self._read(path)
            if current is None:
                raise NotFound(f"{describe(kind, namespace, name)} not found")
            cur_meta = current["metadata"]
            if expected not in (None, "") and str(expected) != cur_meta.get("resourceVersion"):
                raise Conflict(
                    f"{describe(kind, namespace, name)} was modified: resourceVersion "
                    f"{expected} is stale, the current one is {cur_meta.get('resourceVersion')}"
                )
            if meta.get("uid") and meta["uid"] != cur_meta.get("uid"):
                raise Conflict(
                    f"{describe(kind, namespace, name)} has uid {cur_meta.get('uid')}, "
                    f"not {meta['uid']}: it was deleted and created again"
                )
            _carry_over(new, current)
            return self._commit(w, "MODIFIED", kind, new, current)

    def apply(self, obj: Object) -> Object:
        new, kind, namespace, name = prepare(obj)
        new["metadata"].pop("resourceVersion", None)
        new["metadata"].pop("uid", None)
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            current = self._read_or_none_if_corrupt(path)
            if current is None:
                self._stamp_new(new)
                return self._commit(w, "ADDED", kind, new, None)
            _carry_over(new, current)
            return self._commit(w, "MODIFIED", kind, new, current)

    def delete(self, kind: Kind, name: str, namespace: str = "") -> None:
        kind = _kind(kind)
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            if not path.exists():
                raise NotFound(f"{describe(kind, namespace, name)} not found")
            current = self._read_or_none_if_corrupt(path)
            if current is None:
                # What watchers see go is what a list would have shown: nothing but the
                # object's identity.
                current = {"apiVersion": API_VERSIONS[kind], "kind": kind.value,
                           "metadata": {"name": name, **({"namespace": namespace}
                                                         if namespace else {})}}
            self._commit(w, "DELETED", kind, current, None)

    def patch_annotations(self, kind: Kind, name: str, annotations: Mapping[str, str | None],
                          namespace: str = "") -> Object:
        kind = _kind(kind)
        check_annotation_patch(annotations)
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            current = self._read(path)
            if current is None:
                raise NotFound(f"{describe(kind, namespace, name)} not found")
            new = copy.deepcopy(current)
            meta = new["metadata"]
            merged = dict(meta.get("annotations") or {})
            for key, value in annotations.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            if merged:
                meta["annotations"] = merged
            else:
                meta.pop("annotations", None)
            return self._commit(w, "MODIFIED", kind, new, current)

    def patch_status(self, kind: Kind, name: str, status: Mapping[str, Any],
                     namespace: str = "") -> Object:
        kind = _kind(kind)
        if not isinstance(status, Mapping):
            raise Invalid(f"status must be a mapping, got {type(status).__name__}")
        new_status = json_copy(dict(status))
        path = self._path(kind, namespace, name)
        with self._writing() as w:
            current = self._read(path)
            if current is None:
                raise NotFound(f"{describe(kind, namespace, name)} not found")
            new = copy.deepcopy(current)
            new["status"] = new_status
            return self._commit(w, "MODIFIED", kind, new, current)

    def acquire_lease(self, name: str, holder: str, duration_seconds: float) -> Lease:
        duration = check_lease_request(holder, duration_seconds)
        path = self._path(Kind.LEASE, LEASE_NAMESPACE, name)
        with self._writing() as w:
            now = self._clock()
            current = self._read(path)
            if current is None:
                new: Object = {
                    "apiVersion": API_VERSIONS[Kind.LEASE],
                    "kind": Kind.LEASE.value,
                    "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                    "spec": {},
                }
                self._stamp_new(new)
                acquired, transitions = now, 0
            else:
                lease = parse_lease(current)
                if lease.holder == holder:
                    # A renewal (even of an expired lease nobody took over): like client-go's
                    # leader election it keeps acquireTime and leaseTransitions.
                    acquired, transitions = lease.acquire_time, lease.transitions
                elif lease.expired(now):
                    acquired, transitions = now, lease.transitions + 1
                else:
                    until = lease.renew_time + lease.duration_seconds
                    raise LeaseHeld(
                        f"lease {name} is held by {lease.holder} until {micro_time(until)} "
                        f"({until - now:.3f}s from now)"
                    )
                new = copy.deepcopy(current)
            new["metadata"].setdefault("annotations", {})[LEASE_DURATION_ANNOTATION] = repr(
                duration)
            new["spec"] = {
                "holderIdentity": holder,
                "leaseDurationSeconds": math.ceil(duration),
                "acquireTime": micro_time(acquired),
                "renewTime": micro_time(now),
                "leaseTransitions": transitions,
            }
            return parse_lease(self._commit(w, "MODIFIED" if current else "ADDED", Kind.LEASE,
                                            new, current))

    def release_lease(self, name: str, holder: str, *,
                      clear_annotations: Collection[str] = ()) -> bool:
        clear = checked_annotation_keys(clear_annotations)
        path = self._path(Kind.LEASE, LEASE_NAMESPACE, name)
        with self._writing() as w:
            current = self._read(path)
            if current is None or parse_lease(current).holder != holder:
                return False
            self._commit(w, "MODIFIED", Kind.LEASE, released_lease(current, clear), current)
            return True

    def record_event(self, event: EventRecord) -> None:
        now = self._clock()
        first = event_object(event, now)  # checks the Event before anything is written
        namespace, name = event_namespace(event), event_name(event)
        path = self._path(Kind.EVENT, namespace, name)
        with self._writing() as w:
            current = self._read_or_none_if_corrupt(path)
            if current is not None:
                self._commit(w, "MODIFIED", Kind.EVENT, event_repeated(current, event, now),
                             current)
                return
            self._stamp_new(first)
            self._commit(w, "ADDED", Kind.EVENT, first, None)
            self._prune_events(w)

    def close(self) -> None:
        """End every watch of this store (at once). The store holds no descriptor between
        calls; watches close theirs when they end."""
        self._closed.set()

    # Internals: paths and locks

    def _path(self, kind: Kind, namespace: str, name: str) -> Path:
        """The object's file. Checks names so that no name can leave the directory."""
        if not isinstance(name, str):
            raise Invalid(f"metadata.name must be a string, got {name!r}")
        problem = dns1123_subdomain_problem(name)
        if problem is None and len(name) > _MAX_NAME:
            problem = f"must be no more than {_MAX_NAME} characters in the file store"
        if problem is not None:
            raise Invalid(f"{kind} name {name!r} is not valid: {problem}")
        if kind in NAMESPACED:
            return self._objects / kind.value / checked_namespace(namespace) / (name + _SUFFIX)
        if namespace:
            raise Invalid(f"{kind} is cluster-scoped; it has no namespace, got {namespace!r}")
        return self._objects / kind.value / (name + _SUFFIX)

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        # A descriptor per call: flock locks belong to the open file description, so sharing
        # one descriptor between threads would let them all pass.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Writer]:
        with self._locked(exclusive=True):
            fd = os.open(self._journal,
                         os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                yield _Writer(fd, self._recover(fd))
            finally:
                os.close(fd)

    # Internals: the write path

    def _recover(self, journal_fd: int) -> int:
        """Repair what a crashed writer left and return the current revision.

        Runs under the exclusive lock, before every write."""
        if not self._swept:
            for directory, _, files in os.walk(self._root):
                _sweep(Path(directory), files)
            self._swept = True
        else:
            _sweep(self._root)
        end, last = _journal_tail(journal_fd)
        if end < os.fstat(journal_fd).st_size:
            log.warning("%s: dropping a partial last line left by an interrupted write",
                        self._journal)
            os.ftruncate(journal_fd, end)
        revision = self._read_revision()
        if not last:
            return revision
        try:
            entry = json.loads(last)
            rv, type_, kind, obj = (int(entry["rv"]), entry["type"], Kind(entry["kind"]),
                                    entry["object"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: the last line is not a journal entry; ignoring it", self._journal)
            return revision
        if rv > revision:
            # The previous writer died between its journal line and its object file.
            log.warning("%s: re-applying resource version %d of an interrupted write",
                        self._journal, rv)
            namespace, name = object_key(obj)
            self._apply_to_file(type_, self._path(kind, namespace, name), obj)
            self._write_revision(rv)
            revision = rv
        return revision

    def _commit(self, w: _Writer, type_: EventType, kind: Kind, obj: Object,
                previous: Object | None) -> Object:
        """Store `obj` at the next revision and return a copy of what was stored. A
        modification that changes nothing but the resourceVersion is not written, as in
        Kubernetes, so no-op updates cause no watch events."""
        if previous is not None and _same(obj, previous):
            return copy.deepcopy(previous)
        rv = w.revision + 1
        obj["metadata"]["resourceVersion"] = str(rv)
        line = _encode_entry(rv, type_, kind, obj)
        namespace, name = object_key(obj)
        path = self._path(kind, namespace, name)
        body = _dump_yaml(obj) if type_ != "DELETED" else b""
        _write_all(w.journal_fd, line)
        os.fdatasync(w.journal_fd)
        self._apply_to_file(type_, path, obj, body)
        self._write_revision(rv)
        w.revision = rv
        self._maybe_compact(w.journal_fd, rv)
        return copy.deepcopy(obj)

    def _apply_to_file(self, type_: str, path: Path, obj: Object,
                       body: bytes | None = None) -> None:
        if type_ == "DELETED":
            self._parsed.pop(path, None)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path.parent)
        if body is None:
            body = _dump_yaml(obj)
        _atomic_write(path, body, fsync=True)
        self._parsed[path] = (body, copy.deepcopy(obj))

    def _read_or_none_if_corrupt(self, path: Path) -> Object | None:
        """`_read`, with a corrupt file taken for no object: for writes that replace or
        remove whatever is there."""
        try:
            return self._read(path)
        except _Corrupt as exc:
            log.warning("%s: replacing a corrupt object file: %s", path, exc.reason)
            return None

    def _prune_events(self, w: _Writer) -> None:
        """Remove the least recently observed Events beyond `event_limit`. A file's mtime
        is its Event's last observation: every occurrence rewrites it."""
        kind_dir = self._objects / Kind.EVENT.value
        found: list[tuple[int, str, Path]] = []
        for namespace in _visible_entries(kind_dir, dirs=True):
            for file_name in _visible_entries(kind_dir / namespace, dirs=False):
                path = kind_dir / namespace / file_name
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime_ns, str(path), path))
        found.sort()
        for _, _, path in found[:max(0, len(found) - self._event_limit)]:
            stale = self._read_or_none_if_corrupt(path)
            if stale is None:
                self._parsed.pop(path, None)
                path.unlink(missing_ok=True)
            else:
                self._commit(w, "DELETED", Kind.EVENT, stale, None)

    def _read(self, path: Path) -> Object | None:
        """The object in `path` (a copy the caller owns), or None. Raises Invalid (a
        `_Corrupt`) naming the file when it holds no readable object of its place."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._parsed.pop(path, None)
            return None
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == data:
            return copy.deepcopy(cached[1])
        obj = _parse_object(path, data, self._objects)
        self._parsed[path] = (data, copy.deepcopy(obj))
        return obj

    def _maybe_compact(self, journal_fd: int, rv: int) -> None:
        head = _ENTRY_HEAD.match(os.pread(journal_fd, 128, 0))
        # Resource versions in the journal are consecutive, so this is its line count.
        if head is None or rv - int(head.group(1)) + 1 <= self._journal_limit:
            return
        size = os.fstat(journal_fd).st_size
        data = _pread_all(journal_fd, 0, size)
        lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
        keep = lines[-max(1, self._journal_limit // 2):]
        # Watchers hold the old inode open; they drain it, see the new inode and reopen.
        _atomic_write(self._journal, b"".join(keep), fsync=True)

    def _stamp_new(self, obj: Object) -> None:
        meta = obj["metadata"]
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.fromtimestamp(self._clock(), UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1

    def _read_revision(self) -> int:
        try:
            return int(self._revision_path.read_bytes().strip() or b"0")
        except FileNotFoundError:
            return 0
        except ValueError:
            # Not fsync'd, so after a power cut it may be empty or garbage; the journal
            # tail (see _recover) is the authority then.
            log.warning("%s is unreadable; relying on the journal", self._revision_path)
            return 0

    def _write_revision(self, rv: int) -> None:
        _atomic_write(self._revision_path, f"{rv}\n".encode(), fsync=False)

    # Internals: watch

    def _journal_event(self, line: bytes, last_rv: int, kinds: frozenset[Kind],
                       field_node_name: str | None) -> tuple[int, WatchEvent | None]:
        """What one journal line means to a watch that has seen up to `last_rv`: the
        resource version it has seen then, and the event to deliver (None: a line of
        another kind, of another node's pod, already seen or malformed). Raises Expired
        when lines are missing (the journal was compacted past `last_rv`)."""
        head = _ENTRY_HEAD.match(line)
        if head is None:
            log.warning("%s: skipping a malformed journal line", self._journal)
            return last_rv, None
        rv = int(head.group(1))
        if rv <= last_rv:
            return last_rv, None
        if rv > last_rv + 1:
            raise Expired(
                f"resource version {last_rv} is too old: the journal now starts "
                f"at {rv}; list again"
            )
        type_, kind_name = head.group(2).decode(), head.group(3).decode()
        if kind_name not in kinds or type_ not in _EVENT_TYPES:
            return rv, None
        obj = json.loads(line)["object"]
        # A pod's spec.nodeName is set once (binding) and never changes, so the new state
        # alone says whether the filtered watcher had it.
        if field_node_name is not None and \
                (obj.get("spec") or {}).get("nodeName") != field_node_name:
            return rv, None
        return rv, WatchEvent(cast(EventType, type_), Kind(kind_name), obj, rv)

    def _watch(self, kinds: frozenset[Kind], resource_version: int,
               stop: threading.Event | None, bookmark_interval: float,
               field_node_name: str | None) -> Iterator[WatchEvent]:
        bookmark_kind = min(kinds)
        last_rv = resource_version
        last_sent = time.monotonic()
        # Set by a journal change, the store's close or the caller's stop; cleared before
        # each read of the journal, so a change that lands after the read wakes the wait.
        wake = threading.Event()
        subscription = self._subscribe(wake.set)
        unregister_stop, stop_poll = wake_on_stop(stop, wake.set)
        unregister_close = self._closed.on_set(wake.set)
        longest_wait = stop_poll if subscription is not None else \
            min(self._poll_interval, stop_poll or self._poll_interval)
        follower = _JournalFollower(self._journal)
        try:
            while True:
                if self._stopped(stop):
                    return
                wake.clear()
                lines = follower.poll()
                for line in lines:
                    last_rv, event = self._journal_event(line, last_rv, kinds, field_node_name)
                    if event is None:
                        continue
                    if self._stopped(stop):
                        return
                    yield event
                    last_sent = time.monotonic()
                if time.monotonic() - last_sent >= bookmark_interval:
                    if self._stopped(stop):
                        return
                    yield WatchEvent("BOOKMARK", bookmark_kind, {}, last_rv)
                    last_sent = time.monotonic()
                if not lines and not follower.behind:
                    timeout = max(0.0, last_sent + bookmark_interval - time.monotonic())
                    wake.wait(timeout if longest_wait is None else min(timeout, longest_wait))
        finally:
            unregister_close()
            unregister_stop()
            if subscription is not None:
                subscription.cancel()
            follower.close()

    def _subscribe(self, callback: Callable[[], None]) -> Subscription | None:
        """inotify on the store's directory for journal changes; None (and a warning, once
        per store) when this process cannot have it: the watch then polls."""
        try:
            return shared_watcher().subscribe(self._root, (self._journal.name,), callback)
        except OSError as exc:
            if not self._polling_reported:
                self._polling_reported = True
                log.warning("%s: watching the journal by polling every %gs, without "
                            "inotify: %s", self._root, self._poll_interval, exc)
            return None

    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._closed.is_set() or (stop is not None and stop.is_set())


class _JournalFollower:
    """Reads the journal's complete lines as they are appended, across compactions.

    `poll` is cheap when nothing changed: one stat of the path. Compaction replaces the
    file; the old inode is drained to its end first (the compacting writer finished
    appending to it before the rename), then the new file is read from its start and the
    caller skips the resource versions it has seen.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._offset = 0  # end of the last complete line read
        self._seen: tuple[int, int, int] | None = None  # (size, mtime, inode) last read at
        self.behind = False  # more was there than one poll returns

    def poll(self) -> list[bytes]:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return []
        lines: list[bytes] = []
        if (st.st_dev, st.st_ino) != self._ino:
            if self._fd >= 0:
                lines = self._read(limit=None)
                os.close(self._fd)
                self._fd = -1
            try:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return lines
            st = os.fstat(self._fd)
            self._ino = (st.st_dev, st.st_ino)
            self._offset = 0
            self._seen = None
        # Size and mtime together also notice a partial line truncated and replaced by a
        # line of the same length.
        seen = (st.st_size, st.st_mtime_ns, st.st_ino)
        if seen == self._seen and not self.behind:
            return lines
        if st.st_size < self._offset:
            # Shrunk under us (not something the store does): read it again from the start;
            # the caller skips what it has seen and raises Expired on a gap.
            self._offset = 0
        self._seen = seen
        return lines + self._read(limit=_CHUNK * 4)

    def _read(self, limit: int | None) -> list[bytes]:
        chunks: list[bytes] = []
        pos = self._offset
        self.behind = False
        while True:
            chunk = os.pread(self._fd, _CHUNK, pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
            if limit is not None and pos - self._offset >= limit and b"\n" in chunk:
                self.behind = True
                break
        data = b"".join(chunks)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return data[:end].split(b"\n")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# Pure helpers and small file operations


def _carry_over(new: Object, current: Object) -> None:
    """What an update keeps from the stored object: identity, status, and generation,
    bumped when the spec changed."""
    meta, cur_meta = new["metadata"], current["metadata"]
    for key in ("uid", "creationTimestamp"):
        meta.pop(key, None)
        if key in cur_meta:
            meta[key] = cur_meta[key]
    generation = int(cur_meta.get("generation") or 1)
    meta["generation"] = generation + (new.get("spec") != current.get("spec"))
    new.pop("status", None)
    if "status" in current:
        new["status"] = current["status"]


def _same(a: Object, b: Object) -> bool:
    def strip(o: Object) -> Object:
        meta = {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}
        return {**o, "metadata": meta}

    return strip(a) == strip(b)


def _encode_entry(rv: int, type_: str, kind: Kind, obj: Object) -> bytes:
    # Key order and separators are what _ENTRY_HEAD expects; ensure_ascii keeps the line
    # free of raw newlines.
    return (json.dumps({"rv": rv, "type": type_, "kind": kind.value, "object": obj},
                       allow_nan=False) + "\n").encode()


def _dump_yaml(obj: Object) -> bytes:
    text: str = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                          allow_unicode=True)
    return text.encode()


class _Corrupt(Invalid):
    """An object file that holds no readable object of its place; `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _parse_object(path: Path, data: bytes, objects: Path) -> Object:
    """The object in an object file's bytes, checked against the file's place
    (objects/<Kind>/[<namespace>/]<name>.yaml); raises _Corrupt."""
    try:
        obj = kube_yaml.load(data)
    except kube_yaml.KubeYamlError as e:
        raise _Corrupt(path, f"not valid YAML: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise _Corrupt(path, "does not hold an object with metadata")
    parts = path.relative_to(objects).parts
    kind, name = parts[0], parts[-1].removesuffix(_SUFFIX)
    namespace = parts[1] if len(parts) == 3 else ""
    meta = obj["metadata"]
    if obj.get("kind") != kind:
        raise _Corrupt(path, f"kind {obj.get('kind')!r} is not {kind!r}, as its folder says")
    if meta.get("name") != name:
        raise _Corrupt(path, f"metadata.name {meta.get('name')!r} is not {name!r}, as its "
                             "file name says")
    if (meta.get("namespace") or "") != namespace:
        raise _Corrupt(path, f"metadata.namespace {meta.get('namespace')!r} is not "
                             f"{namespace!r}, as its folder says")
    return obj


def _visible_entries(directory: Path, *, dirs: bool) -> list[str]:
    """Object files (or namespace directories) in `directory`, without temp files."""
    try:
        with os.scandir(directory) as it:
            return [
                e.name for e in it
                if not e.name.startswith(".")
                and (e.is_dir() if dirs else e.name.endswith(_SUFFIX) and e.is_file())
            ]
    except FileNotFoundError:
        return []


def _sweep(directory: Path, names: list[str] | None = None) -> None:
    """Remove temp files a crashed writer left. Only call under the exclusive lock: then
    no temp file belongs to a live writer."""
    if names is None:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
    for name in names:
        if name.startswith(_TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)


def _atomic_write(path: Path, data: bytes, *, fsync: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; other local users read the store
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_all(fd: int, data: bytes) -> None:
    # One write(2) in practice; the loop only matters on a short write (full disk, signal).
    # Readers wait for the "\n", so a line finished by a second write is still whole to them.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pread_all(fd: int, offset: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, _CHUNK * 16), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _journal_tail(fd: int) -> tuple[int, bytes]:
    """Where the journal's complete lines end, and its last complete line (b"" if none)."""
    size = os.fstat(fd).st_size
    buf = b""
    pos = size
    while pos > 0:
        step = min(_CHUNK // 16, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        last_nl = buf.rfind(b"\n")
        if last_nl < 0:
            continue
        prev_nl = buf.rfind(b"\n", 0, last_nl)
        if prev_nl >= 0 or pos == 0:
            return pos + last_nl + 1, buf[prev_nl + 1:last_nl]
    return 0, b""
