"""The WireGuard device model: one interface and its peers as frozen, canonical values.

Why it exists: the control loop compares what it wants with what the kernel (or
wireguard-go) shows, and that comparison is only trustworthy when two equal
configurations are *equal values*. So the constructors normalise: keys to canonical
base64, endpoints to one spelling, allowed-ips to sorted, de-duplicated networks with
host bits cleared (as WireGuard itself stores them), peers sorted by public key. Output
built from these values is therefore stable and never flaps.

Conventions (shared with the plan and the backends):
- `listen_port` 0 means "any port" (WireGuard picks one); a desired 0 never changes an
  observed port.
- `fwmark` 0 means no mark; `persistent_keepalive` 0 means off.
- `endpoint` None in a *desired* peer means "not configured here": the peer's endpoint
  is learnt from its packets (roaming) and never reset.
- `private_key` None in a desired device means "leave the key alone"; in an observed
  device it means the interface has no key yet.
- `up` is the link's administrative state; a desired device is up unless said otherwise.

Runtime counters (bytes, last handshake) live in `PeerStats`, apart from the
configuration, so that traffic never makes two configurations unequal.

Purely computational: no I/O, no clocks.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshgress.kernel.rtnetlink import IFNAMSIZ
from wireguard.keys import normalise_key, public_key

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MTU = 1420
"""WireGuard's own default: 1500 minus 80 bytes of IPv6 + UDP + WireGuard overhead."""

MIN_MTU = 68
MAX_MTU = 65535

KICK_KEEPALIVE = 25
"""The keepalive interval a backend's `kick` turns on (and at once off again): turning a
peer's keepalive on sends one immediately; any value but 0 would do."""

OVERHEAD_IPV4 = 60
"""Outer IPv4 (20) + UDP (8) + WireGuard (32) bytes per packet."""
OVERHEAD_IPV6 = 80
"""Outer IPv6 (40) + UDP (8) + WireGuard (32) bytes per packet."""


def tunnel_mtu(underlay_mtu: int, underlay_is_ipv6: bool) -> int:
    """The largest inner packet that still fits one underlay packet once encapsulated.
    Purely computational."""
    return underlay_mtu - (OVERHEAD_IPV6 if underlay_is_ipv6 else OVERHEAD_IPV4)

_MEMO = 1 << 15
"""Entries kept by the memoised text parsers below: `ipaddress` parses a few thousand
addresses a second per core, and an agent re-reads the same thousands of endpoints and
allowed-ips on every resync. The parsers are pure, so the memo only changes the cost."""


# --- small parsers, all purely computational ---------------------------------------------


def parse_allowed_ips(items: Iterable[str | IPNetwork] | str | IPNetwork) -> tuple[IPNetwork, ...]:
    """Allowed-ips in canonical form: networks with host bits cleared, de-duplicated,
    IPv4 before IPv6, then by address and prefix length. A single string may be a
    comma-separated list (as in wg-quick's AllowedIPs). Purely computational."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    elif isinstance(items, ipaddress.IPv4Network | ipaddress.IPv6Network):
        items = [items]
    networks: set[IPNetwork] = set()
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.add(item)
            continue
        if not isinstance(item, str):
            raise ValueError(f"an allowed ip must be a CIDR string, not {type(item).__name__}")
        networks.add(_parse_network(item))
    if len(networks) == 1:
        return tuple(networks)
    return tuple(sorted(networks, key=_network_sort_key))


@functools.lru_cache(maxsize=_MEMO)
def _parse_network(item: str) -> IPNetwork:
    text = item.strip()
    if "/" not in text:
        raise ValueError(f"allowed ip {text!r} has no prefix length (write e.g. {text}/32)")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"allowed ip {text!r} is not a network: {exc}") from None


def _network_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """Split "IP:port" or "[IPv6]:port" into an address and a port. Purely computational.

    Host names are refused: resolving is I/O and belongs to the caller."""
    if not isinstance(text, str):
        raise ValueError(f"an endpoint must be a string, not {type(text).__name__}")
    value = text.strip()
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"endpoint {text!r} must look like [IPv6]:port")
        if "%" in host:
            raise ValueError(f"endpoint {text!r}: zoned IPv6 addresses are not supported")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"endpoint {text!r} must look like IP:port or [IPv6]:port")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"endpoint {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"endpoint {text!r}: port must be 1-65535")
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(port_text)


def format_endpoint(address: IPAddress, port: int) -> str:
    """The one spelling of an endpoint: "IP:port", or "[IPv6]:port" with the IPv6 address
    compressed (as wg and wireguard-go print it). Purely computational."""
    if address.version == 6:
        return f"[{address.compressed}]:{port}"
    return f"{address}:{port}"


def normalise_endpoint(text: str) -> str:
    """Validate an endpoint and return its canonical spelling. Purely computational."""
    if not isinstance(text, str):
        return format_endpoint(*parse_endpoint(text))  # raises ValueError
    return _normalise_endpoint(text)


@functools.lru_cache(maxsize=_MEMO)
def _normalise_endpoint(text: str) -> str:
    return format_endpoint(*parse_endpoint(text))


def validate_interface_name(name: str) -> str:
    """A Linux interface name: 1-15 bytes, no "/", no whitespace, not "." or "..".

    Purely computational."""
    if not isinstance(name, str) or not name:
        raise ValueError("an interface name must be a non-empty string")
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or "/" in name or any(ch.isspace() or ch == ":" for ch in name):
        raise ValueError(f"interface name {name!r} is not valid")
    return name


def _check_int(what: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low}..{high}, not {value}")
    return value


# --- the values --------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class Peer:
    """One WireGuard peer as configuration (no counters).

    The constructor normalises: `allowed_ips` may be any iterable of CIDR strings or
    networks (or one comma-separated string) and is stored canonical (see
    `parse_allowed_ips`); `endpoint` is stored in its canonical spelling; the key in
    canonical base64.
    """

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[IPNetwork, ...]
    persistent_keepalive: int
    _ip_keys: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __init__(self, public_key: str, *, endpoint: str | None = None,
                 allowed_ips: Iterable[str | IPNetwork] | str = (),
                 persistent_keepalive: int = 0) -> None:
        _set = object.__setattr__
        _set(self, "public_key", normalise_key(public_key))
        _set(self, "endpoint", None if endpoint is None else normalise_endpoint(endpoint))
        _set(self, "allowed_ips", parse_allowed_ips(allowed_ips))
        _set(self, "persistent_keepalive",
             _check_int("persistent_keepalive", persistent_keepalive, 0, 65535))
        # Worked out once per value: `ipaddress` hashes networks in Python, and a device
        # of 5,000 peers is hashed, compared and checked on every pass of an agent.
        _set(self, "_ip_keys", tuple(_network_sort_key(n) for n in self.allowed_ips))
        _set(self, "_hash", hash((self.public_key, self.endpoint, self._ip_keys,
                                  self.persistent_keepalive)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, init=False)
class Device:
    """One WireGuard interface and its peers, as configuration.

    Peers (any iterable of Peer) are stored as a tuple sorted by public key. Refused
    (ValueError): two peers with the same key; the same allowed-ip on two peers
    (WireGuard would silently move it to the last one, and the state would never match);
    a peer whose key is this device's own public key (WireGuard silently ignores it, so
    the plan would never become empty).

    `private_key` is hidden from repr so a logged Device never carries it.
    """

    name: str
    private_key: str | None = field(repr=False)
    listen_port: int
    fwmark: int
    mtu: int
    peers: tuple[Peer, ...]
    up: bool

    def __init__(self, name: str, *, private_key: str | None = None, listen_port: int = 0,
                 fwmark: int = 0, mtu: int = DEFAULT_MTU, peers: Iterable[Peer] = (),
                 up: bool = True) -> None:
        _set = object.__setattr__
        _set(self, "name", validate_interface_name(name))
        _set(self, "private_key", None if private_key is None else normalise_key(private_key))
        _set(self, "listen_port", _check_int("listen_port", listen_port, 0, 65535))
        _set(self, "fwmark", _check_int("fwmark", fwmark, 0, 0xFFFFFFFF))
        _set(self, "mtu", _check_int("mtu", mtu, MIN_MTU, MAX_MTU))
        if not isinstance(up, bool):
            raise ValueError(f"up must be a bool, not {up!r}")
        _set(self, "up", up)
        _set(self, "peers", self._checked_peers(peers))

    def _checked_peers(self, given: Iterable[Peer]) -> tuple[Peer, ...]:
        peers = tuple(given)
        for peer in peers:
            if not isinstance(peer, Peer):
                raise ValueError(f"peers must be Peer values, not {type(peer).__name__}")
        peers = tuple(sorted(peers, key=_public_key_of))
        keys = {p.public_key for p in peers}
        ips = [k for p in peers for k in p._ip_keys]
        if len(keys) == len(peers) and self.public_key not in keys and len(set(ips)) == len(ips):
            return peers  # the common case, checked in bulk; the loop below names the fault
        seen_keys: set[str] = set()
        owner: dict[tuple[int, int, int], str] = {}
        own = self.public_key
        for peer in peers:
            if peer.public_key in seen_keys:
                raise ValueError(f"device {self.name}: peer {peer.public_key} is listed twice")
            seen_keys.add(peer.public_key)
            if own is not None and peer.public_key == own:
                raise ValueError(f"device {self.name}: peer {peer.public_key} is this device's "
                                 "own public key")
            for net, key in zip(peer.allowed_ips, peer._ip_keys, strict=True):
                if key in owner:
                    raise ValueError(f"device {self.name}: allowed ip {net} is on two peers "
                                     f"({owner[key]} and {peer.public_key})")
                owner[key] = peer.public_key
        return peers

    def with_settings(self, *, private_key: str | None, listen_port: int) -> Device:
        """This device with another key and port, its peers kept as they are (not checked
        again unless the key changes: checking 5,000 peers costs tens of milliseconds, and
        only the own-key rule depends on the key)."""
        copy = object.__new__(Device)
        for name in ("name", "fwmark", "mtu", "up", "peers"):
            object.__setattr__(copy, name, getattr(self, name))
        object.__setattr__(copy, "private_key",
                           None if private_key is None else normalise_key(private_key))
        object.__setattr__(copy, "listen_port",
                           _check_int("listen_port", listen_port, 0, 65535))
        if copy.private_key != self.private_key:
            object.__setattr__(copy, "peers", copy._checked_peers(self.peers))
        return copy

    @property
    def public_key(self) -> str | None:
        """The public key of this device's private key (None when it has none)."""
        return None if self.private_key is None else public_key(self.private_key)

    def peer(self, key: str) -> Peer | None:
        """The peer with this public key, or None."""
        wanted = normalise_key(key)
        for candidate in self.peers:
            if candidate.public_key == wanted:
                return candidate
        return None


def _public_key_of(peer: Peer) -> str:
    return peer.public_key


@dataclass(frozen=True)
class PeerStats:
    """A peer's runtime counters, kept apart from its configuration.

    `last_handshake_sec`/`_nsec` are wall-clock (Unix) time of the last completed
    handshake; both 0 when there has been none.
    """

    public_key: str
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake_sec: int = 0
    last_handshake_nsec: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", normalise_key(self.public_key))

    @property
    def last_handshake(self) -> float | None:
        """Unix time of the last handshake in seconds, or None if there never was one."""
        if self.last_handshake_sec == 0 and self.last_handshake_nsec == 0:
            return None
        return self.last_handshake_sec + self.last_handshake_nsec / 1e9


@dataclass
class PeerReading:
    """One peer as a backend reads it, field by field (UAPI lines, netlink attributes),
    before it becomes a `Peer` and its `PeerStats`."""

    public_key: str
    endpoint: str | None = None
    keepalive: int = 0
    allowed: list[str] = field(default_factory=list)
    rx: int = 0
    tx: int = 0
    hs_sec: int = 0
    hs_nsec: int = 0

    def peer(self) -> Peer:
        return _read_peer(self.public_key, self.endpoint, tuple(self.allowed), self.keepalive)

    def stats(self) -> PeerStats:
        return PeerStats(self.public_key, rx_bytes=self.rx, tx_bytes=self.tx,
                         last_handshake_sec=self.hs_sec, last_handshake_nsec=self.hs_nsec)


@functools.lru_cache(maxsize=_MEMO)
def _read_peer(key: str, endpoint: str | None, allowed: tuple[str, ...], keepalive: int) -> Peer:
    """Memoised (it is pure): a resync reads the same thousands of peers as the last one,
    and validating each anew cost most of the 1 s a 5,000-peer answer took to parse."""
    return Peer(key, endpoint=endpoint, allowed_ips=parse_allowed_ips(allowed),
                persistent_keepalive=keepalive)
