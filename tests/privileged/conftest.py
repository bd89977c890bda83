"""Fixtures for privileged tests: throwaway network namespaces and processes inside them.

Everything a test makes lives in network namespaces it created (named with a prefix the
test run owns: `tests.run_owned`) and is removed afterwards, also when the test fails;
leftovers of a crashed earlier run (its namespaces, the server processes it recorded in
its pid directory) are removed before the first test that needs them. A run that is
still going is never touched, so sessions can run side by side. Nothing here configures the host's
own network namespace: commands run inside a namespace via `nsenter --net=`, and sockets
a test needs inside one are created by a short-lived thread that entered it (the test
process itself never leaves the host namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.run_owned import OWNER, is_crashed_runs, owned

NETNS_DIR = Path("/run/netns")
CNI_PREFIX = "mgt-cni-"
PIDS_ROOT = Path("/tmp/mgt-cni-pids")
PID_DIR = PIDS_ROOT / str(OWNER)
"""Helper processes this run started, one file per PID holding a marker of its command."""
CNI_BIN = Path("/usr/lib/cni")
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_root() -> None:
    """Privileged tests fail loudly without root or their tools; they never skip."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it creates network namespaces)")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed")


def run(argv: list[str], *, check: bool = True, input_text: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: exit {proc.returncode}: {proc.stderr or proc.stdout}")
    return proc


def nsexec(netns: str, *argv: str, check: bool = True, input_text: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command inside a named network namespace."""
    return run(["nsenter", f"--net={NETNS_DIR / netns}", *argv], check=check,
               input_text=input_text, timeout=timeout)


def ip_json(netns: str, *argv: str) -> Any:
    out = run(["ip", "-n", netns, "-j", *argv]).stdout
    return json.loads(out) if out.strip() else []


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def delete_netns(name: str) -> None:
    run(["ip", "netns", "delete", name], check=False)


def _set_pdeathsig() -> None:
    # The child dies with the test process, even if pytest is killed.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], *, log: Path | None = None, marker: str | None = None,
          **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a long-running helper, record its pid for crash cleanup, tie it to our life.

    `marker` (default: the last argument) must appear in the process's command line for a
    later cleanup to kill it, so a recycled pid is never killed.
    """
    PID_DIR.mkdir(parents=True, exist_ok=True)
    output = log.open("ab") if log else contextlib.nullcontext(subprocess.DEVNULL)
    with output as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=_set_pdeathsig, **kwargs)
    (PID_DIR / str(proc.pid)).write_text(marker or argv[-1])
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the CNI server dumps its stacks to its log
            time.sleep(0.5)
            proc.kill()
            proc.wait(5)
    (PID_DIR / str(proc.pid)).unlink(missing_ok=True)


def cleanup_leftovers(prefix: str) -> None:
    """Kill helper processes crashed runs recorded, then delete their namespaces."""
    runs = PIDS_ROOT.iterdir() if PIDS_ROOT.exists() else iter(())
    for run_dir in runs:
        if not run_dir.name.isdigit() or not is_crashed_runs(f"{run_dir.name}-", ""):
            continue
        for entry in run_dir.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
                if entry.read_text().encode() in cmdline:
                    os.kill(int(entry.name), signal.SIGKILL)
            entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    for name in list_netns(prefix):
        if is_crashed_runs(name, prefix):
            delete_netns(name)


def call_in_netns(netns: str, fn: Callable[[], Any]) -> Any:
    """`fn()` called by a short-lived thread that entered a named network namespace: what
    it creates (a socket) stays bound to that namespace (the test process never leaves
    the host's)."""
    box: dict[str, Any] = {}

    def enter() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def socket_in_netns(netns: str, family: int = socket.AF_INET,
                    kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket created inside a named network namespace (by a thread that entered it)."""
    sock: socket.socket = call_in_netns(netns, lambda: socket.socket(family, kind))
    return sock


@pytest.fixture(scope="session")
def _cni_session_cleanup() -> Iterator[None]:
    require_root()
    cleanup_leftovers(CNI_PREFIX)
    yield
    for name in list_netns(owned(CNI_PREFIX)):
        delete_netns(name)
    with contextlib.suppress(OSError):
        PID_DIR.rmdir()
    with contextlib.suppress(OSError):
        PIDS_ROOT.rmdir()  # only if no other run still records helpers there


@pytest.fixture
def netns_factory(_cni_session_cleanup: None) -> Iterator[Callable[[str], str]]:
    """Make throwaway namespaces `mgt-cni-<role>-<random>` (lo up); all deleted after."""
    made: list[str] = []

    def make(role: str = "ns") -> str:
        name = f"{owned(CNI_PREFIX)}{role}-{secrets.token_hex(3)}"
        run(["ip", "netns", "add", name])
        made.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            delete_netns(name)


# --- the CNI server and plugin --------------------------------------------------------


@pytest.fixture(scope="session")
def cni_plugin(tmp_path_factory: pytest.TempPathFactory, _cni_session_cleanup: None) -> Path:
    """The real plugin binary, installed as a CNI runtime would find it."""
    from cni.install import install_plugin

    return install_plugin(tmp_path_factory.mktemp("cni-bin"))


@dataclass
class CniResult:
    exit: int
    stdout: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def code(self) -> int | None:
        data = self.json
        return data.get("code") if isinstance(data, dict) else None


@dataclass
class CniNode:
    """A "node": a namespace running the CNI server, and the plugin binary to call it."""

    netns: str
    socket: Path
    state_dir: Path
    plugin: Path
    log: Path
    server_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    pod_cidr: str = "198.18.0.0/24"
    capabilities: tuple[str, ...] | None = None
    """The only capabilities the server keeps (setpriv: effective, permitted, inheritable,
    ambient and bounding sets), as the chart's agent container has them; None: all."""

    @property
    def delete_queue(self) -> Path:
        """The server's deletion queue (its default, under its state folder)."""
        return self.state_dir / "delete-queue"

    def start(self, *, wait: bool = True) -> None:
        self.socket.unlink(missing_ok=True)
        confine: list[str] = []
        if self.capabilities is not None:
            caps = ",".join(f"+{cap}" for cap in self.capabilities)
            confine = ["setpriv", f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}",
                       f"--bounding-set=-all,{caps}", "--no-new-privs"]
        self.process = spawn(
            ["nsenter", f"--net={NETNS_DIR / self.netns}", *confine, sys.executable, "-m",
             "cni.server", "--socket", str(self.socket), "--pod-cidr", self.pod_cidr,
             "--state-dir", str(self.state_dir), "--log-level", "INFO", *self.server_args],
            log=self.log, marker=str(self.socket),
        )
        if wait:
            wait_for_socket(self.socket, self.process, self.log)

    def capability_sets(self) -> dict[str, int]:
        """The server process's capability sets from /proc (CapEff, CapBnd, ...)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return {key: int(value, 16) for key, value in
                (line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))}

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def conf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "mgtest", "type": "meshgress-cni",
                "socket": str(self.socket), "deleteQueue": str(self.delete_queue), **extra}

    def call(self, command: str, container_id: str = "", netns: str = "", *,
             ifname: str = "eth0", args: str = "", conf: dict[str, Any] | None = None,
             env: dict[str, str] | None = None, timeout: float = 60) -> CniResult:
        environment = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
            "CNI_NETNS": str(NETNS_DIR / netns) if netns and not netns.startswith("/") else netns,
            "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": str(CNI_BIN),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        environment.update(env or {})
        proc = subprocess.run([str(self.plugin)], input=json.dumps(conf or self.conf()),
                              env=environment, capture_output=True, text=True, timeout=timeout)
        return CniResult(proc.returncode, proc.stdout)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"CNI server exited {proc.returncode}: {log.read_text()}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                return
        time.sleep(0.02)
    raise AssertionError(f"CNI server did not listen on {path}: {log.read_text()}")


@pytest.fixture
def cni_node_factory(
    netns_factory: Callable[[str], str], cni_plugin: Path, tmp_path: Path
) -> Iterator[Callable[..., CniNode]]:
    """Start CNI servers in fresh node namespaces; all stopped (and removed) after."""
    nodes: list[CniNode] = []

    def make(*server_args: str, start: bool = True, pod_cidr: str = "198.18.0.0/24",
             capabilities: tuple[str, ...] | None = None) -> CniNode:
        n = len(nodes)
        node = CniNode(
            netns=netns_factory("node"), socket=tmp_path / f"node{n}" / "cni.sock",
            state_dir=tmp_path / f"node{n}" / "state", plugin=cni_plugin,
            log=tmp_path / f"node{n}" / "server.log", server_args=list(server_args),
            pod_cidr=pod_cidr, capabilities=capabilities,
        )
        node.socket.parent.mkdir(parents=True, exist_ok=True)
        nodes.append(node)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def cni_node(cni_node_factory: Callable[..., CniNode]) -> CniNode:
    return cni_node_factory()
