"""An in-memory WireGuard backend for tests of the layers above (node agent, gateway).

Why it exists: code that reconciles WireGuard devices should be tested without root and
without wireguard-go. `FakeBackend` keeps devices in a dict, applies plans with the same
semantics as the real backends (per-peer updates, `update_only`, `replace_allowed_ips`,
"leave as it is" values), and records every plan it was given in `applied`, so a test can
assert what would have been sent. `fail_next` makes the next `apply` raise, to test
retries.

No I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from wireguard.errors import WireGuardError
from wireguard.model import Device, Peer, PeerStats
from wireguard.plan import DevicePlan


class FakeBackend:
    kind = "fake"

    def __init__(self, devices: dict[str, Device] | None = None) -> None:
        self.devices: dict[str, Device] = dict(devices or {})
        self.counters: dict[tuple[str, str], PeerStats] = {}
        self.applied: list[DevicePlan] = []
        self.kicks: list[tuple[str, tuple[str, ...]]] = []
        """(interface, peer keys) of every kick, in order."""
        self.fail_next: WireGuardError | None = None

    def read(self, name: str) -> Device | None:
        return self.devices.get(name)

    def stats(self, name: str) -> tuple[PeerStats, ...]:
        device = self.devices.get(name)
        if device is None:
            return ()
        return tuple(self.counters.get((name, p.public_key), PeerStats(p.public_key))
                     for p in device.peers)

    def delete(self, name: str) -> None:
        self.devices.pop(name, None)

    def kick(self, name: str, keys: Sequence[str]) -> None:
        if name not in self.devices:
            raise WireGuardError(f"{name}: no such interface")
        self.kicks.append((name, tuple(keys)))

    def apply(self, plan: DevicePlan) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.applied.append(plan)
        self.devices[plan.name] = apply_plan_to(self.devices.get(plan.name), plan)


def apply_plan_to(device: Device | None, plan: DevicePlan) -> Device:
    """The device that results from applying `plan` to `device` (None: absent). Purely
    computational."""
    if device is None:
        if not plan.create:
            raise WireGuardError(f"{plan.name}: no such interface")
        device = Device(name=plan.name, up=False)
    changes: dict[str, object] = {}
    if plan.private_key is not None:
        changes["private_key"] = plan.private_key
    if plan.listen_port is not None:
        changes["listen_port"] = plan.listen_port
    if plan.fwmark is not None:
        changes["fwmark"] = plan.fwmark
    if plan.mtu is not None:
        changes["mtu"] = plan.mtu
    if plan.link_up is not None:
        changes["up"] = plan.link_up
    peers = {p.public_key: p for p in device.peers}
    for peer in plan.add_peers:
        peers[peer.public_key] = peer
    for upd in plan.update_peers:
        old = peers.get(upd.public_key)
        if old is None:  # update_only: a vanished peer is not re-created
            continue
        peers[upd.public_key] = Peer(
            old.public_key,
            endpoint=upd.endpoint if upd.endpoint is not None else old.endpoint,
            allowed_ips=upd.allowed_ips if upd.allowed_ips is not None else old.allowed_ips,
            persistent_keepalive=(upd.persistent_keepalive if upd.persistent_keepalive
                                  is not None else old.persistent_keepalive),
        )
    for key in plan.remove_peers:
        peers.pop(key, None)
    changes["peers"] = tuple(peers.values())
    return dataclasses.replace(device, **changes)  # type: ignore[arg-type]
