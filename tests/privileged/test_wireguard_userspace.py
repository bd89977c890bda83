"""The userspace backend against real wireguard-go, in throwaway network namespaces.

Every namespace is named `mgt-wg-<pid of the test run>-<random>`; every wireguard-go runs
in a mount namespace of its own with a private socket folder
(`private_socket_dir_command`), so nothing here touches the host's network namespace or
its /var/run/wireguard. Each test removes what it made, also when it fails; leftovers
of crashed runs (their run's PID is gone) are removed first — by deleting their links,
which makes their wireguard-go exit by itself — never those of a run still going.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshgress.lab.netns import pid_alive
from wireguard.errors import DeviceStartError, NotWireGuardDeviceError, UapiError
from wireguard.keys import generate_private_key, key_to_hex, public_key
from wireguard.model import Device, Peer
from wireguard.plan import DevicePlan, plan_device
from wireguard.userspace import UserspaceBackend, private_socket_dir_command

pytestmark = pytest.mark.privileged

PREFIX = "mgt-wg-"
RUN = f"{PREFIX}{os.getpid()}-"
LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")
TMP = Path(tempfile.gettempdir())


def ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def remove_netns(ns: str) -> None:
    """Delete the namespace's links (a wireguard-go in it exits when its TUN goes away),
    then the namespace."""
    listing = ip("-n", ns, "-o", "link", "show", check=False)
    for line in listing.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            ip("-n", ns, "link", "del", name, check=False)
    ip("netns", "del", ns, check=False)


def netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _remove_leftovers_of_crashed_runs(have_tool: Callable[[str], None]) -> None:
    have_tool("wireguard-go")
    for ns in netns_names():
        match = LEFTOVER.match(ns)
        if match and not pid_alive(int(match.group(1))):
            remove_netns(ns)
    for path in TMP.glob(f"{PREFIX}*"):
        match = LEFTOVER.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class RecordingBackend(UserspaceBackend):
    """Records every request that changes something (everything but `get`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def request(self, name: str, text: str) -> str:
        if not text.startswith("get="):
            self.sent.append(text)
        return super().request(name, text)


class Lab:
    """Namespaces, socket folders and backends made by one test, and their removal."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.folders: list[Path] = []
        self.devices: list[tuple[UserspaceBackend, str]] = []

    def netns(self) -> str:
        name = f"{RUN}{secrets.token_hex(3)}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def backend(self, ns: str, socket_dir: Path | None = None) -> RecordingBackend:
        if socket_dir is None:
            socket_dir = Path(tempfile.mkdtemp(prefix=RUN, dir=TMP))
            self.folders.append(socket_dir)
        return RecordingBackend(socket_dir, netns=ns,
                                command=private_socket_dir_command(socket_dir))

    def apply(self, backend: UserspaceBackend, desired: Device) -> DevicePlan:
        if (backend, desired.name) not in self.devices:
            self.devices.append((backend, desired.name))
        plan = plan_device(desired, backend.read(desired.name))
        backend.apply(plan)
        return plan

    def close(self) -> None:
        pids = []
        for backend, name in self.devices:
            pid = backend.pid(name)
            if pid is not None:
                pids.append(pid)
            with contextlib.suppress(Exception):
                backend.delete(name)
        for ns in self.namespaces:
            remove_netns(ns)
        for pid in pids:  # only processes these tests started, by PID
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                if pid_alive(pid):
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        leftover = [ns for ns in self.namespaces if ns in netns_names()]
        assert not leftover, f"namespaces left behind: {leftover}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


def pubkey(n: int = 0) -> str:
    return public_key(generate_private_key())


def sample_device(private: str, peers: tuple[Peer, ...]) -> Device:
    return Device("mgt0", private_key=private, listen_port=51820, peers=peers)


# --- one namespace ---------------------------------------------------------------------


def test_apply_then_read_back(lab: Lab) -> None:
    ns = lab.netns()
    backend = lab.backend(ns)
    desired = Device("mgt0", private_key=generate_private_key(), listen_port=51820,
                     fwmark=0x42, mtu=1380, peers=(
        Peer(pubkey(), endpoint="192.0.2.2:51820",
             allowed_ips=["198.18.1.0/24", "fd00:1::/64"], persistent_keepalive=25),
        Peer(pubkey(), endpoint="[2001:db8::2]:51821", allowed_ips=["198.18.2.0/24"]),
        Peer(pubkey()),
    ))
    assert backend.read("mgt0") is None
    plan = lab.apply(backend, desired)
    assert plan.create

    assert backend.read("mgt0") == desired
    pid = backend.pid("mgt0")
    assert pid is not None
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "wireguard-go"
    assert (backend.socket_dir / "mgt0.sock").exists()
    link = backend.links.get("mgt0")
    assert link is not None and (link.kind, link.mtu, link.up) == ("tun", 1380, True)
    assert [s.public_key for s in backend.stats("mgt0")] == [p.public_key for p in desired.peers]


def test_reapplying_the_same_state_sends_nothing_even_after_a_restart(lab: Lab) -> None:
    ns = lab.netns()
    backend = lab.backend(ns)
    desired = sample_device(generate_private_key(), (
        Peer(pubkey(), endpoint="192.0.2.2:51820", allowed_ips=["198.18.1.0/24"]),))
    lab.apply(backend, desired)
    backend.sent.clear()

    again = lab.apply(backend, desired)
    assert again.empty
    assert backend.sent == []

    # A new backend (an agent after a restart) adopts the running wireguard-go.
    adopted = RecordingBackend(backend.socket_dir, netns=ns)
    assert adopted.read("mgt0") == desired
    adopted.apply(plan_device(desired, adopted.read("mgt0")))
    assert adopted.sent == []


def test_delete_stops_wireguard_go_and_is_idempotent(lab: Lab) -> None:
    ns = lab.netns()
    backend = lab.backend(ns)
    lab.apply(backend, sample_device(generate_private_key(), ()))
    pid = backend.pid("mgt0")
    assert pid is not None

    backend.delete("mgt0")
    assert backend.read("mgt0") is None
    assert not Path(f"/proc/{pid}").exists()  # exited and reaped
    assert not (backend.socket_dir / "mgt0.sock").exists()
    assert "mgt0" not in ip("-n", ns, "-o", "link", "show")
    backend.delete("mgt0")


def test_wireguard_go_exits_by_itself_when_its_link_is_deleted(lab: Lab) -> None:
    """What `delete` relies on: no signal is needed, removing the TUN link is enough."""
    ns = lab.netns()
    backend = lab.backend(ns)
    lab.apply(backend, sample_device(generate_private_key(), ()))
    proc = backend._processes["mgt0"]
    ip("-n", ns, "link", "del", "mgt0")
    assert proc.wait(timeout=5) == 0  # a clean exit, not a signal
    assert backend.read("mgt0") is None


def test_uapi_error_is_raised_with_its_errno(lab: Lab) -> None:
    ns = lab.netns()
    backend = lab.backend(ns)
    lab.apply(backend, sample_device(generate_private_key(), ()))
    with pytest.raises(UapiError) as info:
        backend.request("mgt0", "set=1\nlisten_port=not-a-port\n\n")
    assert info.value.errno == 22  # EINVAL; wireguard-go sends errno=-22


def test_second_wireguard_go_with_the_same_socket_fails_clearly(lab: Lab) -> None:
    """The socket folder is shared by every namespace that uses it: a second interface
    of the same name there must fail to start, not hijack the first one's socket."""
    first_ns, second_ns = lab.netns(), lab.netns()
    first = lab.backend(first_ns)
    lab.apply(first, sample_device(generate_private_key(), ()))
    second = lab.backend(second_ns, socket_dir=first.socket_dir)
    with pytest.raises(DeviceStartError, match="exited with status"):
        second.apply(plan_device(sample_device(generate_private_key(), ()), None))
    assert second.pid("mgt0") is None
    assert first.read("mgt0") is not None  # the first one is unharmed


def test_a_foreign_interface_is_not_mistaken_for_wireguard(lab: Lab) -> None:
    ns = lab.netns()
    ip("-n", ns, "link", "add", "mgt0", "type", "veth", "peer", "name", "mgt0p")
    backend = lab.backend(ns)
    with pytest.raises(NotWireGuardDeviceError, match="not a wireguard-go device"):
        backend.read("mgt0")
    with pytest.raises(NotWireGuardDeviceError):
        backend.delete("mgt0")
    assert "mgt0@mgt0p" in ip("-n", ns, "-o", "link", "show")  # left alone


# --- two namespaces, a real tunnel --------------------------------------------------------


class Pair:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns1, self.ns2 = lab.netns(), lab.netns()
        ip("-n", self.ns1, "link", "add", "mgt-v1", "type", "veth", "peer", "name", "mgt-v2",
           "netns", self.ns2)
        for ns, dev, addr in ((self.ns1, "mgt-v1", "192.0.2.1/24"),
                              (self.ns2, "mgt-v2", "192.0.2.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        self.key1, self.key2 = generate_private_key(), generate_private_key()
        self.bystander = Peer(pubkey(), endpoint="192.0.2.99:51820",
                              allowed_ips=["198.18.99.0/24"], persistent_keepalive=25)
        self.peer2 = Peer(public_key(self.key2), endpoint="192.0.2.2:51820",
                          allowed_ips=["198.19.255.2/32"])
        self.device1 = Device("mgt0", private_key=self.key1, listen_port=51820,
                              peers=(self.peer2, self.bystander))
        # ns2 only answers: its peer has no endpoint (learnt from ns1's first packet), and
        # it is configured first, so ns1's first handshake initiation — sent the moment
        # ns1 is configured — finds it listening (a lost one is retried only after 5 s).
        self.device2 = Device("mgt0", private_key=self.key2, listen_port=51820, peers=(
            Peer(public_key(self.key1), allowed_ips=["198.19.255.1/32"]),))
        self.b1, self.b2 = lab.backend(self.ns1), lab.backend(self.ns2)
        lab.apply(self.b2, self.device2)
        lab.apply(self.b1, self.device1)
        for ns, mine, theirs in ((self.ns1, "198.19.255.1/32", "198.19.255.2/32"),
                                 (self.ns2, "198.19.255.2/32", "198.19.255.1/32")):
            ip("-n", ns, "addr", "add", mine, "dev", "mgt0")
            ip("-n", ns, "route", "add", theirs, "dev", "mgt0")

    def ping(self, ns: str, address: str) -> subprocess.CompletedProcess[str]:
        # -w: keep trying for up to 12 s (survives one lost handshake initiation)
        return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-i", "0.2",
                               "-w", "12", address], capture_output=True, text=True, timeout=30)


@pytest.fixture
def pair(lab: Lab) -> Pair:
    return Pair(lab)


def test_ping_across_the_tunnel(pair: Pair) -> None:
    result = pair.ping(pair.ns1, "198.19.255.2")
    assert result.returncode == 0, result.stdout + result.stderr
    (stats,) = [s for s in pair.b1.stats("mgt0") if s.public_key == pair.peer2.public_key]
    assert stats.last_handshake is not None and stats.rx_bytes > 0 and stats.tx_bytes > 0
    assert pair.ping(pair.ns2, "198.19.255.1").returncode == 0


def test_changing_one_peer_leaves_the_others_untouched(pair: Pair) -> None:
    assert pair.ping(pair.ns1, "198.19.255.2").returncode == 0
    (before,) = [s for s in pair.b1.stats("mgt0") if s.public_key == pair.peer2.public_key]
    assert before.last_handshake is not None
    pair.b1.sent.clear()

    moved = Peer(pair.bystander.public_key, endpoint="192.0.2.98:51820",
                 allowed_ips=["198.18.98.0/24", "198.18.99.0/24"], persistent_keepalive=25)
    desired = Device("mgt0", private_key=pair.key1, listen_port=51820,
                     peers=(pair.peer2, moved))
    plan = pair.lab.apply(pair.b1, desired)

    assert [u.public_key for u in plan.update_peers] == [moved.public_key]
    assert not plan.add_peers and not plan.remove_peers
    assert pair.b1.sent == [
        "set=1\n"
        f"public_key={key_to_hex(moved.public_key)}\n"
        "update_only=true\n"
        "endpoint=192.0.2.98:51820\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=198.18.98.0/24\n"
        "allowed_ip=198.18.99.0/24\n"
        "\n"
    ]
    assert key_to_hex(pair.peer2.public_key) not in pair.b1.sent[0]
    assert pair.b1.read("mgt0") == desired

    (after,) = [s for s in pair.b1.stats("mgt0") if s.public_key == pair.peer2.public_key]
    assert after.last_handshake == before.last_handshake  # no new handshake, session kept
    assert after.rx_bytes >= before.rx_bytes and after.tx_bytes >= before.tx_bytes
    time.sleep(0.05)
    assert pair.ping(pair.ns1, "198.19.255.2").returncode == 0
    (again,) = [s for s in pair.b1.stats("mgt0") if s.public_key == pair.peer2.public_key]
    assert again.last_handshake == before.last_handshake
    assert again.rx_bytes > before.rx_bytes
