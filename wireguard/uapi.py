"""The cross-platform WireGuard UAPI text protocol (wireguard-go's unix socket), as pure text.

Why it exists: the userspace backend speaks this protocol, and the translation between
it and the model is where the subtle parts are (hex keys, per-peer flags, the order of
lines). Keeping it apart from the socket makes it testable without wireguard-go.

The protocol (https://www.wireguard.com/xplatform/): a request is an operation line
("get=1" or "set=1") followed by "key=value" lines and an empty line; the answer of a
get is "key=value" lines, and every answer ends with "errno=N" and an empty line (N is
0 or a negated errno). Keys are 64 lowercase hex digits. In a set, device keys come
first; a "public_key" line starts (or creates) a peer and the lines after it apply to
that peer. meshgress never sends `replace_peers`; for an updated peer it sends
`update_only=true` right after the key (so a peer that vanished meanwhile is not
re-created half-configured), and `replace_allowed_ips=true` only when that peer's
allowed-ips change.

Purely computational.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from wireguard.errors import UapiError
from wireguard.keys import key_from_hex, key_to_hex
from wireguard.model import KICK_KEEPALIVE, Device, Peer, PeerReading, PeerStats
from wireguard.plan import DevicePlan, PeerUpdate

GET_REQUEST = "get=1\n\n"


def compute_uapi_set(plan: DevicePlan) -> str | None:
    """The `set=1` request that carries out the WireGuard part of a plan, or None when
    the plan changes nothing in WireGuard (then nothing is sent). Link-level parts
    (create, MTU, up/down) are not part of the UAPI. Purely computational."""
    if not plan.configures_wireguard:
        return None
    lines = ["set=1"]
    if plan.private_key is not None:
        lines.append(f"private_key={key_to_hex(plan.private_key)}")
    if plan.listen_port is not None:
        lines.append(f"listen_port={plan.listen_port}")
    if plan.fwmark is not None:
        lines.append(f"fwmark={plan.fwmark}")
    for peer in plan.add_peers:
        lines += _added_peer_lines(peer)
    for upd in plan.update_peers:
        lines += _updated_peer_lines(upd)
    for key in plan.remove_peers:
        lines.append(f"public_key={key_to_hex(key)}")
        lines.append("remove=true")
    return "\n".join(lines) + "\n\n"


def compute_uapi_kick(keys: Sequence[str]) -> str:
    """The `set=1` request that makes wireguard-go send each peer a keepalive now (and so
    start a handshake where there is no session), leaving it as configured: its keepalive
    turned on, which sends one at once, then off again. Purely computational.

    Every peer section names its keepalive explicitly: wireguard-go reuses one per-request
    flag for "keepalive was just turned on" across peer sections, so a section without
    the line after a kicked one would be kicked too."""
    lines = ["set=1"]
    for key in keys:
        for interval in (KICK_KEEPALIVE, 0):
            lines += [f"public_key={key_to_hex(key)}", "update_only=true",
                      f"persistent_keepalive_interval={interval}"]
    return "\n".join(lines) + "\n\n"


def _added_peer_lines(peer: Peer) -> list[str]:
    lines = [f"public_key={key_to_hex(peer.public_key)}"]
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    # Always said, even 0: see compute_uapi_kick.
    lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    # For a new peer this clears nothing; should the peer exist after all (a race with
    # another writer) it still ends up with exactly these allowed-ips.
    lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return lines


def _updated_peer_lines(upd: PeerUpdate) -> list[str]:
    lines = [f"public_key={key_to_hex(upd.public_key)}", "update_only=true"]
    if upd.endpoint is not None:
        lines.append(f"endpoint={upd.endpoint}")
    if upd.persistent_keepalive is not None:
        lines.append(f"persistent_keepalive_interval={upd.persistent_keepalive}")
    if upd.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in upd.allowed_ips)
    return lines


def parse_errno(text: str, *, interface: str, op: str) -> None:
    """Raise UapiError unless the answer ends with "errno=0". Purely computational."""
    value = None
    for line in text.splitlines():
        if line.startswith("errno="):
            value = line[len("errno="):]
    if value is None:
        raise UapiError(interface, op, 5, "no errno in the answer (connection closed early?)")
    try:
        code = int(value)
    except ValueError:
        raise UapiError(interface, op, 71, f"malformed errno {value!r}") from None
    if code != 0:
        raise UapiError(interface, op, code)


def _set_allowed(peer: PeerReading, value: str) -> None:
    peer.allowed.append(value)


_PEER_FIELDS: dict[str, Callable[[PeerReading, str], None]] = {
    "endpoint": lambda p, v: setattr(p, "endpoint", v),
    "persistent_keepalive_interval": lambda p, v: setattr(p, "keepalive", int(v)),
    "allowed_ip": _set_allowed,
    "rx_bytes": lambda p, v: setattr(p, "rx", int(v)),
    "tx_bytes": lambda p, v: setattr(p, "tx", int(v)),
    "last_handshake_time_sec": lambda p, v: setattr(p, "hs_sec", int(v)),
    "last_handshake_time_nsec": lambda p, v: setattr(p, "hs_nsec", int(v)),
}
"""How each peer line of a get answer fills a PeerReading (unknown keys are ignored)."""


def parse_uapi_get(text: str, *, name: str, mtu: int,
                   up: bool) -> tuple[Device, tuple[PeerStats, ...]]:
    """Parse the answer to `get=1` into the device (its configuration) and the per-peer
    counters. `mtu` and `up` come from the link, which the UAPI does not describe.
    Unknown keys are ignored (newer or forked wireguard-go versions add some); a non-zero
    errno raises UapiError. Purely computational."""
    parse_errno(text, interface=name, op="get")
    private_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: list[PeerReading] = []
    current: PeerReading | None = None
    for raw in text.splitlines():
        if not raw:
            continue
        key, sep, value = raw.partition("=")
        if not sep:
            raise UapiError(name, "get", 71, f"malformed line {raw!r}")
        if key == "errno":
            break
        if key == "public_key":
            current = PeerReading(key_from_hex(value))
            peers.append(current)
            continue
        if current is None:
            if key == "private_key":
                private_key = key_from_hex(value)
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
            continue
        reader = _PEER_FIELDS.get(key)
        if reader is not None:
            reader(current, value)
    device = Device(
        name=name,
        private_key=private_key,
        listen_port=listen_port,
        fwmark=fwmark,
        mtu=mtu,
        up=up,
        peers=tuple(p.peer() for p in peers),
    )
    stats = tuple(sorted((p.stats() for p in peers), key=lambda s: s.public_key))
    return device, stats
