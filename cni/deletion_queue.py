"""The DELs the plugin recorded while the agent could not be reached, read back for replay.

A container runtime cannot finish removing a pod until the plugin's DEL succeeds, so a
DEL that fails because the agent is restarting (or was uninstalled) would keep the pod
terminating. The shim therefore records such a DEL as a file in the agent's deletion
queue (`cni.plugin.queue_delete`) and reports success; the agent runs every queued DEL
before it serves an ADD (`cni.service.CniService.replay_deletions`). Until then the pod's
address stays allocated, so it is never handed to another pod before its DEL ran.

The folder is on the node's persistent state path and only root may write there, yet
what is in it is read as untrusted input: whatever a file holds, and whatever kind of
file it is, the agent neither crashes nor acts on anything but a well-formed entry for an
attachment; anything else is removed and counted.

- `parse_queue_entry` (pure) reads one entry, with the shim's own syntax rules;
- `plan_queue` (pure) decides, from what the folder lists, which files are entries to
  replay, which are writes still in progress, and which are to be removed and why;
- `DeletionQueueFolder` is the apply side: list, read (never following a link, never
  blocking on a FIFO, never reading more than `MAX_QUEUE_ENTRY` bytes) and remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cni import protocol as p
from cni.model import AttachmentKey

STALE_WRITE_SECONDS = 600.0
"""A temporary file older than this is a write whose shim died (a shim lives at most its
timeout, 30 s by default): removed."""


class QueueEntryRejected(ValueError):
    """An entry that is not a well-formed queued DEL; the message says why."""


@dataclass(frozen=True)
class QueuedDelete:
    """One DEL as the shim recorded it."""

    name: str
    key: AttachmentKey
    netns: str
    pod_namespace: str
    pod_name: str


@dataclass(frozen=True)
class QueueFile:
    """One directory entry of the queue folder, as listed (links not followed)."""

    name: str
    kind: str
    """"file", "directory", "symlink" or "other" (a FIFO, a socket, a device)."""
    size: int = 0
    age: float = 0.0
    """Seconds since it was last modified."""


@dataclass(frozen=True)
class QueuePlan:
    replay: tuple[str, ...] = ()
    """Entries to read and replay, oldest first."""
    discard: tuple[tuple[str, str], ...] = ()
    """Files to remove, with the reason."""


def parse_queue_entry(name: str, data: bytes) -> QueuedDelete:
    """A queued DEL from the file `name` holding `data`; QueueEntryRejected if it is not
    one the shim writes (the same syntax rules as a DEL's environment, and stored under
    the name the shim gives its attachment)."""
    if len(data) > p.MAX_QUEUE_ENTRY:
        raise QueueEntryRejected(f"{len(data)} bytes, more than {p.MAX_QUEUE_ENTRY}")
    try:
        document = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise QueueEntryRejected("JSON nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise QueueEntryRejected(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise QueueEntryRejected("not a JSON object")
    if document.get("version") != p.QUEUE_ENTRY_VERSION or isinstance(
            document.get("version"), bool):
        raise QueueEntryRejected(f"version {_brief(document.get('version'))}, not "
                                 f"{p.QUEUE_ENTRY_VERSION}")
    fields = {}
    for field in ("containerID", "ifname", "netns", "podNamespace", "podName"):
        value = document.get(field, "")
        if not isinstance(value, str):
            raise QueueEntryRejected(f"{field} is {_brief(value)}, not a string")
        fields[field] = value
    try:
        p.check_container_id(fields["containerID"])
        p.check_ifname(fields["ifname"])
        p.check_netns_path(fields["netns"])
        p.check_pod_identity({"K8S_POD_NAMESPACE": fields["podNamespace"],
                              "K8S_POD_NAME": fields["podName"]})
    except p.CniError as exc:
        raise QueueEntryRejected(exc.msg) from None
    expected = p.compute_queue_entry_name(fields["containerID"], fields["ifname"])
    if name != expected:
        raise QueueEntryRejected(f"stored as {name}, but the shim names this attachment's "
                                 f"entry {expected}")
    return QueuedDelete(name, AttachmentKey(fields["containerID"], fields["ifname"]),
                        fields["netns"], fields["podNamespace"], fields["podName"])


def _brief(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) \
        else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def plan_queue(files: Iterable[QueueFile]) -> QueuePlan:
    """What to do with each file of the folder: entries (`del-*`, regular files of a
    bounded size) are replayed oldest first; a write in progress (`.del-*.tmp`) is left
    alone until it is `STALE_WRITE_SECONDS` old; everything else is removed."""
    replay: list[QueueFile] = []
    discard: list[tuple[str, str]] = []
    for file in files:
        if file.name.startswith(p.QUEUE_ENTRY_PREFIX):
            if file.kind != "file":
                discard.append((file.name, f"a {file.kind}, not a queue entry"))
            elif file.size > p.MAX_QUEUE_ENTRY:
                discard.append((file.name, f"{file.size} bytes, more than "
                                           f"{p.MAX_QUEUE_ENTRY}"))
            else:
                replay.append(file)
        elif file.name.startswith(p.QUEUE_TEMP_PREFIX) and file.name.endswith(".tmp"):
            if file.kind != "file":
                discard.append((file.name, f"a {file.kind}, not a queue entry being written"))
            elif file.age >= STALE_WRITE_SECONDS:
                discard.append((file.name, f"a write left unfinished {file.age:.0f} s ago"))
        else:
            discard.append((file.name, f"a {file.kind} that is no queue entry"))
    replay.sort(key=lambda file: (-file.age, file.name))
    return QueuePlan(tuple(file.name for file in replay), tuple(sorted(discard)))


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class DeletionQueueFolder:
    """The queue folder on disk (the agent's: it creates it, the shim only writes into
    an existing one)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def ensure(self) -> None:
        """Create the folder (0700) if it is missing; refuse one that is not a directory
        (a link to elsewhere included)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            self.path.mkdir(mode=0o700)
        mode = self.path.lstat().st_mode
        if not stat.S_ISDIR(mode):
            raise RuntimeError(f"the CNI deletion queue {self.path} is a {_kind(mode)}, "
                               "not a directory")

    def scan(self, now: float) -> list[QueueFile]:
        """Every entry of the folder, as listed (a name that vanishes meanwhile is left out)."""
        files = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                try:
                    status = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                files.append(QueueFile(entry.name, _kind(status.st_mode), status.st_size,
                                       max(now - status.st_mtime, 0.0)))
        return files

    def read(self, name: str) -> tuple[bytes, int] | None:
        """The bytes of a regular file (at most one more than MAX_QUEUE_ENTRY, so an
        oversized one is recognised) and its inode; None if it is gone or no regular file."""
        try:
            fd = os.open(self.path / name,
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                return None
            chunks = []
            left = p.MAX_QUEUE_ENTRY + 1
            while left > 0 and (chunk := os.read(fd, left)):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks), status.st_ino
        finally:
            os.close(fd)

    def remove(self, name: str, inode: int | None = None) -> bool:
        """Remove `name` (a directory with what it holds, links not followed); with
        `inode`, only if it is still that file (the shim may have replaced the entry by a
        newer one since it was read). True if something was removed."""
        path = self.path / name
        try:
            status = path.lstat()
        except FileNotFoundError:
            return False
        if inode is not None and status.st_ino != inode:
            return False
        try:
            if stat.S_ISDIR(status.st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return False
        return True
