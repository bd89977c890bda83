"""The device model: constructors normalise, so equal configurations compare equal."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from wireguard.keys import encode_key, public_key
from wireguard.model import (
    Device,
    Peer,
    PeerStats,
    normalise_endpoint,
    parse_allowed_ips,
)


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


PRIVATE = key(1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(["198.18.0.0/24"], ["198.18.0.0/24"], id="one"),
        pytest.param(["198.18.1.0/24", "198.18.0.0/24"], ["198.18.0.0/24", "198.18.1.0/24"],
                     id="sorted"),
        pytest.param(["198.18.0.0/24", "198.18.0.0/24"], ["198.18.0.0/24"], id="deduplicated"),
        pytest.param(["198.18.0.7/24"], ["198.18.0.0/24"], id="host-bits-cleared"),
        pytest.param(["fd00::/64", "198.18.0.0/15"], ["198.18.0.0/15", "fd00::/64"],
                     id="ipv4-before-ipv6"),
        pytest.param(["198.18.0.0/16", "198.18.0.0/24"], ["198.18.0.0/16", "198.18.0.0/24"],
                     id="overlaps-kept"),
        pytest.param("198.18.1.0/24, 198.18.0.0/24", ["198.18.0.0/24", "198.18.1.0/24"],
                     id="wg-quick-comma-list"),
        pytest.param(["FD00:0:0::/64"], ["fd00::/64"], id="ipv6-compressed"),
    ],
)
def test_allowed_ips_are_canonical(given: list[str] | str, expected: list[str]) -> None:
    assert [str(n) for n in parse_allowed_ips(given)] == expected


@pytest.mark.parametrize("bad", ["198.18.0.1", "198.18.0.0/33", "nonsense/8", "::1/129"])
def test_bad_allowed_ips_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="allowed ip"):
        parse_allowed_ips([bad])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("192.0.2.1:51820", "192.0.2.1:51820", id="ipv4"),
        pytest.param("[2001:DB8:0::1]:51820", "[2001:db8::1]:51820", id="ipv6-compressed"),
        pytest.param("[::ffff:192.0.2.1]:51820", "192.0.2.1:51820", id="v4-mapped"),
        pytest.param(" 192.0.2.1:1 ", "192.0.2.1:1", id="whitespace"),
    ],
)
def test_endpoints_are_canonical(given: str, expected: str) -> None:
    assert normalise_endpoint(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["192.0.2.1", "192.0.2.1:0", "192.0.2.1:65536", "2001:db8::1:51820", "host.example:51820",
     "[2001:db8::1]", "[fe80::1%eth0]:51820", "192.0.2.1:port"],
)
def test_bad_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        normalise_endpoint(bad)


def test_equal_configurations_compare_equal() -> None:
    a = Device("wg0", private_key=PRIVATE, listen_port=51820, peers=(
        Peer(key(3), endpoint="[2001:db8::1]:51820", allowed_ips=["fd00::/64", "198.18.3.0/24"]),
        Peer(key(2), allowed_ips=("198.18.2.9/24", "198.18.2.0/24")),
    ))
    b = Device("wg0", private_key=PRIVATE + "\n", listen_port=51820, peers=(
        Peer(key(2), allowed_ips=[ipaddress.ip_network("198.18.2.0/24")]),
        Peer(key(3), endpoint="[2001:db8:0::1]:51820", allowed_ips="198.18.3.0/24,fd00::/64"),
    ))
    assert a == b
    assert hash(a) == hash(b)
    assert [p.public_key for p in a.peers] == sorted([key(2), key(3)])


def test_private_key_is_not_in_repr() -> None:
    device = Device("wg0", private_key=PRIVATE)
    assert PRIVATE not in repr(device)
    assert device.public_key == public_key(PRIVATE)


def test_peer_lookup() -> None:
    device = Device("wg0", peers=(Peer(key(2)),))
    assert device.peer(key(2)) == Peer(key(2))
    assert device.peer(key(3)) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"name": ""}, "non-empty", id="empty-name"),
        pytest.param({"name": "x" * 16}, "longer than 15", id="long-name"),
        pytest.param({"name": "a/b"}, "not valid", id="slash-in-name"),
        pytest.param({"listen_port": 65536}, "listen_port", id="port-range"),
        pytest.param({"fwmark": -1}, "fwmark", id="negative-fwmark"),
        pytest.param({"mtu": 67}, "mtu", id="mtu-too-small"),
        pytest.param({"mtu": True}, "mtu", id="mtu-bool"),
        pytest.param({"peers": (Peer(key(2)), Peer(key(2)))}, "listed twice", id="duplicate-peer"),
        pytest.param({"peers": (Peer(key(2), allowed_ips=["198.18.0.0/24"]),
                                Peer(key(3), allowed_ips=["198.18.0.0/24"]))},
                     "on two peers", id="allowed-ip-on-two-peers"),
        pytest.param({"private_key": PRIVATE, "peers": (Peer(public_key(PRIVATE)),)},
                     "own public key", id="peer-is-self"),
        pytest.param({"private_key": "nope"}, "not a WireGuard key", id="bad-private-key"),
    ],
)
def test_invalid_devices_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args = {"name": "wg0", **kwargs}
    with pytest.raises(ValueError, match=message):
        Device(**args)


def test_peer_keepalive_range() -> None:
    with pytest.raises(ValueError, match="persistent_keepalive"):
        Peer(key(2), persistent_keepalive=65536)


def test_stats_are_apart_from_configuration() -> None:
    stats = PeerStats(key(2), rx_bytes=10, tx_bytes=20, last_handshake_sec=5,
                      last_handshake_nsec=500_000_000)
    assert stats.last_handshake == 5.5
    assert PeerStats(key(2)).last_handshake is None
