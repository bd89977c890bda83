"""plan_device: the smallest change, as table tests and as properties."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wireguard.keys import encode_key, public_key
from wireguard.model import Device, Peer
from wireguard.plan import DevicePlan, PeerUpdate, plan_device


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


PRIVATE = key(1)
A, B, C = key(10), key(11), key(12)

PEER_A = Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24"],
              persistent_keepalive=25)
PEER_B = Peer(B, endpoint="192.0.2.11:51820", allowed_ips=["198.18.11.0/24", "fd00:11::/64"])
PEER_C = Peer(C, endpoint="192.0.2.12:51820", allowed_ips=["198.18.12.0/24"])

BASE = Device("meshgress0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, mtu=1420,
              peers=(PEER_A, PEER_B))


def with_(device: Device, **changes: Any) -> Device:
    return dataclasses.replace(device, **changes)


def with_peer(device: Device, peer: Peer) -> Device:
    others = tuple(p for p in device.peers if p.public_key != peer.public_key)
    return with_(device, peers=(*others, peer))


PLAN_CASES = [
    pytest.param(BASE, BASE, DevicePlan("meshgress0"), id="nothing-changed-is-empty"),
    pytest.param(
        BASE, None,
        DevicePlan("meshgress0", create=True, private_key=PRIVATE, listen_port=51820,
                   fwmark=0x1000, mtu=1420, link_up=True, add_peers=(PEER_A, PEER_B)),
        id="device-missing-creates-everything"),
    pytest.param(with_(BASE, peers=(PEER_A, PEER_B, PEER_C)), BASE,
                 DevicePlan("meshgress0", add_peers=(PEER_C,)), id="new-peer-added"),
    pytest.param(with_(BASE, peers=(PEER_A,)), BASE,
                 DevicePlan("meshgress0", remove_peers=(B,)), id="removed-peer"),
    pytest.param(
        with_peer(BASE, dataclasses.replace(PEER_B, endpoint="192.0.2.99:51820")), BASE,
        DevicePlan("meshgress0", update_peers=(PeerUpdate(B, endpoint="192.0.2.99:51820"),)),
        id="one-endpoint-changed-only-that-peer"),
    pytest.param(
        with_peer(BASE, Peer(B, endpoint="192.0.2.11:51820",
                             allowed_ips=["198.18.11.0/24", "198.18.111.0/24", "fd00:11::/64"])),
        BASE,
        DevicePlan("meshgress0", update_peers=(PeerUpdate(B, allowed_ips=Peer(
            B, allowed_ips=["198.18.11.0/24", "198.18.111.0/24", "fd00:11::/64"]).allowed_ips),)),
        id="allowed-ip-added-replaces-that-peers-set"),
    pytest.param(
        with_peer(BASE, Peer(B, endpoint="192.0.2.11:51820",
                             allowed_ips=["fd00:11::/64", "198.18.11.0/24", "198.18.11.0/24",
                                          "198.18.11.5/24"])),
        BASE, DevicePlan("meshgress0"), id="allowed-ips-reordered-duplicated-no-change"),
    pytest.param(
        with_peer(BASE, dataclasses.replace(PEER_A, persistent_keepalive=0)), BASE,
        DevicePlan("meshgress0", update_peers=(PeerUpdate(A, persistent_keepalive=0),)),
        id="keepalive-turned-off"),
    pytest.param(
        with_peer(BASE, dataclasses.replace(PEER_B, endpoint=None)), BASE,
        DevicePlan("meshgress0"), id="desired-endpoint-none-keeps-learnt-endpoint"),
    pytest.param(with_(BASE, listen_port=51821), BASE,
                 DevicePlan("meshgress0", listen_port=51821), id="port-change"),
    pytest.param(with_(BASE, listen_port=0), BASE, DevicePlan("meshgress0"),
                 id="port-zero-accepts-any-port"),
    pytest.param(with_(BASE, private_key=key(2)), BASE,
                 DevicePlan("meshgress0", private_key=key(2)), id="key-change"),
    pytest.param(with_(BASE, private_key=None), BASE, DevicePlan("meshgress0"),
                 id="key-none-leaves-key-alone"),
    pytest.param(with_(BASE, fwmark=0), BASE, DevicePlan("meshgress0", fwmark=0),
                 id="fwmark-cleared"),
    pytest.param(with_(BASE, mtu=1380), BASE, DevicePlan("meshgress0", mtu=1380),
                 id="mtu-change"),
    pytest.param(BASE, with_(BASE, up=False), DevicePlan("meshgress0", link_up=True),
                 id="link-down-is-brought-up"),
    pytest.param(
        with_(BASE, peers=(PEER_A, PEER_C)), BASE,
        DevicePlan("meshgress0", add_peers=(PEER_C,), remove_peers=(B,)),
        id="peer-replaced-by-another"),
]


@pytest.mark.parametrize(("desired", "observed", "expected"), PLAN_CASES)
def test_plan(desired: Device, observed: Device | None, expected: DevicePlan) -> None:
    plan = plan_device(desired, observed)
    assert plan == expected
    assert plan.empty == (expected == DevicePlan("meshgress0"))


def test_plan_against_other_interface_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot plan"):
        plan_device(BASE, with_(BASE, name="other0"))


def test_describe_never_shows_the_private_key() -> None:
    plan = plan_device(with_(BASE, peers=(PEER_A, PEER_C)), None)
    text = str(plan)
    assert PRIVATE not in text
    assert public_key(PRIVATE) in text
    assert plan.describe() == [
        "create interface",
        f"set private key (public key {public_key(PRIVATE)})",
        "set listen port 51820",
        "set fwmark 0x1000",
        f"add peer {A[:8]}… endpoint 192.0.2.10:51820 allowed-ips 198.18.10.0/24 keepalive 25s",
        f"add peer {C[:8]}… endpoint 192.0.2.12:51820 allowed-ips 198.18.12.0/24",
        "set mtu 1420",
        "set link up",
    ]
    assert PRIVATE not in repr(plan)


def test_describe_updates_and_removals() -> None:
    desired = with_(with_peer(BASE, Peer(B, allowed_ips=())), peers=(Peer(B, allowed_ips=()),))
    observed = with_(BASE, fwmark=0x2000)
    plan = plan_device(desired, observed)
    assert str(plan) == (f"meshgress0: set fwmark 0x1000; update peer {B[:8]}…: allowed-ips "
                         f"(none); remove peer {A[:8]}…")
    assert str(DevicePlan("meshgress0")) == "meshgress0: no change"


# --- properties -------------------------------------------------------------------------

KEYS = [key(n) for n in range(20, 26)]
NETS = [f"198.18.{n}.0/24" for n in range(8)] + ["fd00::/64", "fd00:1::/64", "198.19.0.0/16"]
ENDPOINTS = [None, "192.0.2.1:51820", "192.0.2.2:51820", "[2001:db8::1]:51820"]


@st.composite
def devices(draw: st.DrawFn, name: str = "meshgress0") -> Device:
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5))
    free = list(NETS)
    peers = []
    for k in keys:
        nets = draw(st.lists(st.sampled_from(free), unique=True, max_size=3)) if free else []
        free = [n for n in free if n not in nets]
        peers.append(Peer(k, endpoint=draw(st.sampled_from(ENDPOINTS)), allowed_ips=nets,
                          persistent_keepalive=draw(st.sampled_from([0, 0, 25]))))
    return Device(
        name,
        private_key=draw(st.sampled_from([None, key(1), key(2)])),
        listen_port=draw(st.sampled_from([0, 51820, 51821])),
        fwmark=draw(st.sampled_from([0, 0x1000])),
        mtu=draw(st.sampled_from([1420, 1380])),
        peers=tuple(peers),
        up=draw(st.booleans()),
    )


def apply_in_memory(plan: DevicePlan, observed: Device | None) -> Device:
    """What WireGuard does with a plan, written independently of the library's fake."""
    if observed is None:
        assert plan.create
        observed = Device(plan.name, up=False, mtu=1500)
    else:
        assert not plan.create
    peers = {p.public_key: p for p in observed.peers}
    for peer in plan.add_peers:
        assert peer.public_key not in peers, "add only missing peers"
        peers[peer.public_key] = peer
    for upd in plan.update_peers:
        old = peers[upd.public_key]
        peers[upd.public_key] = Peer(
            old.public_key,
            endpoint=old.endpoint if upd.endpoint is None else upd.endpoint,
            allowed_ips=old.allowed_ips if upd.allowed_ips is None else upd.allowed_ips,
            persistent_keepalive=(old.persistent_keepalive if upd.persistent_keepalive is None
                                  else upd.persistent_keepalive))
    for k in plan.remove_peers:
        del peers[k]
    return Device(
        plan.name,
        private_key=observed.private_key if plan.private_key is None else plan.private_key,
        listen_port=observed.listen_port if plan.listen_port is None else plan.listen_port,
        fwmark=observed.fwmark if plan.fwmark is None else plan.fwmark,
        mtu=observed.mtu if plan.mtu is None else plan.mtu,
        up=observed.up if plan.link_up is None else plan.link_up,
        peers=tuple(peers.values()),
    )


def expected_result(desired: Device, observed: Device | None) -> Device:
    """`desired`, with its "leave as it is" values filled in from what was observed."""
    before = {p.public_key: p for p in observed.peers} if observed else {}
    peers = []
    for peer in desired.peers:
        old = before.get(peer.public_key)
        if peer.endpoint is None and old is not None:
            peer = dataclasses.replace(peer, endpoint=old.endpoint)
        peers.append(peer)
    return dataclasses.replace(
        desired,
        private_key=desired.private_key or (observed.private_key if observed else None),
        listen_port=desired.listen_port or (observed.listen_port if observed else 0),
        peers=tuple(peers),
    )


@settings(max_examples=200, deadline=None)
@given(desired=devices(), observed=st.one_of(st.none(), devices()))
def test_applying_the_plan_yields_desired(desired: Device, observed: Device | None) -> None:
    plan = plan_device(desired, observed)
    result = apply_in_memory(plan, observed)
    assert result == expected_result(desired, observed)
    assert plan_device(desired, result).empty


@settings(max_examples=200, deadline=None)
@given(desired=devices(), observed=devices())
def test_plan_touches_only_peers_that_differ(desired: Device, observed: Device) -> None:
    plan = plan_device(desired, observed)
    unchanged = {p.public_key for p in desired.peers} & {p.public_key for p in observed.peers}
    unchanged = {k for k in unchanged
                 if expected_result(desired, observed).peer(k) == observed.peer(k)}
    named = ({p.public_key for p in plan.add_peers} | {u.public_key for u in plan.update_peers}
             | set(plan.remove_peers))
    assert not named & unchanged
    for upd in plan.update_peers:
        old = observed.peer(upd.public_key)
        assert old is not None
        assert upd.endpoint is None or upd.endpoint != old.endpoint
        assert upd.allowed_ips is None or upd.allowed_ips != old.allowed_ips
        assert (upd.persistent_keepalive is None
                or upd.persistent_keepalive != old.persistent_keepalive)


@settings(max_examples=100, deadline=None)
@given(device=devices())
def test_plan_of_a_device_against_itself_is_empty(device: Device) -> None:
    assert plan_device(device, device).empty
    assert plan_device(device, device) == DevicePlan(device.name)
