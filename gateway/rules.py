"""The gateway's nftables table, `inet meshgress-gw`, as a `Ruleset` value.

Why it exists: the gateway owns one table whole, apart from the node agent's
`inet meshgress` (which it never touches). Per held slot it must SNAT allowed pod
traffic from the slot's tunnel to the slot's egress IP, drop everything else that
arrives on the tunnel, and steer replies back into the same tunnel. The model, plan and
apply machinery is the kernel library's (`meshgress.kernel.nft_model`,
`meshgress.kernel.nftables`): this module only computes the desired value.

Per slot (interface I, external interface X, egress IP E, mark M = gateway_mark(number),
set src_<h> of allowed pod IPs, h = the slot's 8-hex hash):

    tunnel_in  filter prerouting -150 (mangle: after conntrack, before DNAT and routing)
      iifname I ip daddr E udp dport PROBE_PORT accept              the health probe
      iifname I ip saddr @src_h ct state new ct mark set ct mark & ~MASK | M
      iifname I ip saddr @src_h accept
      iifname I counter drop_h drop                                 source not allowed
      iifname X ct mark & MASK == M meta mark set meta mark & ~MASK | M   replies: the
                                   `ip rule fwmark M/MASK` sends them back through I
    forward    filter forward 0
      iifname I oifname X counter out_h accept
      iifname I counter drop_h drop                                 would not leave via X
      oifname I ct mark & MASK == M counter in_h accept
      oifname I counter drop_h drop                                 not this slot's flow
    input      filter input 0
      iifname I ip daddr E udp dport PROBE_PORT accept
      iifname I counter drop_h drop
    snat       nat postrouting 90 (before the agent's masquerade at 100: the first NAT
               chain that binds a new flow wins)
      oifname X ct mark & MASK == M counter flows_h snat ip to E

Each of tunnel_in, forward and input ends with a catch-all for `mgeg*` interfaces of
slots not held (a slot interface left behind by a crash or kept during a restart):
counted in `drop_stale` and dropped, so such an interface never forwards anything.

Counters are named per slot (out_/in_ bytes and packets, flows_ = SNATed connections,
drop_) and survive every plan; they feed the metrics endpoint.

Purely computational: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from meshgress.kernel.nft_model import (
    ACCEPT,
    DROP,
    Hook,
    Json,
    NftChain,
    NftCounter,
    NftSet,
    Rule,
    Ruleset,
    counter_ref,
    match,
    meta,
    payload,
    set_ref,
)
from meshgress.kernel_ids import (
    FWMARK_MASK,
    GATEWAY_INTERFACE_PREFIX,
    GATEWAY_NFT_TABLE,
    NFT_FAMILY,
)
from meshgress.slots import PROBE_PORT

TABLE_COMMENT = "managed by the meshgress gateway; do not edit"

PRIORITY_TUNNEL_IN = -150
PRIORITY_FILTER = 0
PRIORITY_SNAT = 90

CHAIN_TUNNEL_IN = "tunnel_in"
CHAIN_FORWARD = "forward"
CHAIN_INPUT = "input"
CHAIN_SNAT = "snat"
COUNTER_STALE = "drop_stale"

SLOT_INTERFACE_WILDCARD = GATEWAY_INTERFACE_PREFIX + "*"
_KEEP_OTHER_BITS = 0xFFFFFFFF & ~FWMARK_MASK


@dataclass(frozen=True, order=True)
class SlotRules:
    """What the table needs to know about one held slot."""

    suffix: str
    """The slot's hash (names its set and counters)."""
    interface: str
    external_interface: str
    egress_ip: ipaddress.IPv4Address
    mark: int
    allowed_sources: tuple[ipaddress.IPv4Address, ...] = ()

    def __post_init__(self) -> None:
        if self.mark & ~FWMARK_MASK:
            raise ValueError(f"mark {self.mark:#x} is outside the mask {FWMARK_MASK:#x}")


def set_name(suffix: str) -> str:
    return f"src_{suffix}"


def counter_names(suffix: str) -> dict[str, str]:
    """Per-slot counter names by role: out, in, flows, drop."""
    return {role: f"{role}_{suffix}" for role in ("out", "in", "flows", "drop")}


def _iif(name: str) -> Json:
    return match(meta("iifname"), name)


def _oif(name: str) -> Json:
    return match(meta("oifname"), name)


def _masked(key: Json) -> Json:
    return {"&": [key, FWMARK_MASK]}


def _set_mark(key: Json, mark: int) -> Json:
    """`<key> set <key> & ~MASK | mark`: our bits only, other components' bits kept."""
    return {"mangle": {"key": key, "value": {"|": [{"&": [key, _KEEP_OTHER_BITS]}, mark]}}}


CT_MARK: Json = {"ct": {"key": "mark"}}
META_MARK: Json = meta("mark")


def _probe(slot: SlotRules) -> Rule:
    return Rule.of(_iif(slot.interface),
                   match(payload("ip", "daddr"), str(slot.egress_ip)),
                   match(payload("udp", "dport"), PROBE_PORT),
                   ACCEPT)


def compute_gateway_ruleset(slots: Iterable[SlotRules]) -> Ruleset:
    """The `inet meshgress-gw` table for the held slots. Purely computational."""
    ordered = sorted(slots)
    seen: set[str] = set()
    for slot in ordered:
        if slot.interface in seen:
            raise ValueError(f"slot interface {slot.interface} is listed twice")
        seen.add(slot.interface)
    sets: list[NftSet] = []
    counters: list[NftCounter] = []
    tunnel_in: list[Rule] = []
    forward: list[Rule] = []
    input_: list[Rule] = []
    snat: list[Rule] = []
    saddr = payload("ip", "saddr")
    for s in ordered:
        names = counter_names(s.suffix)
        src = set_name(s.suffix)
        sets.append(NftSet(src, "ipv4_addr", (), tuple(sorted(set(s.allowed_sources)))))
        counters += [
            NftCounter(names["out"], f"{s.interface}: forwarded to {s.external_interface}"),
            NftCounter(names["in"], f"{s.interface}: replies sent back into the tunnel"),
            NftCounter(names["flows"], f"{s.interface}: new flows SNATed to {s.egress_ip}"),
            NftCounter(names["drop"], f"{s.interface}: dropped (source not allowed, "
                                      "or not leaving to the outside)"),
        ]
        tunnel_in += [
            _probe(s),
            Rule.of(_iif(s.interface), match(saddr, set_ref(src)),
                    match({"ct": {"key": "state"}}, "new", "in"), _set_mark(CT_MARK, s.mark)),
            Rule.of(_iif(s.interface), match(saddr, set_ref(src)), ACCEPT),
            Rule.of(_iif(s.interface), counter_ref(names["drop"]), DROP),
        ]
        forward += [
            Rule.of(_iif(s.interface), _oif(s.external_interface), counter_ref(names["out"]),
                    ACCEPT),
            Rule.of(_iif(s.interface), counter_ref(names["drop"]), DROP),
            Rule.of(_oif(s.interface), match(_masked(CT_MARK), s.mark),
                    counter_ref(names["in"]), ACCEPT),
            Rule.of(_oif(s.interface), counter_ref(names["drop"]), DROP),
        ]
        input_ += [
            _probe(s),
            Rule.of(_iif(s.interface), counter_ref(names["drop"]), DROP),
        ]
        snat.append(Rule.of(_oif(s.external_interface), match(_masked(CT_MARK), s.mark),
                            counter_ref(names["flows"]),
                            {"snat": {"family": "ip", "addr": str(s.egress_ip)}}))
    # Replies: restore the slot's mark before routing (after the tunnel rules, which
    # match other interfaces, so their order does not matter).
    tunnel_in += [Rule.of(_iif(s.external_interface), match(_masked(CT_MARK), s.mark),
                          _set_mark(META_MARK, s.mark)) for s in ordered]
    stale = counter_ref(COUNTER_STALE)
    tunnel_in.append(Rule.of(_iif(SLOT_INTERFACE_WILDCARD), stale, DROP))
    forward += [Rule.of(_iif(SLOT_INTERFACE_WILDCARD), stale, DROP),
                Rule.of(_oif(SLOT_INTERFACE_WILDCARD), stale, DROP)]
    input_.append(Rule.of(_iif(SLOT_INTERFACE_WILDCARD), stale, DROP))
    counters.append(NftCounter(COUNTER_STALE, "packets on slot interfaces of slots not held"))
    return Ruleset(
        sets=tuple(sets),
        counters=tuple(counters),
        chains=(
            NftChain(CHAIN_TUNNEL_IN, tuple(tunnel_in),
                     Hook("filter", "prerouting", PRIORITY_TUNNEL_IN)),
            NftChain(CHAIN_FORWARD, tuple(forward), Hook("filter", "forward", PRIORITY_FILTER)),
            NftChain(CHAIN_INPUT, tuple(input_), Hook("filter", "input", PRIORITY_FILTER)),
            NftChain(CHAIN_SNAT, tuple(snat), Hook("nat", "postrouting", PRIORITY_SNAT)),
        ),
        family=NFT_FAMILY, table=GATEWAY_NFT_TABLE, comment=TABLE_COMMENT)
