"""The tracked dataplane against a real kernel and a real wireguard-go: drift behind the
agent's back is repaired by the next resync, and an apply error makes the next pass read.

The agent's mesh apply (`apply_device_tracked` over the userspace backend, `apply_routes`
over `NetlinkRoutes`) runs in a throwaway namespace made by the userspace backend's test
lab (`mgt-wg-<pid>-…`, wireguard-go with a private socket folder); the trackers get a
clock the test moves, so "the resync is due" needs no sleeping.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.mesh import RouteSpec
from nodeagent.routes import NetlinkRoutes, RoutePlan, apply_routes
from nodeagent.tracker import TrackedDataplane, apply_device_tracked
from tests.privileged.conftest import call_in_netns
from tests.privileged.test_wireguard_userspace import Lab, ip, pubkey
from wireguard.errors import UapiError
from wireguard.keys import generate_private_key, key_to_hex
from wireguard.model import Device, Peer
from wireguard.plan import DevicePlan

pytestmark = pytest.mark.privileged

IFACE = "mgt0"
RESYNC = 10.0
KEYS = [pubkey() for _ in range(4)]
FALLBACK = RouteSpec(dst=ipaddress.ip_network("198.18.0.0/16"), type="unreachable")


def desired(count: int, private: str) -> tuple[Device, tuple[RouteSpec, ...]]:
    """The mesh for `count` remote nodes: one peer and one route each, and the fallback."""
    peers = [Peer(KEYS[i], endpoint=f"192.0.2.{i + 1}:51820",
                  allowed_ips=[f"198.18.{i + 1}.0/24"]) for i in range(count)]
    routes = tuple(sorted([FALLBACK, *(RouteSpec(dst=p.allowed_ips[0], oif=IFACE)
                                       for p in peers)]))
    return Device(IFACE, private_key=private, listen_port=51820, mtu=1420, peers=peers), routes


class Mesh:
    """The agent's mesh apply in one namespace, with a clock the test moves."""

    def __init__(self, lab: Lab) -> None:
        self.ns = lab.netns()
        self.backend = lab.backend(self.ns)
        lab.devices.append((self.backend, IFACE))
        self.routes: NetlinkRoutes = call_in_netns(self.ns, lambda: NetlinkRoutes(IFACE))
        self.now = 1000.0
        self.wg = TrackedDataplane("wireguard", resync_interval=RESYNC, clock=self.clock)
        self.rt = TrackedDataplane("routes", resync_interval=RESYNC, clock=self.clock)
        self.private = generate_private_key()

    def clock(self) -> float:
        return self.now

    def reconcile(self, count: int) -> tuple[DevicePlan, RoutePlan]:
        device, routes = desired(count, self.private)
        return (apply_device_tracked(self.backend, device, self.wg),
                apply_routes(self.routes, routes, self.rt))

    def kernel_peers(self) -> list[str]:
        found = self.backend.read(IFACE)
        return sorted(p.public_key for p in found.peers) if found else []

    def kernel_routes(self) -> list[str]:
        lines = ip("-n", self.ns, "-4", "route", "show", "proto", "109").splitlines()
        return sorted(next(word for word in line.split() if "/" in word) for line in lines)


@pytest.fixture
def mesh(have_tool: Callable[[str], None]) -> Iterator[Mesh]:
    have_tool("wireguard-go")
    lab = Lab()
    made = None
    try:
        made = Mesh(lab)
        yield made
    finally:
        if made is not None:
            made.routes.close()
        lab.close()


ALL_ROUTES = ["198.18.0.0/16", "198.18.1.0/24", "198.18.2.0/24", "198.18.3.0/24"]


def test_drift_behind_the_agents_back_is_repaired_by_the_next_resync(mesh: Mesh) -> None:
    mesh.reconcile(3)
    assert mesh.wg.last_pass_read and mesh.rt.last_pass_read
    assert mesh.kernel_peers() == sorted(KEYS[:3])
    assert mesh.kernel_routes() == ALL_ROUTES

    # Behind the agent's back: a peer and a route go.
    mesh.backend.request(IFACE, f"set=1\npublic_key={key_to_hex(KEYS[1])}\nremove=true\n\n")
    ip("-n", mesh.ns, "route", "del", "198.18.2.0/24", "proto", "109")
    # An event-triggered pass plans against the tracked state: it does not see the drift.
    mesh.now += RESYNC / 2
    wg_plan, route_plan = mesh.reconcile(3)
    assert wg_plan.empty and route_plan.empty
    assert not mesh.wg.last_pass_read and not mesh.rt.last_pass_read
    assert KEYS[1] not in mesh.kernel_peers()
    # The periodic resync reads the kernel and puts both back; nothing else is touched.
    mesh.now += RESYNC / 2
    wg_plan, route_plan = mesh.reconcile(3)
    assert mesh.wg.last_pass_read and mesh.rt.last_pass_read
    assert [p.public_key for p in wg_plan.add_peers] == [KEYS[1]]
    assert not wg_plan.update_peers and not wg_plan.remove_peers
    assert [str(r.dst) for r in route_plan.add] == ["198.18.2.0/24"]
    assert mesh.kernel_peers() == sorted(KEYS[:3])
    assert mesh.kernel_routes() == ALL_ROUTES


def test_a_route_error_makes_the_next_pass_read_the_kernel(mesh: Mesh) -> None:
    mesh.reconcile(2)
    # The mesh link goes down behind the agent's back: the kernel drops every route
    # through it, and a new one is refused (ENETDOWN).
    ip("-n", mesh.ns, "link", "set", IFACE, "down")
    assert mesh.kernel_routes() == ["198.18.0.0/16"]
    with pytest.raises(OSError) as failed:
        mesh.reconcile(3)  # the WireGuard step succeeds; the new route is refused
    assert failed.value.errno == 100  # ENETDOWN
    assert not mesh.rt.trusted
    # Back up; the next pass is not a resync, but after the error it reads the kernel,
    # finds every route gone, and puts them all back.
    ip("-n", mesh.ns, "link", "set", IFACE, "up")
    mesh.now += 1
    _, route_plan = mesh.reconcile(3)
    assert mesh.rt.last_pass_read
    assert [str(r.dst) for r in route_plan.add] == ALL_ROUTES[1:]
    assert mesh.kernel_routes() == ALL_ROUTES


def test_a_wireguard_error_makes_the_next_pass_read_the_device(mesh: Mesh) -> None:
    mesh.reconcile(2)
    # Behind the agent's back a peer goes, then wireguard-go stops answering a while.
    mesh.backend.request(IFACE, f"set=1\npublic_key={key_to_hex(KEYS[0])}\nremove=true\n\n")
    sock = mesh.backend.socket_path(IFACE)
    hidden = Path(f"{sock}.hidden")
    os.rename(sock, hidden)
    try:
        with pytest.raises(UapiError):
            mesh.reconcile(3)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.rename(hidden, sock)
    assert not mesh.wg.trusted
    mesh.now += 1
    wg_plan, _ = mesh.reconcile(3)
    assert mesh.wg.last_pass_read
    assert sorted(p.public_key for p in wg_plan.add_peers) == \
        sorted([KEYS[0], KEYS[2]])
    assert mesh.kernel_peers() == sorted(KEYS[:3])



def test_a_node_that_leaves_loses_its_peer_and_its_route(mesh: Mesh) -> None:
    """Deletes really delete: the route through the mesh (scope link) and the peer go,
    the others and the fail-closed fallback stay; a resync then finds nothing to do."""
    mesh.reconcile(3)
    _, route_plan = mesh.reconcile(2)
    assert [str(r.dst) for r in route_plan.remove] == ["198.18.3.0/24"]
    assert mesh.kernel_peers() == sorted(KEYS[:2])
    assert mesh.kernel_routes() == ALL_ROUTES[:3]
    mesh.now += RESYNC
    wg_plan, route_plan = mesh.reconcile(2)
    assert mesh.rt.last_pass_read and wg_plan.empty and route_plan.empty


def test_a_link_looked_up_from_outside_its_namespace_is_the_one_seen_inside(
        mesh: Mesh) -> None:
    from wireguard.links import Links

    mesh.reconcile(1)
    for name in (IFACE, "lo", "nonexistent0"):
        assert call_in_netns(mesh.ns, lambda n=name: Links().get(n)) == \
            Links(mesh.ns).get(name)
    assert Links(mesh.ns).get(IFACE) is not None
