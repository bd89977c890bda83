"""The kernel backend's pure halves, against pyroute2's real netlink encoder and decoder.

This machine has no WireGuard module, so instead of a kernel the tests use pyroute2's own
`wgmsg` class: requests are encoded to netlink bytes exactly as `WireGuard.set()` would
send them and decoded again; replies are built as the kernel lays them out, encoded, and
decoded as `WireGuard.info()` would return them.
"""

from __future__ import annotations

from pathlib import Path
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    AsyncWireGuard,
    wgmsg,
)

from wireguard.errors import BackendUnavailableError, NotWireGuardDeviceError
from wireguard.kernel import KernelBackend, compute_netlink_requests, parse_netlink_info
from wireguard.keys import encode_key
from wireguard.links import LinkState
from wireguard.model import Device, Peer, PeerStats
from wireguard.plan import DevicePlan, PeerUpdate, plan_device


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


PRIVATE = key(1)
A, B, C = key(10), key(11), key(12)


# --- plan -> requests ----------------------------------------------------------------


def test_create_plan_becomes_device_call_then_one_call_per_peer() -> None:
    desired = Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24", "fd00:a::/64"],
             persistent_keepalive=25),
        Peer(B, endpoint="[2001:db8::2]:51821"),
    ))
    assert compute_netlink_requests(plan_device(desired, None)) == [
        {"interface": "wg0", "private_key": PRIVATE, "listen_port": 51820, "fwmark": 0x1000},
        {"interface": "wg0", "peer": {
            "public_key": A, "endpoint_addr": "192.0.2.10", "endpoint_port": 51820,
            "persistent_keepalive": 25, "replace_allowed_ips": True,
            "allowed_ips": ["198.18.10.0/24", "fd00:a::/64"]}},
        {"interface": "wg0", "peer": {
            "public_key": B, "endpoint_addr": "2001:db8::2", "endpoint_port": 51821,
            "replace_allowed_ips": True, "allowed_ips": []}},
    ]


def test_update_and_remove_requests() -> None:
    plan = DevicePlan("wg0", fwmark=0, update_peers=(
        PeerUpdate(A, endpoint="192.0.2.99:51820"),
        PeerUpdate(B, persistent_keepalive=0,
                   allowed_ips=Peer(B, allowed_ips=["198.18.11.0/24"]).allowed_ips),
    ), remove_peers=(C,))
    assert compute_netlink_requests(plan) == [
        {"interface": "wg0", "fwmark": 0},
        {"interface": "wg0", "peer": {"public_key": A, "update_only": True,
                                      "endpoint_addr": "192.0.2.99", "endpoint_port": 51820}},
        {"interface": "wg0", "peer": {"public_key": B, "update_only": True,
                                      "persistent_keepalive": 0, "replace_allowed_ips": True,
                                      "allowed_ips": ["198.18.11.0/24"]}},
        {"interface": "wg0", "peer": {"public_key": C, "remove": True}},
    ]


def test_link_only_plan_sends_no_wireguard_request() -> None:
    assert compute_netlink_requests(DevicePlan("wg0", mtu=1380, link_up=True)) == []
    assert compute_netlink_requests(DevicePlan("wg0")) == []


def encode_like_wireguard_set(request: dict[str, Any]) -> Any:
    """Build the message `WireGuard.set(**request)` would send, encode it, decode it."""
    wg = AsyncWireGuard.__new__(AsyncWireGuard)  # only its pure message-building helpers
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", request["interface"]])
    if "private_key" in request:
        wg._wg_test_key(request["private_key"])
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", request["private_key"]])
    if "listen_port" in request:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", request["listen_port"]])
    if "fwmark" in request:
        msg["attrs"].append(["WGDEVICE_A_FWMARK", request["fwmark"]])
    if "peer" in request:
        wg._wg_set_peer(msg, request["peer"])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_requests_encode_to_the_intended_netlink_flags() -> None:
    plan = DevicePlan(
        "wg0", private_key=PRIVATE, listen_port=51820,
        add_peers=(Peer(A, endpoint="[2001:db8::1]:51820", allowed_ips=["198.18.10.0/24"]),),
        update_peers=(PeerUpdate(B, endpoint="192.0.2.11:1"),),
        remove_peers=(C,),
    )
    decoded = [encode_like_wireguard_set(r) for r in compute_netlink_requests(plan)]
    device = decoded[0]
    assert device.get_attr("WGDEVICE_A_PRIVATE_KEY").decode() == PRIVATE
    assert device.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert device.get_attr("WGDEVICE_A_PEERS") is None

    def only_peer(msg: Any) -> Any:
        (peer,) = msg.get_attr("WGDEVICE_A_PEERS")
        return peer

    added, updated, removed = (only_peer(m) for m in decoded[1:])
    assert added.get_attr("WGPEER_A_PUBLIC_KEY").decode() == A
    assert added.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert added.get_attr("WGPEER_A_ENDPOINT")["addr"] == "2001:db8::1"
    assert added.get_attr("WGPEER_A_ENDPOINT")["port"] == 51820
    assert [a.get("addr") for a in added.get_attr("WGPEER_A_ALLOWEDIPS")] == ["198.18.10.0/24"]
    assert updated.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY  # no replace: ips unchanged
    assert updated.get_attr("WGPEER_A_ALLOWEDIPS") is None
    assert removed.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert all(m.get_attr("WGDEVICE_A_FLAGS") is None for m in decoded)  # never REPLACE_PEERS


# --- info reply -> model -------------------------------------------------------------


def allowed(cidr: str) -> dict[str, Any]:
    addr, mask = cidr.split("/")
    family = AF_INET6 if ":" in addr else AF_INET
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", inet_pton(family, addr)],
                      ["WGALLOWEDIP_A_CIDR_MASK", int(mask)]]}


def peer_attrs(public: str, *, endpoint: dict[str, Any] | None = None, keepalive: int = 0,
               ips: tuple[str, ...] = (), rx: int = 0, tx: int = 0,
               handshake: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", public],
                              ["WGPEER_A_PRESHARED_KEY", key(0)]]
    if endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", endpoint])
    attrs += [["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive],
              ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
              ["WGPEER_A_RX_BYTES", rx], ["WGPEER_A_TX_BYTES", tx],
              ["WGPEER_A_ALLOWEDIPS", [allowed(c) for c in ips]],
              ["WGPEER_A_PROTOCOL_VERSION", 1]]
    return {"attrs": attrs}


def kernel_reply(device_attrs: list[list[Any]], peers: list[dict[str, Any]]) -> Any:
    """One WG_CMD_GET_DEVICE dump message, through the real encoder and decoder."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"] = [*device_attrs, ["WGDEVICE_A_PEERS", peers]]
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


DEVICE_ATTRS: list[list[Any]] = [
    ["WGDEVICE_A_LISTEN_PORT", 51820], ["WGDEVICE_A_FWMARK", 0x1000],
    ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"],
    ["WGDEVICE_A_PRIVATE_KEY", PRIVATE], ["WGDEVICE_A_PUBLIC_KEY", key(2)],
]


def test_parse_single_message_reply() -> None:
    reply = kernel_reply(DEVICE_ATTRS, [
        peer_attrs(B, endpoint={"addr": "2001:db8::2", "port": 51821}),
        peer_attrs(A, endpoint={"addr": "192.0.2.10", "port": 51820}, keepalive=25,
                   ips=("fd00:a::/64", "198.18.10.0/24"), rx=2368, tx=1184,
                   handshake=(1700000000, 123456789)),
    ])
    device, stats = parse_netlink_info([reply], name="wg0", mtu=1420, up=True)
    assert device == Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24", "fd00:a::/64"],
             persistent_keepalive=25),
        Peer(B, endpoint="[2001:db8::2]:51821"),
    ))
    assert stats == (
        PeerStats(A, rx_bytes=2368, tx_bytes=1184, last_handshake_sec=1700000000,
                  last_handshake_nsec=123456789),
        PeerStats(B),
    )


def test_parse_dump_split_over_messages() -> None:
    """The kernel puts device attributes in the first message only and, when a peer's
    allowed-ips do not fit, repeats that peer in the next message with the rest."""
    first = kernel_reply(DEVICE_ATTRS, [
        peer_attrs(A, endpoint={"addr": "192.0.2.10", "port": 51820},
                   ips=("198.18.10.0/24", "198.18.11.0/24")),
    ])
    second = kernel_reply([["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]], [
        {"attrs": [["WGPEER_A_PUBLIC_KEY", A],
                   ["WGPEER_A_ALLOWEDIPS", [allowed("198.18.12.0/24")]]]},
        peer_attrs(C, ips=("198.19.0.0/16",)),
    ])
    device, _ = parse_netlink_info([first, second], name="wg0", mtu=1420, up=True)
    assert device.private_key == PRIVATE
    assert device.listen_port == 51820
    assert device.peers == (
        Peer(A, endpoint="192.0.2.10:51820",
             allowed_ips=["198.18.10.0/24", "198.18.11.0/24", "198.18.12.0/24"]),
        Peer(C, allowed_ips=["198.19.0.0/16"]),
    )


def test_parse_unconfigured_device() -> None:
    reply = kernel_reply([["WGDEVICE_A_LISTEN_PORT", 0], ["WGDEVICE_A_FWMARK", 0],
                          ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wg0"]], [])
    device, stats = parse_netlink_info([reply], name="wg0", mtu=1420, up=False)
    assert device == Device("wg0", up=False)
    assert stats == ()


def test_plan_of_parsed_reply_against_its_source_is_empty() -> None:
    desired = Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24"],
             persistent_keepalive=25),
    ))
    reply = kernel_reply(DEVICE_ATTRS, [
        peer_attrs(A, endpoint={"addr": "192.0.2.10", "port": 51820}, keepalive=25,
                   ips=("198.18.10.0/24",)),
    ])
    observed, _ = parse_netlink_info([reply], name="wg0", mtu=1420, up=True)
    assert plan_device(desired, observed).empty


# --- the backend shell, with fakes in place of netlink -------------------------------


class FakeLinks:
    def __init__(self, state: LinkState | None) -> None:
        self.state = state
        self.calls: list[tuple[Any, ...]] = []

    def get(self, name: str) -> LinkState | None:
        return self.state

    def add(self, name: str, kind: str) -> None:
        self.calls.append(("add", name, kind))
        self.state = LinkState(index=7, kind=kind, mtu=1420, up=False)

    def configure(self, name: str, *, mtu: int | None, up: bool | None) -> None:
        self.calls.append(("configure", name, mtu, up))

    def delete(self, name: str) -> bool:
        self.calls.append(("delete", name))
        return True


class FakeWireGuard:
    def __init__(self, replies: list[Any] | None = None) -> None:
        self.sets: list[dict[str, Any]] = []
        self.replies = replies or []
        self.closed = 0

    def set(self, **kwargs: Any) -> None:
        self.sets.append(kwargs)

    def info(self, interface: str) -> list[Any]:
        return self.replies

    def close(self) -> None:
        self.closed += 1


def backend_with(links: FakeLinks, wg: FakeWireGuard) -> KernelBackend:
    backend = KernelBackend()
    backend.links = links  # type: ignore[assignment]
    backend._wg = lambda: wg  # type: ignore[method-assign]
    return backend


def test_backend_apply_creates_link_then_sets_then_configures_link() -> None:
    links, wg = FakeLinks(None), FakeWireGuard()
    backend = backend_with(links, wg)
    desired = Device("wg0", private_key=PRIVATE, listen_port=51820, mtu=1380,
                     peers=(Peer(A, allowed_ips=["198.18.10.0/24"]),))
    backend.apply(plan_device(desired, backend.read("wg0")))
    assert links.calls == [("add", "wg0", "wireguard"), ("configure", "wg0", 1380, True)]
    assert [s.get("peer", {}).get("public_key") for s in wg.sets] == [None, A]
    assert wg.closed == 1


def test_backend_reads_through_the_parser() -> None:
    reply = kernel_reply(DEVICE_ATTRS, [peer_attrs(A, ips=("198.18.10.0/24",), rx=5)])
    backend = backend_with(FakeLinks(LinkState(7, "wireguard", 1380, True)), FakeWireGuard([reply]))
    device = backend.read("wg0")
    assert device is not None and device.mtu == 1380 and device.peers[0].public_key == A
    assert backend.stats("wg0") == (PeerStats(A, rx_bytes=5),)


def test_backend_refuses_other_link_kinds() -> None:
    backend = backend_with(FakeLinks(LinkState(7, "veth", 1500, True)), FakeWireGuard())
    with pytest.raises(NotWireGuardDeviceError):
        backend.read("wg0")
    with pytest.raises(NotWireGuardDeviceError):
        backend.delete("wg0")


def test_backend_empty_plan_touches_nothing() -> None:
    links, wg = FakeLinks(LinkState(7, "wireguard", 1420, True)), FakeWireGuard()
    backend_with(links, wg).apply(DevicePlan("wg0"))
    assert links.calls == [("configure", "wg0", None, None)]
    assert wg.sets == [] and wg.closed == 0


@pytest.mark.skipif(Path("/sys/module/wireguard").exists(), reason="this kernel has WireGuard")
def test_missing_module_is_reported_as_unavailable() -> None:
    """Opening the generic netlink family only reads: nothing is created."""
    with pytest.raises(BackendUnavailableError, match="no WireGuard generic netlink"):
        KernelBackend()._wg()
