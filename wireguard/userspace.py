"""The userspace backend: wireguard-go, configured over its UAPI unix socket.

Why it exists: many nodes (and this project's own test machines) have no WireGuard
kernel module. wireguard-go provides the same device as a TUN interface, configured
through `<socket_dir>/<name>.sock` with the text protocol in `wireguard.uapi`.

Creating an interface starts `wireguard-go <name>` in the backend's network namespace,
in the foreground (WG_PROCESS_FOREGROUND=1) in a session of its own, so its PID is
known: it is the PID of the process started here (the command may be a wrapper, but it
must `exec` wireguard-go, as `nsenter`, `unshare` and `sh -c 'exec …'` do). The backend
waits until the socket answers. wireguard-go exits by itself when its interface is
deleted; `delete` deletes the link and then waits for the processes this backend
started (terminating them by PID only if they linger). Interfaces started by someone
else (e.g. before an agent restart) are adopted: read and configured like any other.

wireguard-go always puts its socket in /var/run/wireguard, a folder shared by every
network namespace of a mount namespace. Two namespaces may therefore not run interfaces
of the same name unless each wireguard-go has a private socket folder:
`private_socket_dir_command(folder)` gives a command that runs wireguard-go in a new
mount namespace where `folder` is bind-mounted on /var/run/wireguard, so the socket
appears in `folder` and `UserspaceBackend(socket_dir=folder, ...)` finds it.

wireguard-go's own log (LOG_LEVEL `error` unless `log_level` says otherwise) goes to
`log_path` when one is given, appended, and otherwise to an unnamed file that is read
only to explain a failed start.

MTU and up/down are set through rtnetlink (`wireguard.links`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from wireguard.errors import DeviceStartError, NotWireGuardDeviceError, UapiError
from wireguard.links import Links, LinkState
from wireguard.model import Device, PeerStats, validate_interface_name
from wireguard.plan import DevicePlan
from wireguard.uapi import (
    GET_REQUEST,
    compute_uapi_kick,
    compute_uapi_set,
    parse_errno,
    parse_uapi_get,
)

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
_MAX_ANSWER = 64 * 1024 * 1024


def private_socket_dir_command(socket_dir: str | os.PathLike[str],
                               wireguard_go: str = "wireguard-go") -> tuple[str, ...]:
    """A command (the interface name is appended) that runs wireguard-go in a new mount
    namespace whose /var/run/wireguard is `socket_dir` (bind-mounted; if the folder does
    not exist on this system, a private tmpfs goes on /var/run first). The mount
    namespace is a slave of the caller's, so nothing mounted in it leaks back. The
    command execs all the way down: the started PID is wireguard-go's PID."""
    script = (
        'set -e; [ -d /var/run/wireguard ] || { mount -t tmpfs -o mode=0755 meshgress-wg '
        '/var/run; mkdir -m 0755 /var/run/wireguard; }; '
        'mount --bind "$1" /var/run/wireguard; exec "$2" "$3"'
    )
    return ("unshare", "--mount", "--propagation", "slave", "sh", "-c", script,
            "meshgress-wireguard-go", os.fspath(socket_dir), wireguard_go)


class UserspaceBackend:
    """WireGuard through wireguard-go.

    socket_dir: where the UAPI sockets are (default /var/run/wireguard).
    netns: the network namespace (name under /run/netns, or a path) whose interfaces
        this backend manages; None: the caller's own. wireguard-go is started in it
        with `nsenter --net=...`.
    command: how to start wireguard-go; the interface name is appended. Must exec
        wireguard-go (see `private_socket_dir_command`).
    start_timeout / stop_timeout: seconds to wait for the socket / for the exit.
    """

    kind = "userspace"

    def __init__(self, socket_dir: str | os.PathLike[str] = DEFAULT_SOCKET_DIR, *,
                 netns: str | None = None, command: Sequence[str] = ("wireguard-go",),
                 start_timeout: float = 10.0, stop_timeout: float = 5.0,
                 io_timeout: float = 10.0, log_path: str | os.PathLike[str] | None = None,
                 log_level: str | None = None) -> None:
        self.socket_dir = Path(socket_dir)
        self.log_path = Path(log_path) if log_path is not None else None
        self.log_level = log_level
        self.netns = netns
        self.command = tuple(command)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.io_timeout = io_timeout
        self.links = Links(netns)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # --- the protocol ---------------------------------------------------------------------

    def read(self, name: str) -> Device | None:
        found = self._read(name)
        return None if found is None else found[0]

    def stats(self, name: str) -> tuple[PeerStats, ...]:
        found = self._read(name)
        return () if found is None else found[1]

    def apply(self, plan: DevicePlan) -> None:
        if plan.create:
            self._start(plan.name)
        request = compute_uapi_set(plan)
        if request is not None:
            self.request(plan.name, request)
        self.links.configure(plan.name, mtu=plan.mtu, up=plan.link_up)

    def kick(self, name: str, keys: Sequence[str]) -> None:
        if keys:
            self.request(name, compute_uapi_kick(keys))

    def delete(self, name: str) -> None:
        """Delete the interface (wireguard-go then exits by itself) and reap the process
        if this backend started it. Refuses (NotWireGuardDeviceError) to delete a link of
        that name that is not a wireguard-go device."""
        link = self.links.get(name)
        if link is not None:
            self._check_is_ours(name, link)
            self.links.delete(name)
        proc = self._processes.pop(name, None)
        if proc is not None:
            _stop(proc, self.stop_timeout)

    # --- more -----------------------------------------------------------------------------

    def socket_path(self, name: str) -> Path:
        return self.socket_dir / f"{validate_interface_name(name)}.sock"

    def pid(self, name: str) -> int | None:
        """PID of the wireguard-go this backend started for `name` (None if it did not, or
        it has exited)."""
        proc = self._processes.get(name)
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    def close(self) -> None:
        """Forget the processes started here without stopping them (they keep serving
        their interfaces; a later backend adopts them)."""
        self._processes.clear()

    def request(self, name: str, text: str) -> str:
        """One raw UAPI exchange (`text` is a whole request ending in an empty line).
        Returns the answer; raises UapiError if it carries a non-zero errno. Never puts
        the request (which may hold the private key) into an error."""
        op = text.split("=", 1)[0]
        path = self.socket_path(name)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.io_timeout)
                sock.connect(os.fspath(path))
                sock.sendall(text.encode("ascii"))
                answer = _read_answer(sock)
        except FileNotFoundError:
            raise UapiError(name, op, 2, f"no UAPI socket at {path}") from None
        except ConnectionRefusedError:
            raise UapiError(name, op, 111, f"nothing listens on {path} (stale socket)") from None
        except TimeoutError:
            raise UapiError(name, op, 110, f"no answer on {path}") from None
        except OSError as exc:
            raise UapiError(name, op, exc.errno or 5, f"{path}: {exc.strerror}") from None
        parse_errno(answer, interface=name, op=op)
        return answer

    # --- internals ------------------------------------------------------------------------

    def _read(self, name: str) -> tuple[Device, tuple[PeerStats, ...]] | None:
        link = self.links.get(name)
        if link is None:
            return None
        self._check_is_ours(name, link)
        answer = self.request(name, GET_REQUEST)
        return parse_uapi_get(answer, name=name, mtu=link.mtu, up=link.up)

    def _check_is_ours(self, name: str, link: LinkState) -> None:
        path = self.socket_path(name)
        if link.kind != "tun" or not path.exists():
            raise NotWireGuardDeviceError(
                f"interface {name} (kind {link.kind or 'unknown'}) is not a wireguard-go device "
                f"with a socket at {path}: it is some other link, or its wireguard-go uses "
                "another socket folder or mount namespace"
            )

    def _argv(self, name: str) -> list[str]:
        argv = [*self.command, name]
        if self.netns is not None:
            path = self.netns if "/" in self.netns else f"/run/netns/{self.netns}"
            argv = ["nsenter", f"--net={path}", *argv]
        return argv

    def _start(self, name: str) -> None:
        validate_interface_name(name)
        old = self._processes.pop(name, None)
        if old is not None and old.poll() is None:
            _stop(old, self.stop_timeout, wait_first=False)
        env = dict(os.environ)
        env["WG_PROCESS_FOREGROUND"] = "1"
        if self.log_level is not None:
            env["LOG_LEVEL"] = self.log_level
        else:
            env.setdefault("LOG_LEVEL", "error")
        # The child keeps writing to it after this returns.
        log = (open(self.log_path, "a+b") if self.log_path is not None  # noqa: SIM115
               else tempfile.TemporaryFile())  # noqa: SIM115
        try:
            proc = subprocess.Popen(self._argv(name), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    close_fds=True)
        except OSError as exc:
            log.close()
            raise DeviceStartError(f"cannot start wireguard-go for {name}: {exc}") from exc
        try:
            self._wait_for_socket(name, proc, log)
        except BaseException:
            _stop(proc, self.stop_timeout, wait_first=False)
            raise
        finally:
            log.close()
        self._processes[name] = proc

    def _wait_for_socket(self, name: str, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        path = os.fspath(self.socket_path(name))
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            code = proc.poll()
            if code is not None:
                raise DeviceStartError(
                    f"wireguard-go for {name} exited with status {code} before its UAPI socket "
                    f"appeared: {_tail(log)}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(path)
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
                else:
                    owner = _peer_pid(sock)
                    # 0: wireguard-go is in a PID namespace we cannot see; trust the path.
                    if owner in (0, proc.pid):
                        return
            if time.monotonic() > deadline:
                raise DeviceStartError(
                    f"wireguard-go for {name} did not open {path} within "
                    f"{self.start_timeout:g}s: {_tail(log)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _read_answer(sock: socket.socket) -> str:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_ANSWER:
            raise OSError(5, "UAPI answer too large")
        data = b"".join(chunks)
        # Every answer ends with "errno=N\n\n"; "\n\n" appears nowhere else.
        if data.endswith(b"\n\n") and (b"\nerrno=" in data or data.startswith(b"errno=")):
            break
    return b"".join(chunks).decode("ascii", errors="replace")


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


def _tail(log: IO[bytes], limit: int = 2000) -> str:
    try:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - limit))
        text = log.read().decode("utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return "(no output)"
    return text[-limit:] if text else "(no output)"


def _stop(proc: subprocess.Popen[bytes], timeout: float, *, wait_first: bool = True) -> None:
    """Wait for a process started here to exit (it should: its link is gone); if it does
    not, SIGTERM, then SIGKILL — by its PID, and it is reaped."""
    steps = (None, signal.SIGTERM, signal.SIGKILL) if wait_first else (signal.SIGTERM,
                                                                       signal.SIGKILL)
    for sig in steps:
        if sig is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
