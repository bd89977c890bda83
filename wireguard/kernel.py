"""The kernel backend: the Linux WireGuard module through pyroute2 generic netlink.

Why it exists: where the kernel has WireGuard it is the faster and simpler dataplane (no
process to keep alive). Links are made with `ip link add type wireguard` semantics
(rtnetlink, `wireguard.links`) and configured with pyroute2's `WireGuard` generic
netlink socket.

The parts that decide *what* is sent and *how a reply is understood* are pure functions,
tested without the module:
- `compute_netlink_requests(plan)` — the keyword arguments of each `WireGuard.set()`
  call that carries out a plan. pyroute2 takes one peer per call, so a plan becomes one
  call for the device fields plus one per peer change (adds, then updates, then
  removes). Updates carry `update_only` and, only when that peer's allowed-ips change,
  `replace_allowed_ips`; WGDEVICE_F_REPLACE_PEERS is never used.
- `parse_netlink_info(messages, ...)` — a `WireGuard.info()` dump (one or more messages:
  the kernel splits big devices, repeating a peer whose allowed-ips continue in the
  next message) into the model and the per-peer counters.

This machine has no WireGuard module, so the backend class itself is exercised on a VM
(see the issue); keep it a thin shell around the two pure functions.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from typing import Any

from pyroute2 import WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from wireguard.errors import BackendUnavailableError, NetlinkRequestError, NotWireGuardDeviceError
from wireguard.keys import normalise_key
from wireguard.links import Links
from wireguard.model import KICK_KEEPALIVE, Device, Peer, PeerReading, PeerStats, parse_endpoint
from wireguard.plan import DevicePlan, PeerUpdate

LINK_KIND = "wireguard"


# --- pure: plan -> requests ------------------------------------------------------------


def _endpoint_fields(endpoint: str) -> dict[str, Any]:
    address, port = parse_endpoint(endpoint)
    return {"endpoint_addr": str(address), "endpoint_port": port}


def _added_peer_spec(peer: Peer) -> dict[str, Any]:
    spec: dict[str, Any] = {"public_key": peer.public_key}
    if peer.endpoint is not None:
        spec.update(_endpoint_fields(peer.endpoint))
    if peer.persistent_keepalive:
        spec["persistent_keepalive"] = peer.persistent_keepalive
    spec["replace_allowed_ips"] = True
    spec["allowed_ips"] = [str(net) for net in peer.allowed_ips]
    return spec


def _updated_peer_spec(upd: PeerUpdate) -> dict[str, Any]:
    spec: dict[str, Any] = {"public_key": upd.public_key, "update_only": True}
    if upd.endpoint is not None:
        spec.update(_endpoint_fields(upd.endpoint))
    if upd.persistent_keepalive is not None:
        spec["persistent_keepalive"] = upd.persistent_keepalive
    if upd.allowed_ips is not None:
        spec["replace_allowed_ips"] = True
        spec["allowed_ips"] = [str(net) for net in upd.allowed_ips]
    return spec


def compute_netlink_requests(plan: DevicePlan) -> list[dict[str, Any]]:
    """Keyword arguments for successive `pyroute2.WireGuard().set(**kwargs)` calls.

    Purely computational. Keys are base64 (pyroute2 decodes them); allowed-ips are CIDR
    strings; an endpoint is split into `endpoint_addr` and `endpoint_port`."""
    requests: list[dict[str, Any]] = []
    device: dict[str, Any] = {}
    if plan.private_key is not None:
        device["private_key"] = plan.private_key
    if plan.listen_port is not None:
        device["listen_port"] = plan.listen_port
    if plan.fwmark is not None:
        device["fwmark"] = plan.fwmark
    if device:
        requests.append({"interface": plan.name, **device})
    requests += [{"interface": plan.name, "peer": _added_peer_spec(p)} for p in plan.add_peers]
    requests += [{"interface": plan.name, "peer": _updated_peer_spec(u)}
                 for u in plan.update_peers]
    for key in plan.remove_peers:
        requests.append({"interface": plan.name, "peer": {"public_key": key, "remove": True}})
    return requests


# --- pure: info reply -> model -------------------------------------------------------


def _text_key(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii")
    return normalise_key(str(value))


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _format_endpoint(value: Any) -> str | None:
    if not value:
        return None
    addr = value.get("addr")
    port = value.get("port")
    if not addr or not port:
        return None
    if ":" in str(addr):
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def _allowed_ip_text(item: Any) -> str | None:
    text = item.get("addr") if hasattr(item, "get") else None
    return str(text) if text else None


def _merge_peer(acc: PeerReading, peer_msg: Any) -> None:
    """Fold one peer message into its reading (a peer may span several messages)."""
    endpoint = _format_endpoint(peer_msg.get_attr("WGPEER_A_ENDPOINT"))
    if endpoint is not None:
        acc.endpoint = endpoint
    keepalive = peer_msg.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
    if keepalive is not None:
        acc.keepalive = int(keepalive)
    for counter, attr in (("rx", "WGPEER_A_RX_BYTES"), ("tx", "WGPEER_A_TX_BYTES")):
        number = peer_msg.get_attr(attr)
        if number is not None:
            setattr(acc, counter, int(number))
    handshake = peer_msg.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    if handshake:
        acc.hs_sec = int(handshake.get("tv_sec", 0))
        acc.hs_nsec = int(handshake.get("tv_nsec", 0))
    for item in peer_msg.get_attr("WGPEER_A_ALLOWEDIPS") or ():
        text = _allowed_ip_text(item)
        if text is not None:
            acc.allowed.append(text)


def parse_netlink_info(messages: Iterable[Any], *, name: str, mtu: int,
                       up: bool) -> tuple[Device, tuple[PeerStats, ...]]:
    """Merge the messages of a `WireGuard.info(name)` dump into the model and counters.

    Purely computational. Works on pyroute2's decoded `wgmsg` objects (anything with
    `get_attr`); device attributes come from whichever message carries them (the
    kernel sends them in the first), peers are merged by public key and their allowed-ips
    concatenated. Missing port or fwmark mean 0; a missing private key means none."""
    private_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[str, PeerReading] = {}
    for msg in messages:
        value = _attr(msg, "WGDEVICE_A_PRIVATE_KEY")
        if value is not None:
            key = _text_key(value)
            private_key = None if key == _ZERO_KEY else key
        value = _attr(msg, "WGDEVICE_A_LISTEN_PORT")
        if value is not None:
            listen_port = int(value)
        value = _attr(msg, "WGDEVICE_A_FWMARK")
        if value is not None:
            fwmark = int(value)
        for peer_msg in _attr(msg, "WGDEVICE_A_PEERS") or ():
            key = _text_key(peer_msg.get_attr("WGPEER_A_PUBLIC_KEY"))
            _merge_peer(peers.setdefault(key, PeerReading(key)), peer_msg)
    ordered = [peers[k] for k in sorted(peers)]
    device = Device(
        name=name, private_key=private_key, listen_port=listen_port, fwmark=fwmark, mtu=mtu,
        up=up,
        peers=tuple(p.peer() for p in ordered),
    )
    stats = tuple(p.stats() for p in ordered)
    return device, stats


_ZERO_KEY = "A" * 43 + "="


# --- the backend ---------------------------------------------------------------------


class KernelBackend:
    """WireGuard through the kernel module, in `netns` (None: the caller's namespace)."""

    kind = "kernel"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.links = Links(netns)

    def _wg(self) -> Any:
        try:
            if self.netns is None:
                return WireGuard()
            return WireGuard(netns=self.netns, flags=0)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:  # no "wireguard" generic netlink family
                raise BackendUnavailableError("the kernel has no WireGuard generic netlink "
                                              "family (module not loaded?)") from exc
            raise NetlinkRequestError("-", "open generic netlink", exc.code, str(exc)) from exc

    def _read(self, name: str) -> tuple[Device, tuple[PeerStats, ...]] | None:
        link = self.links.get(name)
        if link is None:
            return None
        if link.kind != LINK_KIND:
            raise NotWireGuardDeviceError(f"interface {name} is a {link.kind or 'plain'} link, "
                                          "not a kernel WireGuard device")
        wg = self._wg()
        try:
            messages = list(wg.info(name))
        except NetlinkError as exc:
            raise NetlinkRequestError(name, "get device", exc.code, str(exc)) from exc
        finally:
            wg.close()
        return parse_netlink_info(messages, name=name, mtu=link.mtu, up=link.up)

    def read(self, name: str) -> Device | None:
        found = self._read(name)
        return None if found is None else found[0]

    def stats(self, name: str) -> tuple[PeerStats, ...]:
        found = self._read(name)
        return () if found is None else found[1]

    def apply(self, plan: DevicePlan) -> None:
        if plan.create:
            self.links.add(plan.name, LINK_KIND)
        requests = compute_netlink_requests(plan)
        if requests:
            wg = self._wg()
            try:
                for kwargs in requests:
                    try:
                        wg.set(**kwargs)
                    except NetlinkError as exc:
                        raise NetlinkRequestError(plan.name, "set device", exc.code,
                                                  str(exc)) from exc
            finally:
                wg.close()
        self.links.configure(plan.name, mtu=plan.mtu, up=plan.link_up)

    def kick(self, name: str, keys: Sequence[str]) -> None:
        """Keepalive on, which sends one at once, then off again: per peer, in the kernel
        (`set_peer` sends the keepalive when the interval turns non-zero)."""
        if not keys:
            return
        wg = self._wg()
        try:
            for interval in (KICK_KEEPALIVE, 0):
                for key in keys:
                    try:
                        wg.set(interface=name, peer={"public_key": key, "update_only": True,
                                                      "persistent_keepalive": interval})
                    except NetlinkError as exc:
                        raise NetlinkRequestError(name, "kick peer", exc.code,
                                                  str(exc)) from exc
        finally:
            wg.close()

    def delete(self, name: str) -> None:
        link = self.links.get(name)
        if link is None:
            return
        if link.kind != LINK_KIND:
            raise NotWireGuardDeviceError(f"refusing to delete {name}: it is a "
                                          f"{link.kind or 'plain'} link, not WireGuard")
        self.links.delete(name)
