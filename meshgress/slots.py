"""The contract between egress gateways and node agents about egress IP slots.

A slot is one egress IP of one EgressGateway. Exactly one gateway process holds a slot at a
time — the holder of the slot's Lease — and only the holder brings the IP up. The holder
publishes how to reach it on that Lease (`meshgress.cluster` reads and writes those
annotations): its WireGuard public key for the slot and the endpoint (IP:port) it listens
on. Node agents read leases, never the
gateway's status, to decide where to send a slot's traffic; status is for people.

Naming is derived, never stored, so both sides compute the same names independently:
- lease `egress-<gateway>-<index>` in LEASE_NAMESPACE;
- on nodes, the slot's tunnel interface `mge` + 8 hex chars of a hash of (gateway, index);
- on the gateway, the slot's tunnel interface `mgeg` + the same 8 hex chars
  (`kernel_ids.GATEWAY_INTERFACE_PREFIX`);
- every process numbers the slots itself (`assign_slot_numbers`): a slot keeps the number
  it has for as long as it exists — read back from the kernel or the lease after a restart
  — and a new slot takes the lowest free number. Numbers are local: a node's marks and
  tables and a gateway's ports never need to agree with another process, so adding or
  removing a gateway never renumbers (and so never disturbs) another slot's flows. There
  are MAX_SLOTS numbers, so at most MAX_SLOTS slots exist cluster-wide, whatever the
  gateways list: which egress IPs get one is decided by `meshgress.egress.compute_egress`,
  the same in every process;
- the holder listens for a slot's tunnel on GATEWAY_BASE_PORT + the slot's number (a
  holder of several slots, of one gateway or of several, never needs one port twice)
  and publishes that endpoint on the lease; nodes only ever read it from there;
- a node's end of a slot's tunnel listens on NODE_SLOT_BASE_PORT + the node's number for
  the slot. Every UDP port an agent or a gateway binds is fixed (FIXED_UDP_PORTS): a socket
  left to pick its own port (port 0) takes a random one of the kernel's ephemeral range,
  which holds all of these, so a node's own tunnel could take the port a gateway on the
  same node needs next — and keep it;
- on nodes, the slot's fwmark is (number + 1) << 16 inside FWMARK_MASK and its table
  ROUTING_TABLE_BASE + 1 + number; the mark 0xff << 16 means "drop: no healthy slot"
  (FailClosed); on gateways, replies are routed back into a slot's tunnel with the mark
  (0x80 + number) << 16, so a gateway node that also steers pods of its own never mixes
  the two.

Health probes: a node sends a UDP datagram through the slot's tunnel from its probe
address (the network address of its pod CIDR, which IPAM never hands out, so the
gateway's cryptokey routing accepts it) to the slot's egress IP at PROBE_PORT; the
holder answers with the same payload through the same tunnel. The egress IP is up on
the holder's node only, so a gateway node holding other slots still sends the probe
through the tunnel (an address shared by every holder would be local there), and the
echo also shows that the holder has the IP.

Purely computational: no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshgress.kernel_ids import (
    EGRESS_INTERFACE_PREFIX,
    FWMARK_MASK,
    GATEWAY_INTERFACE_PREFIX,
    ROUTING_TABLE_BASE,
    WIREGUARD_PORT,
)

GATEWAY_BASE_PORT = 51900
NODE_SLOT_BASE_PORT = 52100
PROBE_PORT = 51899
"""Where a holder answers probes, and where a node's probe sockets send them from (each
bound to its slot's tunnel, so they share the port)."""
SLOT_INTERFACE_ADDRESS = ipaddress.IPv4Address("169.254.123.1")
"""On every gateway slot interface, only so that the kernel's loose reverse-path check
accepts what arrives there (it refuses packets on an interface without any IPv4 address
when their source is routed through another one). Nothing is ever sent to it."""

MARK_SHIFT = 16
MAX_SLOTS = 126
GATEWAY_MARK_BASE = 0x80
DROP_MARK = 0xFF << MARK_SHIFT
DROP_TABLE = ROUTING_TABLE_BASE
"""Routing table holding only `blackhole default`: FailClosed with no healthy slot."""
GATEWAY_TABLE_BASE = ROUTING_TABLE_BASE + 256

LEASE_DURATION_SECONDS = 3.0
LEASE_RENEW_SECONDS = 1.0

assert DROP_MARK & FWMARK_MASK == DROP_MARK

_GATEWAY_PORTS = range(GATEWAY_BASE_PORT, GATEWAY_BASE_PORT + MAX_SLOTS)
_NODE_SLOT_PORTS = range(NODE_SLOT_BASE_PORT, NODE_SLOT_BASE_PORT + MAX_SLOTS)
FIXED_UDP_PORTS = frozenset({WIREGUARD_PORT, PROBE_PORT, *_GATEWAY_PORTS, *_NODE_SLOT_PORTS})
"""Every UDP port an agent or a gateway binds on a node (the ranges never overlap)."""
assert len(FIXED_UDP_PORTS) == 2 + 2 * MAX_SLOTS


@dataclass(frozen=True, order=True)
class SlotId:
    gateway: str
    index: int

    @property
    def lease_name(self) -> str:
        return f"egress-{self.gateway}-{self.index}"

    @property
    def suffix(self) -> str:
        """8 hex chars of a hash of (gateway, index): names the slot's kernel objects."""
        return hashlib.sha256(f"{self.gateway}/{self.index}".encode()).hexdigest()[:8]

    @property
    def node_interface(self) -> str:
        return f"{EGRESS_INTERFACE_PREFIX}{self.suffix}"

    @property
    def gateway_interface(self) -> str:
        return f"{GATEWAY_INTERFACE_PREFIX}{self.suffix}"



def assign_slot_numbers(slots: Iterable[SlotId],
                        kept: Mapping[SlotId, int]) -> dict[SlotId, int]:
    """A number in 0..MAX_SLOTS-1 for every slot in `slots`, stable across changes.

    A slot keeps its number from `kept` (what this process used so far) when that number
    is valid and no earlier slot (in sorted order) kept it too; every other slot takes the
    lowest free number, in sorted order. Slots in `kept` but not in `slots` give theirs
    up. Raises ValueError when there are more slots than numbers: `compute_egress` gives
    out at most MAX_SLOTS slots, so for its slots that is a bug."""
    ordered = sorted(set(slots))
    if len(ordered) > MAX_SLOTS:
        raise ValueError(f"{len(ordered)} egress IP slots: at most {MAX_SLOTS} are supported")
    numbers: dict[SlotId, int] = {}
    used: set[int] = set()
    for slot in ordered:
        number = kept.get(slot)
        if number is not None and 0 <= number < MAX_SLOTS and number not in used:
            numbers[slot] = number
            used.add(number)
    free = (n for n in range(MAX_SLOTS) if n not in used)
    for slot in ordered:
        if slot not in numbers:
            numbers[slot] = next(free)
    return numbers


def slot_mark(number: int) -> int:
    return (number + 1) << MARK_SHIFT


def slot_table(number: int) -> int:
    return ROUTING_TABLE_BASE + 1 + number


def slot_number_of_table(table: int) -> int | None:
    """Inverse of slot_table (None for other tables): how a node reads its numbers back."""
    number = table - ROUTING_TABLE_BASE - 1
    return number if 0 <= number < MAX_SLOTS else None


def gateway_port(number: int) -> int:
    """The UDP port the holder of the slot with this number listens on."""
    return GATEWAY_BASE_PORT + number


def node_slot_port(number: int) -> int:
    """The UDP port of a node's end of the slot tunnel with this (node-local) number."""
    return NODE_SLOT_BASE_PORT + number


def slot_number_of_port(port: int) -> int | None:
    """Inverse of gateway_port (None for other ports): how a gateway reads its numbers back."""
    number = port - GATEWAY_BASE_PORT
    return number if 0 <= number < MAX_SLOTS else None


def gateway_mark(number: int) -> int:
    """The mark a gateway routes a slot's replies by (back into the slot's tunnel)."""
    return (GATEWAY_MARK_BASE + number) << MARK_SHIFT


def gateway_table(number: int) -> int:
    return GATEWAY_TABLE_BASE + number


def parse_slot_lease_name(name: str) -> SlotId | None:
    """Inverse of SlotId.lease_name; None for leases that are not slots."""
    if not name.startswith("egress-"):
        return None
    gateway, sep, index = name[len("egress-"):].rpartition("-")
    if not sep or not gateway or not index.isdigit():
        return None
    return SlotId(gateway, int(index))


def probe_source(pod_cidr: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The node's probe source: its pod CIDR's network address (never given to a pod)."""
    return pod_cidr.network_address
