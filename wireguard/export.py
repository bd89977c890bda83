"""wg-quick configuration export of a device, written with the `wgconfig` package.

Why it exists: operators debug WireGuard with the standard tools. `meshgress wg-config`
prints a device as a wg-quick file (`wg-quick strip` / `wg setconf` accept it) so it can
be compared with `wg showconf` or replayed on a test machine.

Output is deterministic: [Interface] with PrivateKey, ListenPort, FwMark, MTU (each only
when set, in that order), then one [Peer] per peer sorted by public key with PublicKey,
Endpoint, AllowedIPs, PersistentKeepalive. The private key is included by default — the
file is for the node itself; pass `include_private_key=False` for anything that leaves
the node.

Purely computational (wgconfig only builds lines in memory here).
"""

from __future__ import annotations

import io

from wgconfig import WGConfig

from wireguard.model import Device


def export_wg_quick(device: Device, *, include_private_key: bool = True) -> str:
    """The device as wg-quick configuration text. Purely computational."""
    config = WGConfig()
    if include_private_key and device.private_key is not None:
        config.add_attr(None, "PrivateKey", device.private_key)
    if device.listen_port:
        config.add_attr(None, "ListenPort", device.listen_port)
    if device.fwmark:
        config.add_attr(None, "FwMark", f"{device.fwmark:#x}")
    config.add_attr(None, "MTU", device.mtu)
    for peer in device.peers:
        config.add_peer(peer.public_key)
        if peer.endpoint is not None:
            config.add_attr(peer.public_key, "Endpoint", peer.endpoint)
        if peer.allowed_ips:
            config.add_attr(peer.public_key, "AllowedIPs",
                            ", ".join(str(net) for net in peer.allowed_ips))
        if peer.persistent_keepalive:
            config.add_attr(peer.public_key, "PersistentKeepalive", peer.persistent_keepalive)
    out = io.StringIO()
    config.write_to_fileobj(out)
    return out.getvalue()
