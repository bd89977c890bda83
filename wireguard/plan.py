"""plan_device(desired, observed): the smallest change that turns one device into the other.

Why it exists: rewriting a WireGuard configuration wholesale resets handshakes and cuts
connections (Kilo #34, #82). The plan touches only what differs: the interface is
created only when missing; key, port and fwmark are set only when they differ; peers
that are missing are added, unwanted ones removed, and a peer is updated only when its
endpoint, allowed-ips or keepalive changed — and then only the changed fields are sent.
Changing one peer never rewrites another. Allowed-ips are replaced per peer
(`replace_allowed_ips`), never device-wide, and peers are never replaced as a whole.

The backends execute a plan in this order: create the link; set key, port and fwmark;
add peers, update peers, remove peers (add before remove, so an allowed-ip moving from
one peer to another is never left unrouted longer than necessary); then MTU and link
state.

Purely computational: `plan_device` and `describe_plan` have no side effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wireguard.keys import public_key
from wireguard.model import Device, IPNetwork, Peer


@dataclass(frozen=True)
class PeerUpdate:
    """The changed fields of an existing peer; None means "leave as it is".

    `allowed_ips`, when not None, *replaces* that peer's allowed-ips (an empty tuple
    clears them). `update_only` is always requested from the backend: if the peer
    vanished since it was read, it is not re-created half-configured; the next
    reconcile sees it missing and adds it whole.
    """

    public_key: str
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    allowed_ips: tuple[IPNetwork, ...] | None = None

    @property
    def replace_allowed_ips(self) -> bool:
        return self.allowed_ips is not None


@dataclass(frozen=True)
class DevicePlan:
    """What to change on one interface. An empty plan means nothing is sent at all."""

    name: str
    create: bool = False
    private_key: str | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    mtu: int | None = None
    link_up: bool | None = None
    add_peers: tuple[Peer, ...] = ()
    update_peers: tuple[PeerUpdate, ...] = ()
    remove_peers: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.create
            or self.private_key is not None
            or self.listen_port is not None
            or self.fwmark is not None
            or self.mtu is not None
            or self.link_up is not None
            or self.add_peers
            or self.update_peers
            or self.remove_peers
        )

    @property
    def configures_wireguard(self) -> bool:
        """True if the WireGuard configuration (not just the link) changes."""
        return (
            self.private_key is not None
            or self.listen_port is not None
            or self.fwmark is not None
            or bool(self.add_peers or self.update_peers or self.remove_peers)
        )

    def describe(self) -> list[str]:
        """One line per change, for logs. Never contains the private key."""
        return describe_plan(self)

    def __str__(self) -> str:
        lines = self.describe()
        if not lines:
            return f"{self.name}: no change"
        return f"{self.name}: " + "; ".join(lines)


def plan_device(desired: Device, observed: Device | None) -> DevicePlan:
    """The smallest change from `observed` (None: no such interface) to `desired`.

    Purely computational. See the module docstring for what "smallest" means and the
    model's docstring for the "leave as it is" values (port 0, endpoint None, key None).
    """
    if observed is not None and observed.name != desired.name:
        raise ValueError(f"cannot plan {desired.name} against {observed.name}")
    create = observed is None
    current = observed if observed is not None else _blank(desired.name)

    private_key = None
    if desired.private_key is not None and desired.private_key != current.private_key:
        private_key = desired.private_key
    listen_port = None
    if desired.listen_port not in (0, current.listen_port):  # 0: any port will do
        listen_port = desired.listen_port
    fwmark = desired.fwmark if desired.fwmark != current.fwmark else None
    # A new link's MTU is whatever its creator chose: always set it.
    mtu = desired.mtu if create or desired.mtu != current.mtu else None
    link_up = desired.up if desired.up != current.up else None

    have = {p.public_key: p for p in current.peers}
    want = {p.public_key: p for p in desired.peers}
    add = tuple(p for p in desired.peers if p.public_key not in have)
    remove = tuple(k for k in sorted(have) if k not in want)
    updates = []
    for peer in desired.peers:
        old = have.get(peer.public_key)
        if old is None or old is peer:  # `is`: the same memoised value, nothing to compare
            continue
        update = _peer_update(peer, old)
        if update is not None:
            updates.append(update)

    return DevicePlan(
        name=desired.name,
        create=create,
        private_key=private_key,
        listen_port=listen_port,
        fwmark=fwmark,
        mtu=mtu,
        link_up=link_up,
        add_peers=add,
        update_peers=tuple(updates),
        remove_peers=remove,
    )


def compute_device_after(desired: Device, observed: Device | None) -> Device:
    """The device as it is once `plan_device(desired, observed)` has been carried out in
    full: `desired`, except where desired says "leave as it is" (no private key, port 0,
    a peer without endpoint), which keep what `observed` had. Purely computational.

    For callers that remember what they wrote instead of reading it back (the node
    agent's tracked dataplane): `plan_device(desired, compute_device_after(desired, o))`
    is always empty."""
    if observed is None:
        observed = _blank(desired.name)
    private_key = desired.private_key if desired.private_key is not None \
        else observed.private_key
    listen_port = desired.listen_port or observed.listen_port
    if any(p.endpoint is None for p in desired.peers):
        had = {p.public_key: p for p in observed.peers}
        peers = []
        for want in desired.peers:
            old = had.get(want.public_key)
            roamed = want.endpoint is None and old is not None and old.endpoint is not None
            peers.append(Peer(want.public_key, endpoint=old.endpoint,
                              allowed_ips=want.allowed_ips,
                              persistent_keepalive=want.persistent_keepalive)
                         if roamed and old is not None else want)
        return Device(desired.name, private_key=private_key, listen_port=listen_port,
                      fwmark=desired.fwmark, mtu=desired.mtu, peers=peers, up=desired.up)
    return desired.with_settings(private_key=private_key, listen_port=listen_port)


def _blank(name: str) -> Device:
    """What a freshly created interface looks like before it is configured."""
    return Device(name=name, private_key=None, listen_port=0, fwmark=0, peers=(), up=False)


def _peer_update(want: Peer, have: Peer) -> PeerUpdate | None:
    endpoint = None
    if want.endpoint is not None and want.endpoint != have.endpoint:
        endpoint = want.endpoint
    keepalive = None
    if want.persistent_keepalive != have.persistent_keepalive:
        keepalive = want.persistent_keepalive
    allowed = want.allowed_ips if want.allowed_ips != have.allowed_ips else None
    if endpoint is None and keepalive is None and allowed is None:
        return None
    return PeerUpdate(want.public_key, endpoint=endpoint, persistent_keepalive=keepalive,
                      allowed_ips=allowed)


def _short(key: str) -> str:
    return key[:8] + "…"


def _ips(nets: tuple[IPNetwork, ...]) -> str:
    return ",".join(str(n) for n in nets) if nets else "(none)"


def _describe_added(peer: Peer) -> str:
    parts = [f"add peer {_short(peer.public_key)}"]
    if peer.endpoint:
        parts.append(f"endpoint {peer.endpoint}")
    parts.append(f"allowed-ips {_ips(peer.allowed_ips)}")
    if peer.persistent_keepalive:
        parts.append(f"keepalive {peer.persistent_keepalive}s")
    return " ".join(parts)


def _describe_update(upd: PeerUpdate) -> str:
    parts = [f"update peer {_short(upd.public_key)}:"]
    if upd.endpoint is not None:
        parts.append(f"endpoint {upd.endpoint}")
    if upd.allowed_ips is not None:
        parts.append(f"allowed-ips {_ips(upd.allowed_ips)}")
    if upd.persistent_keepalive is not None:
        parts.append(f"keepalive {upd.persistent_keepalive}s")
    return " ".join(parts)


def describe_plan(plan: DevicePlan) -> list[str]:
    """Human-readable lines for a plan, in the order the backends apply it.

    Purely computational. Keys are shortened to 8 characters; the private key is shown
    only through its public key."""
    lines: list[str] = []
    if plan.create:
        lines.append("create interface")
    if plan.private_key is not None:
        lines.append(f"set private key (public key {public_key(plan.private_key)})")
    if plan.listen_port is not None:
        lines.append(f"set listen port {plan.listen_port}")
    if plan.fwmark is not None:
        lines.append(f"set fwmark {plan.fwmark:#x}" if plan.fwmark else "clear fwmark")
    lines += [_describe_added(peer) for peer in plan.add_peers]
    lines += [_describe_update(upd) for upd in plan.update_peers]
    lines.extend(f"remove peer {_short(key)}" for key in plan.remove_peers)
    if plan.mtu is not None:
        lines.append(f"set mtu {plan.mtu}")
    if plan.link_up is not None:
        lines.append("set link up" if plan.link_up else "set link down")
    return lines
