"""The UAPI text protocol: plans rendered as `set=1` requests, `get=1` answers parsed."""

from __future__ import annotations

import pytest

from wireguard.errors import UapiError
from wireguard.keys import encode_key
from wireguard.model import Device, Peer, PeerStats
from wireguard.plan import DevicePlan, PeerUpdate, plan_device
from wireguard.uapi import compute_uapi_kick, compute_uapi_set, parse_errno, parse_uapi_get


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


def hexkey(n: int) -> str:
    return (bytes([n]) * 32).hex()


PRIVATE = key(1)
A, B = key(10), key(11)


def test_create_renders_device_then_peers() -> None:
    desired = Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24", "fd00:a::/64"],
             persistent_keepalive=25),
        Peer(B, allowed_ips=["198.18.11.0/24"]),
    ))
    assert compute_uapi_set(plan_device(desired, None)) == (
        "set=1\n"
        f"private_key={hexkey(1)}\n"
        "listen_port=51820\n"
        "fwmark=4096\n"
        f"public_key={hexkey(10)}\n"
        "endpoint=192.0.2.10:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=198.18.10.0/24\n"
        "allowed_ip=fd00:a::/64\n"
        f"public_key={hexkey(11)}\n"
        # Said even when 0: wireguard-go would otherwise carry A's "keepalive just turned
        # on" over to B's section and send B a keepalive (a handshake it did not ask for).
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=198.18.11.0/24\n"
        "\n"
    )


def test_a_kick_turns_each_keepalive_on_and_off_again_naming_it_every_time() -> None:
    assert compute_uapi_kick([A, B]) == (
        "set=1\n"
        f"public_key={hexkey(10)}\nupdate_only=true\npersistent_keepalive_interval=25\n"
        f"public_key={hexkey(10)}\nupdate_only=true\npersistent_keepalive_interval=0\n"
        f"public_key={hexkey(11)}\nupdate_only=true\npersistent_keepalive_interval=25\n"
        f"public_key={hexkey(11)}\nupdate_only=true\npersistent_keepalive_interval=0\n"
        "\n"
    )


def test_update_sends_only_changed_fields_with_update_only() -> None:
    plan = DevicePlan("wg0", update_peers=(
        PeerUpdate(A, endpoint="[2001:db8::1]:51820"),
        PeerUpdate(B, persistent_keepalive=0, allowed_ips=()),
    ))
    assert compute_uapi_set(plan) == (
        "set=1\n"
        f"public_key={hexkey(10)}\n"
        "update_only=true\n"
        "endpoint=[2001:db8::1]:51820\n"
        f"public_key={hexkey(11)}\n"
        "update_only=true\n"
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "\n"
    )


def test_add_update_remove_order_and_no_replace_peers() -> None:
    plan = DevicePlan("wg0", add_peers=(Peer(B, allowed_ips=["198.18.0.0/24"]),),
                      update_peers=(PeerUpdate(key(12), allowed_ips=Peer(
                          key(12), allowed_ips=["198.18.1.0/24"]).allowed_ips),),
                      remove_peers=(A,))
    text = compute_uapi_set(plan)
    assert text is not None
    lines = text.splitlines()
    assert "replace_peers=true" not in lines
    assert lines.index(f"public_key={hexkey(11)}") < lines.index(f"public_key={hexkey(12)}") \
        < lines.index(f"public_key={hexkey(10)}")
    assert lines[-2:] == ["remove=true", ""]


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(DevicePlan("wg0"), id="empty"),
        pytest.param(DevicePlan("wg0", mtu=1380, link_up=True), id="link-only"),
    ],
)
def test_nothing_to_send(plan: DevicePlan) -> None:
    assert compute_uapi_set(plan) is None


def test_fwmark_clear_is_sent_as_zero() -> None:
    assert compute_uapi_set(DevicePlan("wg0", fwmark=0)) == "set=1\nfwmark=0\n\n"


# An answer as wireguard-go 0.0.20220316 writes it (peer order is wireguard-go's own).
GET_ANSWER = (
    f"private_key={hexkey(1)}\n"
    "listen_port=51820\n"
    "fwmark=4096\n"
    f"public_key={hexkey(11)}\n"
    f"preshared_key={'0' * 64}\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::2]:51821\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    f"public_key={hexkey(10)}\n"
    f"preshared_key={'0' * 64}\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.10:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=123456789\n"
    "tx_bytes=1184\n"
    "rx_bytes=2368\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=fd00:a::/64\n"
    "allowed_ip=198.18.10.0/24\n"
    "errno=0\n"
    "\n"
)


def test_parse_get() -> None:
    device, stats = parse_uapi_get(GET_ANSWER, name="wg0", mtu=1380, up=True)
    assert device == Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000,
                            mtu=1380, up=True, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24", "fd00:a::/64"],
             persistent_keepalive=25),
        Peer(B, endpoint="[2001:db8::2]:51821"),
    ))
    assert stats == (
        PeerStats(A, rx_bytes=2368, tx_bytes=1184, last_handshake_sec=1700000000,
                  last_handshake_nsec=123456789),
        PeerStats(B),
    )


def test_parse_get_of_fresh_device() -> None:
    device, stats = parse_uapi_get("listen_port=40000\nerrno=0\n\n", name="wg0", mtu=1420,
                                   up=False)
    assert device == Device("wg0", listen_port=40000, up=False)
    assert device.private_key is None
    assert stats == ()


def test_parse_get_ignores_unknown_keys() -> None:
    answer = "listen_port=1\njc=4\n" + f"public_key={hexkey(10)}\nfuture_key=1\nerrno=0\n\n"
    device, _ = parse_uapi_get(answer, name="wg0", mtu=1420, up=True)
    assert device.peers == (Peer(A),)


def test_render_then_parse_round_trip() -> None:
    desired = Device("wg0", private_key=PRIVATE, listen_port=51820, fwmark=7, peers=(
        Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24"],
             persistent_keepalive=25),
        Peer(B, endpoint="[2001:db8::2]:1", allowed_ips=["fd00::/64", "198.18.0.0/16"]),
    ))
    request = compute_uapi_set(plan_device(desired, None))
    assert request is not None
    # A get answer lists the same keys (minus the set-only flags), so reuse the lines.
    answer = "\n".join(line for line in request.splitlines()[1:]
                       if line and not line.startswith("replace_allowed_ips"))
    device, _ = parse_uapi_get(answer + "\nerrno=0\n\n", name="wg0", mtu=1420, up=True)
    assert device == desired


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        pytest.param("errno=-22\n\n", 22, id="negated-einval"),
        pytest.param("errno=98\n\n", 98, id="positive-eaddrinuse"),
        pytest.param("", 5, id="no-answer"),
        pytest.param("errno=x\n\n", 71, id="malformed"),
    ],
)
def test_errno_raises(answer: str, code: int) -> None:
    with pytest.raises(UapiError) as info:
        parse_errno(answer, interface="wg0", op="set")
    assert info.value.errno == code
    assert "wg0" in str(info.value)


def test_get_with_error_raises() -> None:
    with pytest.raises(UapiError, match="errno 22"):
        parse_uapi_get("errno=-22\n\n", name="wg0", mtu=1420, up=True)
