"""Thin adapters over iproute2 and util-linux for the lab: namespaces, links, processes.

The lab is built with the same tools an operator would type (`ip`, `nsenter`, `unshare`,
`sysctl`), run as argument lists, never through a shell. Every function here acts only on
a network namespace named by the caller; none touches the host's own namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


class CommandError(RuntimeError):
    """A command failed; the message has the command and what it printed."""


def run(argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), input=input_text, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    except FileNotFoundError as exc:
        raise CommandError(f"{argv[0]}: not installed ({exc})") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise CommandError(f"{' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    # Lines look like "name (id: 3)" or just "name".
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip_batch(name, ["link set lo up"])


def delete_netns(name: str) -> None:
    run(["ip", "netns", "delete", name], check=False)


def ip_batch(netns: str, commands: Iterable[str]) -> None:
    """Run `ip` commands inside `netns` in one process (`ip -n NS -batch -`)."""
    text = "\n".join(commands) + "\n"
    run(["ip", "-n", netns, "-batch", "-"], input_text=text)


def sysctl(netns: str, settings: dict[str, str]) -> None:
    argv = ["nsenter", f"--net={netns_path(netns)}", "sysctl", "-q", "-w"]
    run(argv + [f"{k}={v}" for k, v in settings.items()])


def netns_pids(name: str) -> list[int]:
    """Every process whose network namespace is `name` (found by namespace inode, so
    they are ours by construction, whoever started them)."""
    proc = run(["ip", "netns", "pids", name], check=False)
    return sorted(int(p) for p in proc.stdout.split() if p.isdigit())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_pids(pids: Iterable[int], grace: float = 3.0) -> list[int]:
    """SIGTERM the given processes, SIGKILL what is left after `grace` seconds, and wait
    until they are gone. Returns the PIDs that were running."""
    running = [p for p in pids if pid_alive(p)]
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in running:
            _reap(pid)
        if not any(pid_alive(p) for p in running):
            return running
        time.sleep(0.05)
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(pid_alive(p) for p in running):
        for pid in running:
            _reap(pid)
        time.sleep(0.05)
    return running


def spawn_detached(argv: Sequence[str], log_path: Path) -> int:
    """Start a long-running process that outlives the caller; returns its PID."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    return proc.pid


def call_in_netns(ns_file: str | Path, fn: Callable[[], _T]) -> _T:
    """Run `fn` on a short-lived thread that has entered the network namespace `ns_file`
    (e.g. /proc/PID/ns/net). A network namespace is per thread, so the calling thread —
    and the host namespace — are never touched; this is much cheaper than a process."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_file}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="in-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
