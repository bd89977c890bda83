"""Per-node IP address management for pods: one /32 per attachment from the node's pod CIDR.

The node's pod CIDR comes from the datastore (the caller passes it in); this module only
hands out its usable addresses (network and broadcast skipped) and remembers who holds
which, in a directory that survives agent restarts:

    <dir>/198.18.0.7        one file per allocation, named by the address, holding the
                            attachment as JSON; created with O_EXCL, which fails if the
                            name exists (no double allocation even if a writer ignored
                            the lock)
    <dir>/key-<sha256>      the index from (container id, ifname) to the address: a
                            symlink whose target is the address (one syscall to write or
                            read), so a repeated ADD finds its address without a scan;
                            made before the allocation file, removed after it, so every
                            allocation file always has its index entry
    <dir>/lock              flock(2) held around every read-modify-write, so threads
                            (also serialised by a threading.Lock, because flock is per
                            open file description) and other processes never interleave

The set of taken addresses is also kept in memory, so an ADD does not list the directory:
a stale set is harmless, because allocation files are created with O_EXCL (an address
another process took fails and is skipped) and the set is re-read from disk before
exhaustion is reported (an address another process freed is found then).

Readers and writers hold the lock, so nobody sees a file half-written; a writer that
crashes mid-write leaves a file that does not parse, which counts as taken until `prune`
(run by GC) removes it. Files are not fsync'ed: an agent restart keeps them (page cache),
and after a node reboot every pod is re-created anyway. A state directory on tmpfs (e.g.
under /run) makes that explicit: allocations survive agent restarts, not reboots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from cni import protocol as p
from cni.model import (
    AttachmentKey,
    compute_host_ifname,
    compute_next_free_in,
    compute_pod_cidr_usable,
)

_KEY_PREFIX = "key-"


@dataclass(frozen=True)
class Allocation:
    """One address held by one attachment, with what the agent knows about its pod."""

    ip: IPv4Address
    key: AttachmentKey
    namespace: str | None = None
    name: str | None = None
    netns: str = ""
    host_ifname: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "ip": str(self.ip),
                "containerID": self.key.container_id,
                "ifname": self.key.ifname,
                "namespace": self.namespace,
                "name": self.name,
                "netns": self.netns,
                "hostIfname": self.host_ifname,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Allocation:
        data = json.loads(text)
        return cls(
            ip=IPv4Address(data["ip"]),
            key=AttachmentKey(str(data["containerID"]), str(data["ifname"])),
            namespace=data.get("namespace"),
            name=data.get("name"),
            netns=str(data.get("netns") or ""),
            host_ifname=str(data.get("hostIfname") or ""),
        )


def compute_key_filename(key: AttachmentKey) -> str:
    digest = hashlib.sha256(f"{key.container_id}\0{key.ifname}".encode()).hexdigest()
    return _KEY_PREFIX + digest[:40]


def _parse_ip_name(name: str) -> int | None:
    """The address an allocation file is named after, as an int; None for other files."""
    if not name[:1].isdigit():
        return None
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, name), "big")
    except OSError:
        return None


def _read_text(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _write_text(path: str, text: str, *, exclusive: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Ipam:
    """Allocations from one pod CIDR, persisted in `directory`."""

    def __init__(self, cidr: IPv4Network, directory: Path | str) -> None:
        first, last = compute_pod_cidr_usable(cidr)
        if last < first:
            raise ValueError(f"pod CIDR {cidr} has no usable address")
        self.cidr = cidr
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir = str(self.directory)
        self._lock_fd = os.open(
            f"{self._dir}/lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        self._thread_lock = threading.Lock()
        self._cursor: IPv4Address | None = None
        self._taken_cache: set[int] | None = None

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # --- file helpers (call with the lock held) -------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self._dir}/{name}"

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def _read_allocation(self, name: str) -> Allocation | None:
        if _parse_ip_name(name) is None:
            return None
        try:
            return Allocation.from_json(_read_text(self._path(name)))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None

    def _create_exclusive(self, name: str, text: str) -> bool:
        """Create `name` with `text`, or return False if it exists."""
        try:
            _write_text(self._path(name), text, exclusive=True)
        except FileExistsError:
            return False
        return True

    def _index(self, name: str) -> str | None:
        try:
            return os.readlink(self._path(name))
        except (FileNotFoundError, OSError):
            return None

    def _write_index(self, key: AttachmentKey, ip: IPv4Address) -> None:
        path = self._path(compute_key_filename(key))
        try:
            os.symlink(str(ip), path)
        except FileExistsError:  # a stale entry (its allocation was never completed)
            os.unlink(path)
            os.symlink(str(ip), path)

    def _lookup_locked(self, key: AttachmentKey) -> Allocation | None:
        ip_text = self._index(compute_key_filename(key))
        if ip_text is None:
            return None
        allocation = self._read_allocation(ip_text)
        if allocation is None or allocation.key != key:
            return None
        return allocation

    def _taken(self) -> set[int]:
        return {ip for ip in map(_parse_ip_name, os.listdir(self._dir)) if ip is not None}

    # --- public API -------------------------------------------------------------------------

    def lookup(self, key: AttachmentKey) -> Allocation | None:
        with self._locked():
            return self._lookup_locked(key)

    def allocate(
        self,
        key: AttachmentKey,
        *,
        namespace: str | None = None,
        name: str | None = None,
        netns: str = "",
    ) -> tuple[Allocation, bool]:
        """The attachment's address: its existing one (False) or a newly allocated one (True).

        Raises CniError(ERR_IPAM_EXHAUSTED) naming the CIDR when nothing is free.
        """
        with self._locked():
            existing = self._lookup_locked(key)
            if existing is not None:
                return existing, False
            if self._taken_cache is None:
                self._taken_cache = self._taken()
            taken = self._taken_cache
            rescanned = False
            while True:
                ip = compute_next_free_in(self.cidr, taken, self._cursor)
                if ip is None and not rescanned:
                    taken = self._taken_cache = self._taken()  # others may have freed some
                    rescanned = True
                    continue
                if ip is None:
                    first, last = compute_pod_cidr_usable(self.cidr)
                    raise p.CniError(
                        p.ERR_IPAM_EXHAUSTED,
                        f"pod CIDR {self.cidr} is exhausted: all {last - first + 1} usable "
                        "addresses are allocated",
                    )
                allocation = Allocation(
                    ip=ip,
                    key=key,
                    namespace=namespace,
                    name=name,
                    netns=netns,
                    host_ifname=compute_host_ifname(key.container_id, key.ifname),
                )
                self._write_index(key, ip)
                taken.add(int(ip))
                if self._create_exclusive(str(ip), allocation.to_json()):
                    self._cursor = ip
                    return allocation, True
                # Taken by another process since we last looked: try the next one.

    def release(self, key: AttachmentKey) -> Allocation | None:
        """Free the attachment's address; None if it held none (idempotent)."""
        with self._locked():
            allocation = self._lookup_locked(key)
            if allocation is not None:
                self._unlink(str(allocation.ip))
                if self._taken_cache is not None:
                    self._taken_cache.discard(int(allocation.ip))
            self._unlink(compute_key_filename(key))
            return allocation

    def allocations(self) -> list[Allocation]:
        """Every allocation on disk (any CIDR), sorted by address."""
        with self._locked():
            found = (self._read_allocation(str(IPv4Address(ip))) for ip in sorted(self._taken()))
            return [a for a in found if a is not None]

    def prune(self) -> int:
        """Remove index entries and allocation files that do not point at each other
        (or do not parse); return how many files were removed."""
        removed = 0
        with self._locked():
            self._taken_cache = None
            names = os.listdir(self._dir)
            owners: dict[str, str] = {}
            for name in names:
                if name.startswith(_KEY_PREFIX):
                    owners[name] = self._index(name) or ""
            for name in names:
                if _parse_ip_name(name) is not None:
                    allocation = self._read_allocation(name)
                    owner_key = compute_key_filename(allocation.key) if allocation else ""
                    stale = allocation is None or owners.get(owner_key) != name
                elif name.startswith(_KEY_PREFIX):
                    target = self._read_allocation(owners.get(name, ""))
                    stale = target is None or compute_key_filename(target.key) != name
                else:
                    stale = False
                if stale:
                    self._unlink(name)
                    removed += 1
        return removed
