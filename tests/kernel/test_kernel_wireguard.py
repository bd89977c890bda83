"""The kernel backend against the real Linux WireGuard module, in throwaway namespaces.

The kernel counterpart of tests/privileged/test_wireguard_userspace.py: the same
plan/apply cases, run through `KernelBackend` (pyroute2 generic netlink and rtnetlink),
read back through it and cross-checked with `wg show ... dump` (wireguard-tools, an
independent reader), plus what only the kernel has (a dump split over several netlink
messages, errno from the kernel). Every WireGuard link here is created and configured by
meshgress code; `ip` only builds the underlay (veth, addresses, routes) around it.

Run by tests/kernel/run-vm: natively when the host kernel has WireGuard, otherwise in a
throwaway QEMU guest (where anything goes). Either way everything is made inside network
namespaces named `mgt-kwg-<pid of the test run>-<random>`, never in the caller's own, and
removed afterwards; leftovers of crashed runs (their PID gone) are removed first.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import WireGuard

from meshgress.lab.netns import pid_alive
from wireguard.backend import apply_device, detect_backend
from wireguard.errors import NetlinkRequestError, NotWireGuardDeviceError
from wireguard.kernel import KernelBackend
from wireguard.keys import generate_private_key, public_key
from wireguard.links import Links
from wireguard.model import Device, Peer, PeerStats, parse_endpoint
from wireguard.plan import DevicePlan, plan_device

pytestmark = pytest.mark.kernel

PREFIX = "mgt-kwg-"
RUN = f"{PREFIX}{os.getpid()}-"
LEFTOVER = re.compile(rf"^{PREFIX}(\d+)-")


def ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _remove_leftovers_of_crashed_runs(have_tool: Callable[[str], None]) -> None:
    for tool in ("ip", "wg", "ping"):
        have_tool(tool)
    for ns in netns_names():
        match = LEFTOVER.match(ns)
        if match and not pid_alive(int(match.group(1))):
            ip("netns", "del", ns, check=False)  # its WireGuard links go with it


# --- a backend that records what it sends ------------------------------------------------


class _RecordingWireGuard:
    """A pyroute2 WireGuard socket that records every `set` before sending it."""

    def __init__(self, wg: Any, sent: list[dict[str, Any]]) -> None:
        self._wg = wg
        self._sent = sent

    def set(self, **kwargs: Any) -> Any:
        self._sent.append(kwargs)
        return self._wg.set(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wg, name)


class _RecordingLinks(Links):
    def __init__(self, netns: str | None, sent: list[tuple[Any, ...]]) -> None:
        super().__init__(netns)
        self._sent = sent

    def add(self, name: str, kind: str) -> None:
        self._sent.append(("link add", name, kind))
        super().add(name, kind)

    def configure(self, name: str, *, mtu: int | None, up: bool | None) -> None:
        if mtu is not None or up is not None:
            self._sent.append(("link set", name, mtu, up))
        super().configure(name, mtu=mtu, up=up)

    def delete(self, name: str) -> bool:
        self._sent.append(("link del", name))
        return super().delete(name)


class RecordingBackend(KernelBackend):
    """KernelBackend that records every request that changes something: `sent` holds
    the keyword arguments of each WireGuard `set`, `link_ops` each rtnetlink change."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.sent: list[dict[str, Any]] = []
        self.link_ops: list[tuple[Any, ...]] = []
        self.links = _RecordingLinks(netns, self.link_ops)

    def _wg(self) -> Any:
        return _RecordingWireGuard(super()._wg(), self.sent)

    def clear(self) -> None:
        self.sent.clear()
        self.link_ops.clear()

    def touched_peers(self) -> list[str]:
        return [r["peer"]["public_key"] for r in self.sent if "peer" in r]


class Lab:
    """The namespaces one test made, and their removal (which removes their links)."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def netns(self) -> str:
        name = f"{RUN}{secrets.token_hex(3)}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        for ns in self.namespaces:
            ip("netns", "del", ns, check=False)
        leftover = [ns for ns in self.namespaces if ns in netns_names()]
        assert not leftover, f"namespaces left behind: {leftover}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


def apply(backend: KernelBackend, desired: Device) -> DevicePlan:
    plan = plan_device(desired, backend.read(desired.name))
    backend.apply(plan)
    return plan


def pubkey() -> str:
    return public_key(generate_private_key())


def wg_dump(ns: str, name: str) -> list[list[str]]:
    """`wg show NAME dump` in the namespace, as rows of fields (an independent reader)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "wg", "show", name, "dump"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def dump_as_device(rows: list[list[str]], name: str, *, mtu: int, up: bool) -> Device:
    """What `wg show dump` says, as the model (for comparison with the desired device)."""
    private, _public, port, fwmark = rows[0]
    peers = []
    for key, _psk, endpoint, allowed, _hs, _rx, _tx, keepalive in rows[1:]:
        peers.append(Peer(key, endpoint=None if endpoint == "(none)" else endpoint,
                          allowed_ips=[] if allowed == "(none)" else allowed.split(","),
                          persistent_keepalive=0 if keepalive == "off" else int(keepalive)))
    return Device(name, private_key=None if private == "(none)" else private,
                  listen_port=int(port), fwmark=0 if fwmark == "off" else int(fwmark, 16),
                  mtu=mtu, up=up, peers=peers)


def sample_device(private: str, peers: tuple[Peer, ...] = ()) -> Device:
    return Device("mgt0", private_key=private, listen_port=51820, peers=peers)


# --- one namespace ---------------------------------------------------------------------


def test_apply_then_read_back(lab: Lab) -> None:
    ns = lab.netns()
    backend = RecordingBackend(ns)
    desired = Device("mgt0", private_key=generate_private_key(), listen_port=51820,
                     fwmark=0x42, mtu=1380, peers=(
        Peer(pubkey(), endpoint="192.0.2.2:51820",
             allowed_ips=["198.18.1.0/24", "fd00:1::/64"], persistent_keepalive=25),
        Peer(pubkey(), endpoint="[2001:db8::2]:51821", allowed_ips=["198.18.2.0/24"]),
        Peer(pubkey()),
    ))
    assert backend.read("mgt0") is None
    plan = apply(backend, desired)
    assert plan.create
    assert backend.link_ops == [("link add", "mgt0", "wireguard"),
                                ("link set", "mgt0", 1380, True)]
    assert len(backend.sent) == 1 + len(desired.peers)  # the device, then one per peer

    assert backend.read("mgt0") == desired
    link = backend.links.get("mgt0")
    assert link is not None and (link.kind, link.mtu, link.up) == ("wireguard", 1380, True)
    assert dump_as_device(wg_dump(ns, "mgt0"), "mgt0", mtu=1380, up=True) == desired
    assert backend.stats("mgt0") == tuple(PeerStats(p.public_key) for p in desired.peers)


def test_reapplying_the_same_state_sends_nothing_even_after_a_restart(lab: Lab) -> None:
    ns = lab.netns()
    backend = RecordingBackend(ns)
    desired = sample_device(generate_private_key(), (
        Peer(pubkey(), endpoint="192.0.2.2:51820", allowed_ips=["198.18.1.0/24"]),))
    apply(backend, desired)
    backend.clear()

    again = apply(backend, desired)
    assert again.empty
    assert (backend.sent, backend.link_ops) == ([], [])

    # A new backend (an agent after a restart) adopts the device it finds.
    adopted = RecordingBackend(ns)
    assert adopted.read("mgt0") == desired
    adopted.apply(plan_device(desired, adopted.read("mgt0")))
    assert (adopted.sent, adopted.link_ops) == ([], [])


# Each case: the base device, then a change; what the kernel must then hold, and whom
# the change may touch (peer keys by name, or "device" for key/port/fwmark).
K = {name: pubkey() for name in ("a", "b", "c", "d")}
BASE_PRIVATE = generate_private_key()
NEW_PRIVATE = generate_private_key()


def base_peers(**changed: Peer | None) -> tuple[Peer, ...]:
    peers: dict[str, Peer | None] = {
        "a": Peer(K["a"], endpoint="192.0.2.2:51820",
                  allowed_ips=["198.18.1.0/24", "fd00:1::/64"], persistent_keepalive=25),
        "b": Peer(K["b"], endpoint="[2001:db8::2]:51821", allowed_ips=["198.18.2.0/24"]),
        "c": Peer(K["c"]),
    }
    peers.update(changed)
    return tuple(p for p in peers.values() if p is not None)


def base_device(**fields: Any) -> Device:
    values: dict[str, Any] = {"private_key": BASE_PRIVATE, "listen_port": 51820,
                              "fwmark": 0x42, "mtu": 1420, "peers": base_peers()}
    values.update(fields)
    return Device("mgt0", **values)


@dataclass(frozen=True)
class Change:
    desired: Device
    touches: tuple[str, ...]  # "device" and/or the names of the peers a request names
    link: tuple[int | None, bool | None] | None = None  # (mtu, up) sent, if any
    expected: Device | None = None  # what the kernel then holds, when not `desired`


CHANGES = {
    "new-private-key": Change(base_device(private_key=NEW_PRIVATE), ("device",)),
    "new-listen-port": Change(base_device(listen_port=51821), ("device",)),
    "fwmark-cleared": Change(base_device(fwmark=0), ("device",)),
    "mtu-and-link-down": Change(base_device(mtu=1380, up=False), (), link=(1380, False)),
    "peer-endpoint-changed": Change(base_device(peers=base_peers(a=Peer(
        K["a"], endpoint="192.0.2.77:51820", allowed_ips=["198.18.1.0/24", "fd00:1::/64"],
        persistent_keepalive=25))), ("a",)),
    "peer-keepalive-off": Change(base_device(peers=base_peers(a=Peer(
        K["a"], endpoint="192.0.2.2:51820", allowed_ips=["198.18.1.0/24", "fd00:1::/64"]))),
        ("a",)),
    "allowed-ips-replaced": Change(base_device(peers=base_peers(b=Peer(
        K["b"], endpoint="[2001:db8::2]:51821", allowed_ips=["198.18.3.0/24", "fd00:3::/64"]))),
        ("b",)),
    "allowed-ips-cleared": Change(base_device(peers=base_peers(a=Peer(
        K["a"], endpoint="192.0.2.2:51820", persistent_keepalive=25))), ("a",)),
    "allowed-ip-moved-to-another-peer": Change(base_device(peers=base_peers(
        b=Peer(K["b"], endpoint="[2001:db8::2]:51821"),
        c=Peer(K["c"], allowed_ips=["198.18.2.0/24"]))), ("b", "c")),
    "peer-added": Change(base_device(peers=(*base_peers(), Peer(
        K["d"], endpoint="192.0.2.4:51820", allowed_ips=["198.18.4.0/24"]))), ("d",)),
    "peer-removed": Change(base_device(peers=base_peers(c=None)), ("c",)),
    "endpoint-left-to-roaming": Change(  # endpoint None: not configured here, kept
        base_device(peers=base_peers(a=Peer(K["a"], allowed_ips=["198.18.1.0/24",
                                                                 "fd00:1::/64"],
                                            persistent_keepalive=25))),
        (), expected=base_device()),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_sends_only_what_differs_and_reads_back(lab: Lab, change: Change) -> None:
    ns = lab.netns()
    backend = RecordingBackend(ns)
    apply(backend, base_device())
    assert backend.read("mgt0") == base_device()
    backend.clear()

    apply(backend, change.desired)

    names = {key: name for name, key in K.items()}
    touched = ["device" for r in backend.sent if "peer" not in r]
    touched += [names[key] for key in backend.touched_peers()]
    assert sorted(touched) == sorted(change.touches)
    assert backend.link_ops == ([] if change.link is None else [("link set", "mgt0",
                                                                 *change.link)])
    expected = change.expected or change.desired
    observed = backend.read("mgt0")
    assert observed == expected
    assert dump_as_device(wg_dump(ns, "mgt0"), "mgt0", mtu=expected.mtu,
                          up=expected.up) == expected
    assert plan_device(change.desired, observed).empty


def test_delete_removes_the_link_and_is_idempotent(lab: Lab) -> None:
    ns = lab.netns()
    backend = KernelBackend(ns)
    apply(backend, sample_device(generate_private_key()))
    assert backend.read("mgt0") is not None

    backend.delete("mgt0")
    assert backend.read("mgt0") is None
    assert backend.stats("mgt0") == ()
    assert "mgt0" not in ip("-n", ns, "-o", "link", "show")
    backend.delete("mgt0")


def test_kernel_error_is_raised_with_its_errno(lab: Lab) -> None:
    """Two devices cannot listen on one port in one namespace: the kernel says
    EADDRINUSE, and the error carries it (branch on errno, never on text)."""
    ns = lab.netns()
    backend = KernelBackend(ns)
    first = sample_device(generate_private_key())
    apply(backend, first)
    other = Device("mgt1", private_key=generate_private_key(), listen_port=51820)
    with pytest.raises(NetlinkRequestError) as info:
        apply(backend, other)
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.temporary
    assert backend.read("mgt0") == first  # unharmed


def test_update_of_a_peer_that_vanished_does_not_recreate_it(lab: Lab) -> None:
    """`update_only`: a plan made before a peer was removed behind our back must not
    re-create that peer half-configured; the next reconcile adds it whole."""
    ns = lab.netns()
    backend = KernelBackend(ns)
    peer = Peer(pubkey(), endpoint="192.0.2.2:51820", allowed_ips=["198.18.1.0/24"])
    apply(backend, sample_device(BASE_PRIVATE, (peer,)))
    moved = Peer(peer.public_key, endpoint="192.0.2.3:51820", allowed_ips=["198.18.1.0/24"])
    desired = sample_device(BASE_PRIVATE, (moved,))
    stale_plan = plan_device(desired, backend.read("mgt0"))
    assert [u.public_key for u in stale_plan.update_peers] == [peer.public_key]

    subprocess.run(["ip", "netns", "exec", ns, "wg", "set", "mgt0", "peer", peer.public_key,
                    "remove"], check=True, timeout=60)
    backend.apply(stale_plan)
    assert backend.read("mgt0") == sample_device(BASE_PRIVATE)  # not re-created

    apply(backend, desired)
    assert backend.read("mgt0") == desired


def test_a_foreign_interface_is_not_mistaken_for_wireguard(lab: Lab) -> None:
    ns = lab.netns()
    ip("-n", ns, "link", "add", "mgt0", "type", "veth", "peer", "name", "mgt0p")
    backend = KernelBackend(ns)
    with pytest.raises(NotWireGuardDeviceError, match="not a kernel WireGuard device"):
        backend.read("mgt0")
    with pytest.raises(NotWireGuardDeviceError):
        backend.delete("mgt0")
    with pytest.raises(NetlinkRequestError) as info:
        backend.apply(plan_device(sample_device(generate_private_key()), None))
    assert info.value.errno == errno.EEXIST
    assert "mgt0@mgt0p" in ip("-n", ns, "-o", "link", "show")  # left alone


def test_one_name_in_two_namespaces_is_two_devices(lab: Lab) -> None:
    first, second = KernelBackend(lab.netns()), KernelBackend(lab.netns())
    one = sample_device(generate_private_key(), (Peer(pubkey(), allowed_ips=["198.18.1.0/24"]),))
    two = sample_device(generate_private_key(), (Peer(pubkey(), allowed_ips=["198.18.1.0/24"]),))
    apply(first, one)
    apply(second, two)  # the same port too: another namespace, another socket
    assert (first.read("mgt0"), second.read("mgt0")) == (one, two)


def test_detect_backend_picks_the_kernel_and_apply_device_reconciles(lab: Lab) -> None:
    ns = lab.netns()
    backend = detect_backend(netns=ns)
    assert backend.kind == "kernel"
    desired = sample_device(generate_private_key(), (Peer(pubkey(),
                                                          allowed_ips=["198.18.1.0/24"]),))
    assert apply_device(backend, desired).create
    assert apply_device(backend, desired).empty
    assert backend.read("mgt0") == desired


def test_a_device_too_big_for_one_netlink_message_reads_back_whole(lab: Lab) -> None:
    """The kernel splits a big dump over several messages and repeats a peer whose
    allowed-ips continue in the next one; the backend must merge them."""
    ns = lab.netns()
    backend = KernelBackend(ns)
    many = [f"10.{i // 250}.{i % 250}.0/24" for i in range(1500)]
    desired = sample_device(generate_private_key(), (
        Peer(pubkey(), endpoint="192.0.2.2:51820", allowed_ips=many),
        *(Peer(pubkey(), allowed_ips=[f"198.18.{i}.0/24", f"fd00:{i:x}::/64"])
          for i in range(40)),
    ))
    apply(backend, desired)

    with WireGuard(netns=ns, flags=0) as wg:
        assert len(list(wg.info("mgt0"))) > 1  # the case under test really happened
    assert backend.read("mgt0") == desired
    assert dump_as_device(wg_dump(ns, "mgt0"), "mgt0", mtu=desired.mtu, up=True) == desired


# --- two namespaces, a real tunnel --------------------------------------------------------


UNDERLAYS = {
    "ipv4-underlay": ("192.0.2.1/24", "192.0.2.2/24", "192.0.2.2:51820", "192.0.2.98:51820"),
    "ipv6-underlay": ("2001:db8::1/64", "2001:db8::2/64", "[2001:db8::2]:51820",
                      "[2001:db8::98]:51820"),
}


class Pair:
    """ns1 and ns2 joined by a veth (the underlay) and a WireGuard tunnel between them,
    with a bystander peer on ns1 that is never reachable."""

    def __init__(self, lab: Lab, underlay: tuple[str, str, str, str]) -> None:
        addr1, addr2, endpoint2, self.other_endpoint = underlay
        self.ns1, self.ns2 = lab.netns(), lab.netns()
        ip("-n", self.ns1, "link", "add", "mgt-v1", "type", "veth", "peer", "name", "mgt-v2",
           "netns", self.ns2)
        for ns, dev, addr in ((self.ns1, "mgt-v1", addr1), (self.ns2, "mgt-v2", addr2)):
            ip("-n", ns, "addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            ip("-n", ns, "link", "set", dev, "up")
        self.key1, self.key2 = generate_private_key(), generate_private_key()
        self.bystander = Peer(pubkey(), endpoint=self.other_endpoint,
                              allowed_ips=["198.18.99.0/24"], persistent_keepalive=25)
        self.peer2 = Peer(public_key(self.key2), endpoint=endpoint2,
                          allowed_ips=["198.19.255.2/32"])
        self.device1 = Device("mgt0", private_key=self.key1, listen_port=51820,
                              peers=(self.peer2, self.bystander))
        # ns2 only answers: its peer has no endpoint (learnt from ns1's first packet), and
        # it is configured first, so ns1's first handshake initiation finds it listening.
        self.device2 = Device("mgt0", private_key=self.key2, listen_port=51820, peers=(
            Peer(public_key(self.key1), allowed_ips=["198.19.255.1/32"]),))
        self.b1, self.b2 = RecordingBackend(self.ns1), RecordingBackend(self.ns2)
        apply(self.b2, self.device2)
        apply(self.b1, self.device1)
        for ns, mine, theirs in ((self.ns1, "198.19.255.1/32", "198.19.255.2/32"),
                                 (self.ns2, "198.19.255.2/32", "198.19.255.1/32")):
            ip("-n", ns, "addr", "add", mine, "dev", "mgt0")
            ip("-n", ns, "route", "add", theirs, "dev", "mgt0")

    def ping(self, ns: str, address: str) -> subprocess.CompletedProcess[str]:
        # -w: keep trying for up to 20 s (survives one lost handshake initiation)
        return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "1", "-i", "0.2",
                               "-w", "20", address], capture_output=True, text=True, timeout=60)

    def stats_of_peer2(self) -> PeerStats:
        (stats,) = [s for s in self.b1.stats("mgt0") if s.public_key == self.peer2.public_key]
        return stats


@pytest.fixture(params=UNDERLAYS.values(), ids=UNDERLAYS.keys())
def pair(lab: Lab, request: pytest.FixtureRequest) -> Pair:
    return Pair(lab, request.param)


def test_ping_across_the_tunnel(pair: Pair) -> None:
    result = pair.ping(pair.ns1, "198.19.255.2")
    assert result.returncode == 0, result.stdout + result.stderr
    stats = pair.stats_of_peer2()
    assert stats.last_handshake is not None and stats.rx_bytes > 0 and stats.tx_bytes > 0
    assert pair.ping(pair.ns2, "198.19.255.1").returncode == 0
    # ns2 learnt ns1's endpoint from its packets (roaming); its desired endpoint is None,
    # so the plan leaves it alone.
    observed2 = pair.b2.read("mgt0")
    assert observed2 is not None and observed2.peers[0].endpoint is not None
    assert plan_device(pair.device2, observed2).empty


def test_changing_one_peer_leaves_the_others_untouched(pair: Pair) -> None:
    assert pair.ping(pair.ns1, "198.19.255.2").returncode == 0
    before = pair.stats_of_peer2()
    assert before.last_handshake is not None
    pair.b1.clear()

    new_endpoint = pair.other_endpoint.replace("98", "97")
    moved = Peer(pair.bystander.public_key, endpoint=new_endpoint,
                 allowed_ips=["198.18.98.0/24", "198.18.99.0/24"], persistent_keepalive=25)
    desired = Device("mgt0", private_key=pair.key1, listen_port=51820,
                     peers=(pair.peer2, moved))
    plan = apply(pair.b1, desired)

    assert [u.public_key for u in plan.update_peers] == [moved.public_key]
    assert not plan.add_peers and not plan.remove_peers
    address, port = parse_endpoint(new_endpoint)
    assert pair.b1.sent == [{"interface": "mgt0", "peer": {
        "public_key": moved.public_key, "update_only": True,
        "endpoint_addr": str(address), "endpoint_port": port,
        "replace_allowed_ips": True, "allowed_ips": ["198.18.98.0/24", "198.18.99.0/24"]}}]
    assert pair.b1.link_ops == []
    assert pair.b1.read("mgt0") == desired

    after = pair.stats_of_peer2()
    assert after.last_handshake == before.last_handshake  # no new handshake, session kept
    assert after.rx_bytes >= before.rx_bytes and after.tx_bytes >= before.tx_bytes
    time.sleep(0.05)
    assert pair.ping(pair.ns1, "198.19.255.2").returncode == 0
    again = pair.stats_of_peer2()
    assert again.last_handshake == before.last_handshake
    assert again.rx_bytes > before.rx_bytes
