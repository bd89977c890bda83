"""CPU time of processes and their threads, from /proc: what the idle test and the
benchmarks measure meshgress's processes with.

A process's share of a core over a window is (utime + stime at the end minus at the start)
/ the window's length, as /proc/<pid>/stat counts them (clock ticks). Threads are listed
by their kernel thread id: a Python process's threads all carry its name in the kernel
(`py-spy dump --pid PID` shows which id is which Python thread).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

TICK = 1 / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of the process so far (all its threads); None if gone."""
    try:
        fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * TICK


def thread_seconds(pid: int) -> dict[int, float]:
    """Thread id → its user + system CPU seconds so far."""
    out = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError):
                fields = _stat_fields(task / "stat")
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) * TICK
    return out


def children(pid: int) -> list[int]:
    """The process's direct children (wireguard-go under an agent or gateway)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int(_stat_fields(entry / "stat")[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def command_line(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return [a.decode(errors="replace")
                for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    return []


class Window:
    """CPU used by some processes (and their threads) from `start()` to `stop()`."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float | None] = {}
        self._threads_before: dict[str, dict[int, float]] = {}
        self.shares: dict[str, float | None] = {}
        """Name → share of one core (None: the process ended meanwhile)."""
        self.thread_shares: dict[str, dict[int, float]] = {}
        self.seconds = 0.0

    def start(self) -> Window:
        self._began = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._threads_before = {name: thread_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> Window:
        self.seconds = time.monotonic() - self._began
        for name, pid in self.pids.items():
            before, after = self._before[name], cpu_seconds(pid)
            self.shares[name] = None if before is None or after is None \
                else (after - before) / self.seconds
            threads = thread_seconds(pid)
            self.thread_shares[name] = {
                tid: (used - self._threads_before[name].get(tid, 0.0)) / self.seconds
                for tid, used in threads.items()
                if used - self._threads_before[name].get(tid, 0.0) > 0}
        return self

    def describe(self, names: Iterable[str] | None = None) -> list[str]:
        lines = []
        for name in names if names is not None else sorted(self.pids):
            share = self.shares.get(name)
            threads = ", ".join(f"{tid}: {s:.2%}" for tid, s in
                                sorted(self.thread_shares.get(name, {}).items(),
                                       key=lambda item: -item[1]))
            lines.append(f"{name} (pid {self.pids[name]}): "
                         f"{'gone' if share is None else f'{share:.2%}'} of a core"
                         + (f" (threads: {threads})" if threads else ""))
        return lines
