"""Gratuitous ARP: tell the external segment at once that an egress IP has moved here.

When a slot moves to another gateway, switches and the outside hosts still map the egress
IP to the old holder's MAC address until their entries time out. An ARP announcement (a
request whose sender and target are both the egress IP, RFC 5227) and a gratuitous reply
make every host on the segment that has an entry update it now (Linux does even with
arp_accept=0, for entries it already has). They are sent a few times, spaced out, because
the first may be lost or arrive before the switch learnt the new port.

`compute_garp_frames` is pure; `send_garp` opens an AF_PACKET socket on the interface (in
the caller's network namespace) and sends; `announce` does it on a background thread.
Standard library only: no arping binary needed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("meshgress.gateway.garp")

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST = b"\xff" * 6
ANNOUNCE_DELAYS = (0.0, 0.2, 1.0, 2.0)
"""Seconds after the IP came up at which each round of announcements is sent."""


def compute_garp_frames(mac: bytes, ip: ipaddress.IPv4Address) -> tuple[bytes, bytes]:
    """An ARP announcement (request) and a gratuitous ARP reply, as Ethernet frames,
    both broadcast. Purely computational."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    addr = ip.packed
    header = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)

    def arp(op: int, target_mac: bytes) -> bytes:
        return struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, op, mac, addr,
                           target_mac, addr)

    return header + arp(ARPOP_REQUEST, b"\x00" * 6), header + arp(ARPOP_REPLY, BROADCAST)


def send_garp(interface: str, mac: bytes, ip: ipaddress.IPv4Address) -> None:
    """Send one announcement and one gratuitous reply on `interface` now."""
    frames = compute_garp_frames(mac, ip)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((interface, ETH_P_ARP))
        for frame in frames:
            sock.send(frame)


def announce(interface: str, mac: bytes, ip: ipaddress.IPv4Address, *,
             delays: Sequence[float] = ANNOUNCE_DELAYS,
             stop: threading.Event | None = None) -> threading.Thread:
    """Send the announcements on a daemon thread, spaced by `delays`; errors are logged
    (a lost announcement only delays the update until the neighbours' entries expire)."""
    def run() -> None:
        started = time.monotonic()
        for delay in delays:
            wait = started + delay - time.monotonic()
            if wait > 0 and stop is not None and stop.wait(wait):
                return
            if wait > 0 and stop is None:
                time.sleep(wait)
            try:
                send_garp(interface, mac, ip)
            except OSError as exc:
                log.warning("garp failed interface=%s ip=%s error=%s", interface, ip, exc)
                return
        log.info("garp sent interface=%s ip=%s rounds=%d", interface, ip, len(delays))

    thread = threading.Thread(target=run, name=f"garp-{ip}", daemon=True)
    thread.start()
    return thread
