"""The plain-rtnetlink link lookup of wireguard.links: request and reply codec (pure)."""

import errno
import struct

import pytest

from wireguard.errors import NetlinkRequestError
from wireguard.links import LinkState, decode_link_reply, link_request

HDR = struct.Struct("=IHHII")
IFI = struct.Struct("=BxHiII")


def attr(kind, payload):
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def reply(kind, body):
    return HDR.pack(HDR.size + len(body), kind, 0, 1, 0) + body


def test_the_request_names_the_interface():
    data = link_request("meshgress0")
    length, kind, flags, _, _ = HDR.unpack_from(data)
    assert (length, kind, flags) == (len(data), 18, 1)
    assert data[HDR.size + IFI.size:] == attr(3, b"meshgress0\0")


def test_a_link_is_decoded_with_kind_mtu_and_state():
    body = (IFI.pack(0, 0, 7, 0x1043, 0) + attr(3, b"wg0\0") + attr(4, struct.pack("=I", 1420))
            + attr(18, attr(1, b"wireguard\0")))
    assert decode_link_reply(reply(16, body), "wg0") == LinkState(7, "wireguard", 1420, True)
    tun = IFI.pack(0, 0, 9, 0x1000, 0) + attr(4, struct.pack("=I", 1500))
    assert decode_link_reply(reply(16, tun), "mge0") == LinkState(9, None, 1500, False)


def test_no_such_link_is_none_and_other_errors_raise():
    assert decode_link_reply(reply(2, struct.pack("=i", -errno.ENODEV)), "x") is None
    with pytest.raises(NetlinkRequestError):
        decode_link_reply(reply(2, struct.pack("=i", -errno.EPERM)), "x")
    with pytest.raises(NetlinkRequestError):
        decode_link_reply(b"\0" * 4, "x")
