"""The SNAT flow log's pure half: conntrack event lines to JSON records."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.flowlog import (
    GATEWAY_MARK_BIT,
    FlowEvent,
    compute_flow_record,
    parse_conntrack_event,
)
from meshgress.slots import SlotId, gateway_mark

UDP = ("    [NEW] udp      17 30 src=198.18.1.10 dst=192.0.2.100 sport=40000 dport=7000 "
       "[UNREPLIED] src=192.0.2.100 dst=192.0.2.50 sport=7000 dport=40000 mark=8388608")
TCP = (" [NEW] tcp      6 120 SYN_SENT src=198.18.1.10 dst=203.0.113.9 sport=5555 dport=443 "
       "[UNREPLIED] src=203.0.113.9 dst=192.0.2.51 sport=443 dport=1024 mark=8454144")
ICMP = ("    [NEW] icmp     1 30 src=198.18.1.10 dst=192.0.2.100 type=8 code=0 id=7 "
        "[UNREPLIED] src=192.0.2.100 dst=192.0.2.50 type=0 code=0 id=7 mark=8388608")


def test_parses_a_udp_event():
    assert parse_conntrack_event(UDP) == FlowEvent(
        protocol="udp", source="198.18.1.10", destination="192.0.2.100", source_port=40000,
        destination_port=7000, reply_destination="192.0.2.50", reply_destination_port=40000,
        mark=0x800000)


def test_parses_tcp_with_its_state_and_icmp_without_ports():
    tcp = parse_conntrack_event(TCP)
    assert tcp is not None and (tcp.protocol, tcp.reply_destination_port, tcp.mark) == (
        "tcp", 1024, 0x810000)
    icmp = parse_conntrack_event(ICMP)
    assert icmp is not None and icmp.source_port is None and icmp.destination_port is None


@pytest.mark.parametrize("line", [
    "", "conntrack v1.4.7 (conntrack-tools): 2 flow events have been shown.",
    UDP.replace("[NEW]", "[UPDATE]"), "    [NEW] udp 17 30 src=198.18.1.10",
], ids=["empty", "summary", "update", "one-tuple"])
def test_ignores_what_is_not_a_new_flow(line):
    assert parse_conntrack_event(line) is None


def test_a_record_names_the_pod_slot_and_egress_ip_and_port():
    event = parse_conntrack_event(UDP)
    assert event is not None
    slots = {gateway_mark(0): SlotId("egw", 0)}
    assert compute_flow_record(event, slots, {"198.18.1.10": "ns-a/p1"}, "T") == {
        "time": "T", "slot": "egw/0", "pod": "ns-a/p1", "podIP": "198.18.1.10",
        "protocol": "udp", "destination": "192.0.2.100:7000", "egress": "192.0.2.50:40000"}
    # A mark of no held slot (or other bits around ours) is matched on our bits only.
    event2 = FlowEvent("udp", "198.18.9.9", "192.0.2.100", 1, 2, "192.0.2.50", 1,
                       gateway_mark(0) | 0x4000)
    assert compute_flow_record(event2, slots, {}, "T")["pod"] is None  # type: ignore[index]
    assert compute_flow_record(replace(event2, mark=gateway_mark(3)), slots, {}, "T") is None


def test_the_conntrack_filter_bit_covers_every_gateway_mark_only():
    assert all(gateway_mark(o) & GATEWAY_MARK_BIT for o in range(126))
    assert not (1 << 16) & GATEWAY_MARK_BIT and not (0x7F << 16) & GATEWAY_MARK_BIT
