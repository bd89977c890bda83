"""wg-quick export: exact, deterministic text."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wireguard.export import export_wg_quick
from wireguard.keys import encode_key
from wireguard.model import Device, Peer


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


PRIVATE = key(1)
A, B = key(10), key(11)

DEVICE = Device("meshgress0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000, mtu=1380,
                peers=(
                    Peer(B, allowed_ips=["fd00:b::/64", "198.18.11.0/24"]),
                    Peer(A, endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24"],
                         persistent_keepalive=25),
                ))


def test_export_exact_text() -> None:
    assert export_wg_quick(DEVICE) == (
        "[Interface]\n"
        f"PrivateKey = {PRIVATE}\n"
        "ListenPort = 51820\n"
        "FwMark = 0x1000\n"
        "MTU = 1380\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {A}\n"
        "Endpoint = 192.0.2.10:51820\n"
        "AllowedIPs = 198.18.10.0/24\n"
        "PersistentKeepalive = 25\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {B}\n"
        "AllowedIPs = 198.18.11.0/24, fd00:b::/64\n"
    )


def test_export_minimal_device_and_redaction() -> None:
    device = Device("wg0", private_key=PRIVATE)
    assert export_wg_quick(device) == f"[Interface]\nPrivateKey = {PRIVATE}\nMTU = 1420\n"
    assert export_wg_quick(device, include_private_key=False) == "[Interface]\nMTU = 1420\n"


def test_export_is_deterministic_whatever_the_input_order() -> None:
    shuffled = Device("meshgress0", private_key=PRIVATE, listen_port=51820, fwmark=0x1000,
                      mtu=1380, peers=tuple(reversed(DEVICE.peers)))
    assert export_wg_quick(shuffled) == export_wg_quick(DEVICE)


@pytest.mark.skipif(shutil.which("wg-quick") is None, reason="wireguard-tools not installed")
def test_wg_quick_strip_accepts_it(tmp_path: Path) -> None:
    """wg-quick itself parses the file (strip only reads it; nothing is configured)."""
    conf = tmp_path / "mgtest0.conf"
    conf.write_text(export_wg_quick(DEVICE))
    conf.chmod(0o600)
    out = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True,
                         check=True).stdout
    assert f"PublicKey = {A}" in out
    assert "MTU" not in out  # a wg-quick key, stripped for `wg setconf`


def test_a_value_spanning_lines_is_refused() -> None:
    """A line break in a value would add a line of its own (e.g. a PostUp) to the file."""
    from wireguard.export import render_wg_quick
    with pytest.raises(ValueError, match="cannot span lines"):
        render_wg_quick([("Peer", [("Endpoint", "192.0.2.1:1\nPostUp = id")])])


def test_export_needs_no_agpl_library() -> None:
    """The export stands without `wgconfig` (AGPL-3.0): README "Licences"."""
    code = ("import sys; sys.modules['wgconfig'] = None\n"
            "from wireguard.export import export_wg_quick\n"
            "from wireguard.model import Device\n"
            "print(export_wg_quick(Device('wg0')), end='')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "[Interface]\nMTU = 1420\n"
