"""Every number and name meshgress stamps on kernel objects, in one place.

A restarted agent finds what it owns only by these tags, never by memory, so they must
not collide with other components and must never change between releases without a
migration. Values chosen:

- route protocol 109 ('m'): outside iproute2's registered numbers (rt_protos) and the
  ones Calico (80), BIRD (12) and Cilium use;
- fwmark bits 0x00ff0000: kube-proxy owns 0x4000/0x8000, Calico 0xffff0000 only when it
  runs, Cilium 0x0f00/0xf000-ish bits; egress slot marks live only inside this mask;
- routing tables 51820..: far from main/local/default (254/255/253);
- interface prefixes: `meshgress0` for the mesh, `mgc` + hash for pod host veths,
  `mge` + slot for a node's per-slot egress tunnels, `mgeg` + slot for a gateway's;
- nftables tables: `inet meshgress` (the node agent's), `inet meshgress-gw` (a gateway's).
"""

from __future__ import annotations

ROUTE_PROTOCOL = 109
"""rtm_protocol on every route meshgress creates."""

WIREGUARD_INTERFACE = "meshgress0"
WIREGUARD_PORT = 51820

POD_HOST_VETH_PREFIX = "mgc"
"""Host side of a pod's veth: prefix + 11 hex chars of a hash of the attachment (container
id, ifname); its MAC is derived from the attachment too, which tells the veth of one
attachment from anything else of that name (`cni.model.HostLinkClaim`)."""

EGRESS_INTERFACE_PREFIX = "mge"
"""A node's tunnel to one egress slot: prefix + 8 hex chars (meshgress.slots)."""
GATEWAY_INTERFACE_PREFIX = EGRESS_INTERFACE_PREFIX + "g"
"""A gateway's tunnel for one slot it holds: prefix + the same 8 hex chars. "g" is not a
hex digit, so the two never collide, and both match the `mge*` the leak guard trusts."""

POD_GATEWAY_IPV4 = "169.254.1.1"
"""The link-local next hop every pod routes through; the host side answers its ARP."""

NFT_FAMILY = "inet"
NFT_TABLE = "meshgress"
"""The node agent's table."""
GATEWAY_NFT_TABLE = "meshgress-gw"
"""A gateway's table (a gateway node's agent keeps its own, `meshgress`, beside it)."""

FWMARK_MASK = 0x00FF0000
ROUTING_TABLE_BASE = 51820
RULE_PRIORITY_EGRESS = 100
"""ip rule priority of a node's fwmark → per-slot table rules (before main at 32766)."""
RULE_PRIORITY_GATEWAY = 101
"""ip rule priority of a gateway's fwmark → slot tunnel rules (replies back into the
tunnel). Node agents never touch rules at this priority, gateways never at 100."""
