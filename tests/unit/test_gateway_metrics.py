"""Small pure parts of the gateway: metrics rendering, GARP frames, command-line options."""

from __future__ import annotations

import argparse
import ipaddress
import struct
from pathlib import Path

import pytest

from gateway.garp import compute_garp_frames
from gateway.leases import LeaseMetrics
from gateway.metrics import GatewayMetrics, SlotSample
from gateway.options import add_arguments
from meshgress.prometheus import Exposition
from meshgress.runtime import LoopMetrics

MAC = bytes.fromhex("02aabbccddee")


def test_garp_frames_are_a_broadcast_announcement_and_a_gratuitous_reply():
    request, reply = compute_garp_frames(MAC, ipaddress.IPv4Address("192.0.2.50"))
    for frame, op, target in ((request, 1, b"\0" * 6), (reply, 2, b"\xff" * 6)):
        assert len(frame) == 42
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC
        assert frame[12:14] == b"\x08\x06"
        htype, ptype, hlen, plen, opcode, sha, spa, tha, tpa = struct.unpack(
            "!HHBBH6s4s6s4s", frame[14:])
        assert (htype, ptype, hlen, plen, opcode) == (1, 0x0800, 6, 4, op)
        assert sha == MAC and tha == target
        assert spa == tpa == bytes([192, 0, 2, 50])  # sender = target: an announcement
    with pytest.raises(ValueError):
        compute_garp_frames(b"\x01", ipaddress.IPv4Address("192.0.2.50"))


def test_metrics_per_slot_from_the_table_counters():
    loop = LoopMetrics("meshgress_gateway_", "meshgress_gateway_errors_total")
    for _ in range(7):
        loop.observe(0.01, True)
    loop.count_error("nftables")
    page = Exposition()
    loop.render(page)
    GatewayMetrics(LeaseMetrics(acquisitions=2, fenced=1)).render(
        page, slots=[SlotSample("egw", 1, "192.0.2.51", "bbbb0000", held=False, ready=False),
               SlotSample("egw", 0, "192.0.2.50", "aaaa0000", held=True, ready=True)],
        counters={"out_aaaa0000": (10, 1000), "in_aaaa0000": (9, 900),
                  "flows_aaaa0000": (3, 180), "drop_aaaa0000": (2, 120),
                  "drop_stale": (4, 10)})
    text = page.render()
    lines = set(text.splitlines())
    s0 = '{egress_ip="192.0.2.50",gateway="egw",slot="0"}'
    s1 = '{egress_ip="192.0.2.51",gateway="egw",slot="1"}'
    assert {
        "meshgress_gateway_reconcile_total 7",
        "meshgress_gateway_lease_acquisitions_total 2",
        "meshgress_gateway_fenced_total 1",
        'meshgress_gateway_errors_total{op="nftables"} 1',
        f"meshgress_gateway_slot_held{s0} 1", f"meshgress_gateway_slot_held{s1} 0",
        f"meshgress_gateway_slot_ready{s0} 1",
        f"meshgress_gateway_slot_tx_bytes_total{s0} 1000",
        f"meshgress_gateway_slot_rx_packets_total{s0} 9",
        f"meshgress_gateway_slot_flows_total{s0} 3",
        f"meshgress_gateway_slot_dropped_packets_total{s0} 2",
        "meshgress_gateway_stale_interface_drops_total 4",
    } <= lines
    assert not any(s1 in line for line in lines if "_total" in line)
    assert text.index(s0) < text.index(s1)  # sorted by slot


def test_options_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--node", "gw1", "--datastore", "/tmp/store"])
    assert (args.node, args.datastore, args.state_dir, args.max_slots, args.wireguard_backend,
            args.metrics_address, args.flow_log, args.identity) == (
        "gw1", Path("/tmp/store"), Path("/var/lib/meshgress/gateway"), 1, "auto",
        "127.0.0.1:9821,node-ip:9821", None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--node", "gw1", "--datastore", "/x", "--max-slots", "0"])
