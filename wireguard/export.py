"""wg-quick configuration export of a device.

Why it exists: operators debug WireGuard with the standard tools. `meshgress wg-config`
prints a device as a wg-quick file (`wg-quick strip` / `wg setconf` accept it) so it can
be compared with `wg showconf` or replayed on a test machine.

Output is deterministic: [Interface] with PrivateKey, ListenPort, FwMark, MTU (each only
when set, in that order), then one [Peer] per peer sorted by public key with PublicKey,
Endpoint, AllowedIPs, PersistentKeepalive; sections are separated by one blank line. The
private key is included by default — the file is for the node itself; pass
`include_private_key=False` for anything that leaves the node.

Written here rather than with a configuration-file library: the format is a handful of
`Key = value` lines, and the library on PyPI for it (`wgconfig`) is AGPL-licensed, which many
platform teams do not accept in what they run (README "Licences").

Purely computational.
"""

from __future__ import annotations

from wireguard.model import Device

Section = tuple[str, list[tuple[str, object]]]


def compute_wg_quick_sections(device: Device, *,
                              include_private_key: bool = True) -> list[Section]:
    """The device as wg-quick sections: a header and its (key, value) lines, in output
    order. Purely computational."""
    interface: list[tuple[str, object]] = []
    if include_private_key and device.private_key is not None:
        interface.append(("PrivateKey", device.private_key))
    if device.listen_port:
        interface.append(("ListenPort", device.listen_port))
    if device.fwmark:
        interface.append(("FwMark", f"{device.fwmark:#x}"))
    interface.append(("MTU", device.mtu))
    sections: list[Section] = [("Interface", interface)]
    for peer in device.peers:
        lines: list[tuple[str, object]] = [("PublicKey", peer.public_key)]
        if peer.endpoint is not None:
            lines.append(("Endpoint", peer.endpoint))
        if peer.allowed_ips:
            lines.append(("AllowedIPs", ", ".join(str(net) for net in peer.allowed_ips)))
        if peer.persistent_keepalive:
            lines.append(("PersistentKeepalive", peer.persistent_keepalive))
        sections.append(("Peer", lines))
    return sections


def render_wg_quick(sections: list[Section]) -> str:
    """wg-quick text of `sections`. A value holding a line break is refused (ValueError):
    it would smuggle a line of its own into the file. Purely computational."""
    blocks = []
    for header, lines in sections:
        rendered = [f"[{header}]"]
        for key, value in lines:
            text = str(value)
            if "\n" in text or "\r" in text:
                raise ValueError(f"wg-quick {header}.{key}: a value cannot span lines: {text!r}")
            rendered.append(f"{key} = {text}")
        blocks.append("\n".join(rendered) + "\n")
    return "\n".join(blocks)


def export_wg_quick(device: Device, *, include_private_key: bool = True) -> str:
    """The device as wg-quick configuration text. Purely computational."""
    return render_wg_quick(compute_wg_quick_sections(
        device, include_private_key=include_private_key))
