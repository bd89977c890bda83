"""The SNAT flow log (`--flow-log PATH`): one JSON line per new flow a slot SNATs.

A partner asking "who behind egress IP E reached us at time T from port P?" needs the
mapping from (egress IP, port) back to the pod. conntrack knows it: a flow's original
tuple has the pod's address, its reply tuple the egress IP and port chosen by SNAT, and
the gateway put the slot's mark on it. So the log follows `conntrack -E -e NEW` (ctnetlink
events, per network namespace: it works in any netns) filtered to the gateways' marks,
and writes, per flow:

    {"time": "...", "slot": "<gateway>/<index>", "pod": "<namespace>/<name>" | null,
     "podIP": "...", "protocol": "tcp", "destination": "IP:port",
     "egress": "IP:port"}

The NEW event is sent when the flow is confirmed, after source NAT, so both the mark and
the SNATed tuple are known. The conntrack process is ours: started, restarted when it
exits, stopped by PID, and it dies with the gateway even when that is SIGKILLed
(`setpriv --pdeathsig`, when util-linux's setpriv is there).

`parse_conntrack_event` and `compute_flow_record` are pure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from meshgress.kernel_ids import FWMARK_MASK
from meshgress.slots import GATEWAY_MARK_BASE, MARK_SHIFT, SlotId

log = logging.getLogger("meshgress.gateway.flowlog")

GATEWAY_MARK_BIT = GATEWAY_MARK_BASE << MARK_SHIFT
"""Every gateway mark (0x80..0xfe in the mask) has this bit; node marks never do on a
gateway's flows."""


@dataclass(frozen=True)
class FlowEvent:
    protocol: str
    source: str
    destination: str
    source_port: int | None
    destination_port: int | None
    reply_destination: str
    reply_destination_port: int | None
    mark: int


def parse_conntrack_event(line: str) -> FlowEvent | None:
    """One line of `conntrack -E` output, or None when it is not a NEW event with both
    tuples. Purely computational."""
    tokens = line.split()
    if "[NEW]" not in tokens:
        return None
    start = tokens.index("[NEW]")
    if len(tokens) <= start + 1:
        return None
    protocol = tokens[start + 1]
    tuples: list[dict[str, str]] = [{}]
    mark = 0
    for token in tokens[start + 2:]:
        key, sep, value = token.partition("=")
        if not sep:
            continue
        if key == "mark":
            with contextlib.suppress(ValueError):
                mark = int(value, 0)
            continue
        if key in tuples[-1] and key in ("src", "dst", "sport", "dport"):
            tuples.append({})
        tuples[-1][key] = value
    if len(tuples) < 2 or "src" not in tuples[0] or "dst" not in tuples[1]:
        return None

    def port(values: dict[str, str], key: str) -> int | None:
        text = values.get(key)
        return int(text) if text and text.isdigit() else None

    original, reply = tuples[0], tuples[1]
    return FlowEvent(protocol=protocol, source=original["src"],
                     destination=original.get("dst", ""),
                     source_port=port(original, "sport"),
                     destination_port=port(original, "dport"),
                     reply_destination=reply["dst"],
                     reply_destination_port=port(reply, "dport"), mark=mark)


def _join(address: str, port: int | None) -> str:
    if port is None:
        return address
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]:{port}"
    return f"{address}:{port}"


def compute_flow_record(event: FlowEvent, slots_by_mark: Mapping[int, SlotId],
                        pods_by_ip: Mapping[str, str], when: str) -> dict[str, Any] | None:
    """The JSON record of a new SNATed flow, or None when the flow is not a slot's.
    Purely computational."""
    slot = slots_by_mark.get(event.mark & FWMARK_MASK)
    if slot is None:
        return None
    return {"time": when, "slot": f"{slot.gateway}/{slot.index}",
            "pod": pods_by_ip.get(event.source), "podIP": event.source,
            "protocol": event.protocol,
            "destination": _join(event.destination, event.destination_port),
            "egress": _join(event.reply_destination, event.reply_destination_port)}


class FlowLog:
    """Follows conntrack events on a thread and appends records to `path`."""

    def __init__(self, path: Path, command: tuple[str, ...] = ("conntrack",)) -> None:
        self.path = path
        self.command = command
        self._lock = threading.Lock()
        self._slots: dict[int, SlotId] = {}
        self._pods: dict[str, str] = {}
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self.written = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="flow-log", daemon=True)

    def start(self) -> FlowLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def update(self, slots_by_mark: Mapping[int, SlotId], pods_by_ip: Mapping[str, str]) -> None:
        with self._lock:
            self._slots = dict(slots_by_mark)
            self._pods = dict(pods_by_ip)

    def _argv(self) -> list[str]:
        argv = [*self.command, "-E", "-e", "NEW",
                "--mark", f"{GATEWAY_MARK_BIT:#x}/{GATEWAY_MARK_BIT:#x}"]
        # setpriv (util-linux) sets the parent-death signal and execs conntrack, so it
        # dies with the gateway even when that is SIGKILLed (no preexec_fn in a threaded
        # process).
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "TERM", *argv] if setpriv else argv

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, bufsize=1)
            except OSError as exc:
                self.errors += 1
                log.warning("flow log: cannot start conntrack: %s", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            self._proc = proc
            assert proc.stdout is not None
            with self.path.open("a", encoding="utf-8") as out:
                self._follow(proc.stdout, out)
            self._terminate(proc)
            if not self._stop.is_set():
                self.errors += 1
                log.warning("flow log: conntrack exited (%s); restarting", proc.returncode)
                self._stop.wait(backoff)

    def _follow(self, stream: IO[str], out: IO[str]) -> None:
        for line in stream:
            if self._stop.is_set():
                return
            event = parse_conntrack_event(line)
            if event is None:
                continue
            with self._lock:
                record = compute_flow_record(
                    event, self._slots, self._pods,
                    time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z")
            if record is not None:
                out.write(json.dumps(record, sort_keys=True) + "\n")
                out.flush()
                self.written += 1

    @staticmethod
    def _terminate(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=2)

    def close(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None:
            self._terminate(proc)
        if self._thread.is_alive():
            self._thread.join(timeout=3)
