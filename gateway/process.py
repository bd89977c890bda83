"""`meshgress gateway`: the egress gateway process, one per gateway node (host network).

Level-triggered, like the node agent:
1. informers fill caches (Nodes, Pods, Namespaces, EgressGateways, EgressPolicies, Leases)
   and only poke the loop;
2. `compute_egress` and `gateway.compute` turn the caches into the slots this node may
   serve; `gateway.claims.plan_claims` decides which leases to keep, take or give up;
3. the loop reads the kernel as it is now, plans (`gateway.dataplane`, the nftables plan,
   the WireGuard plan) and applies: fencing removals first, then adds, then removes;
   it retries on a timer and resyncs periodically; it writes status.

Fencing — an egress IP is up only while this process holds its lease:
- a separate thread renews held leases every LEASE_RENEW_SECONDS; when a renewal is
  refused (another holder) or keeps failing until shortly before the lease would expire,
  it removes the IP at once and the loop tears the rest of the slot down;
- the IP is added with a kernel lifetime shorter than the lease and refreshed after every
  renewal, so if this process dies, hangs or loses the datastore, the kernel removes the
  IP before anybody else can take the lease;
- adding the IP and fencing it take the same lock, so a stale decision never re-adds it.

Drain (SIGTERM/SIGINT): for every held slot, remove the IP, clear the slot's annotations and
release the lease (a standby takes it at once), then remove the slot interfaces, rules,
routes and the gateway's nftables table.

Only this module and the apply modules (`dataplane`, `probe`, `garp`, `flowlog`) touch
the kernel or the datastore; everything they act on is computed by pure functions.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.claims import ORPHAN_GRACE_SECONDS, ClaimPlan, plan_claims
from gateway.compute import (
    LEASE_ANNOTATIONS,
    SlotDataplane,
    SlotInfo,
    annotations_to_clear,
    compute_allowed_sources,
    compute_kept_numbers,
    compute_lease_annotations,
    compute_servable_slots,
    compute_slot_dataplane,
    compute_slot_numbers,
    compute_slot_peers,
    node_labels,
)
from gateway.dataplane import (
    RP_FILTER_LOOSE,
    DataplanePlan,
    EgressAddress,
    KernelError,
    KernelPort,
    NetlinkKernel,
    plan_dataplane,
)
from gateway.flowlog import FlowLog
from gateway.garp import announce
from gateway.metrics import GatewayMetrics, SlotSample
from gateway.options import DEFAULT_STATE_DIR
from gateway.probe import ProbeResponder
from gateway.rules import NFT_TABLE, SlotRules, compute_gateway_ruleset
from gateway.status import SlotRecord, compute_status_updates
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig, load_cluster_config
from meshgress.datastore import (
    LEASE_NAMESPACE,
    Datastore,
    DatastoreError,
    Kind,
    Lease,
    LeaseHeld,
    NotFound,
    Object,
)
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.informer import Informer
from meshgress.egress import EgressModel, compute_egress, namespace_labels, pod_view
from meshgress.kernel_ids import NFT_FAMILY
from meshgress.slots import (
    ENDPOINT_ANNOTATION,
    LEASE_DURATION_SECONDS,
    LEASE_RENEW_SECONDS,
    SlotId,
)
from nodeagent.mesh import NodeInfo, NodeParseCache
from nodeagent.metrics import serve_metrics
from nodeagent.nft import NftablesAdapter, NftablesPort, apply_ruleset
from wireguard.backend import WireGuardBackend, apply_device, detect_backend
from wireguard.errors import NotWireGuardDeviceError, WireGuardError
from wireguard.keys import load_or_create_private_key, public_key
from wireguard.model import Device
from wireguard.plan import DevicePlan

log = logging.getLogger("meshgress.gateway")

FENCE_MARGIN = 0.5
"""Seconds before the lease could expire (by our clock) at which a slot whose renewals
keep failing is fenced."""
KERNEL_SLACK = 0.35
"""How late the kernel may remove an address after its lifetime ends (measured: ~20 ms;
the worst case of its timer rounding is 250 ms)."""


class GatewayError(RuntimeError):
    """The gateway cannot start; the message says what to fix."""


@dataclass(frozen=True)
class GatewayConfig:
    node_name: str
    cluster: ClusterConfig = DEFAULT_CLUSTER_CONFIG
    state_dir: Path = DEFAULT_STATE_DIR
    max_slots: int = 1
    wireguard_backend: str | None = None
    wireguard_log: Path | None = None
    wireguard_log_level: str | None = None
    identity: str | None = None
    metrics_address: str | None = None
    flow_log: Path | None = None
    resync_interval: float = 10.0
    retry_interval: float = 1.0
    lease_duration: float = LEASE_DURATION_SECONDS
    renew_interval: float = LEASE_RENEW_SECONDS
    orphan_grace: float = ORPHAN_GRACE_SECONDS

    @property
    def startup_grace(self) -> float:
        """How long after start this process takes no slot beyond max_slots (so gateways
        that start a few seconds apart share the slots)."""
        return self.lease_duration

    @property
    def adopt_grace(self) -> float:
        """How long after start slot interfaces of slots not (yet) held are kept, so a
        restart that regains its slots keeps the nodes' WireGuard sessions."""
        return self.lease_duration + self.orphan_grace + 2 * self.renew_interval


@dataclass
class HeldSlot:
    """A slot whose lease this process holds (runtime state, never spec)."""

    slot: SlotId
    valid_until: float
    """Wall clock; the lease is ours at least until then (renewal start + duration)."""
    address: EgressAddress | None = None
    """The egress IP as this process brought it up (None: not up)."""
    published: Mapping[str, str] | None = None
    ready: bool = False


@dataclass
class _Snapshot:
    nodes: dict[str, Object]
    pods: list[Object]
    namespaces: list[Object]
    gateways: dict[str, Object]
    policies: dict[str, Object]
    leases: dict[str, Object]


@dataclass
class _Pass:
    """What one reconcile pass computed, for the steps that follow."""

    model: EgressModel
    own: NodeInfo | None
    servable: dict[SlotId, SlotInfo] = field(default_factory=dict)
    externals: dict[SlotId, str] = field(default_factory=dict)
    records: dict[SlotId, SlotRecord] = field(default_factory=dict)
    claims: ClaimPlan | None = None
    numbers: dict[SlotId, int] = field(default_factory=dict)


def _fmt(slot: SlotId) -> str:
    return f"{slot.gateway}/{slot.index}"


class Gateway:
    def __init__(self, config: GatewayConfig, store: Datastore, *,
                 kernel: KernelPort | None = None, wireguard: WireGuardBackend | None = None,
                 nft: NftablesPort | None = None, clock: Callable[[], float] = time.time,
                 garp: Callable[[str, bytes, ipaddress.IPv4Address], Any] | None = None,
                 probe: ProbeResponder | None = None) -> None:
        self.config = config
        self.store = store
        self.identity = config.identity or f"{config.node_name}/{os.getpid()}"
        self.clock = clock
        self.stop = threading.Event()
        self._poke = threading.Event()
        self._lock = threading.RLock()
        self._held: dict[SlotId, HeldSlot] = {}
        self._free_since: dict[SlotId, float] = {}
        self._externals: dict[SlotId, str] = {}
        self._kernel = kernel
        self._wireguard = wireguard
        self._nft = nft
        self._garp = garp
        self._probe = probe
        self._flow_log: FlowLog | None = None
        self.metrics = GatewayMetrics()
        self.private_key = load_or_create_private_key(config.state_dir / "private.key")
        self.public_key = public_key(self.private_key)
        self.started_at = clock()
        self.last_loop = time.monotonic()
        self.first_pass_ok = False
        self._number_error: str | None = None
        # The number (port, mark, table) of every slot, kept for as long as the slot
        # exists: renumbering would move a held slot's endpoint under its flows.
        self._numbers: dict[SlotId, int] = {}
        # A pass parses only the Nodes that changed since the last one (5,000 of them
        # would cost most of a second every pass).
        self._node_cache = NodeParseCache()
        self._waiting_for_node = False
        self._last_pass: _Pass | None = None
        kinds = (Kind.NODE, Kind.POD, Kind.NAMESPACE, Kind.EGRESS_GATEWAY, Kind.EGRESS_POLICY,
                 Kind.LEASE)
        self.informers = {kind: Informer(store, kind, on_change=self._poke.set)
                          for kind in kinds}

    # -- adapters (created lazily, in this process's network namespace) ----------------

    @property
    def kernel(self) -> KernelPort:
        if self._kernel is None:
            self._kernel = NetlinkKernel()
        return self._kernel

    @property
    def wireguard(self) -> WireGuardBackend:
        if self._wireguard is None:
            self._wireguard = detect_backend(self.config.wireguard_backend,
                                             log_path=self.config.wireguard_log,
                                             log_level=self.config.wireguard_log_level)
            log.info("wireguard backend=%s", self._wireguard.kind)
        return self._wireguard

    @property
    def nft(self) -> NftablesPort:
        if self._nft is None:
            self._nft = NftablesAdapter(NFT_FAMILY, NFT_TABLE)
        return self._nft

    @property
    def probe(self) -> ProbeResponder:
        if self._probe is None:
            self._probe = ProbeResponder()
        return self._probe

    def held(self) -> dict[SlotId, HeldSlot]:
        with self._lock:
            return dict(self._held)

    def poke(self) -> None:
        self._poke.set()

    # -- caches -----------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        def by_name(kind: Kind) -> dict[str, Object]:
            return {name: obj for (_, name), obj in self.informers[kind].snapshot().items()}

        leases = {name: obj for (ns, name), obj in self.informers[Kind.LEASE].snapshot().items()
                  if ns == LEASE_NAMESPACE}
        return _Snapshot(nodes=by_name(Kind.NODE),
                         pods=list(self.informers[Kind.POD].snapshot().values()),
                         namespaces=list(self.informers[Kind.NAMESPACE].snapshot().values()),
                         gateways=by_name(Kind.EGRESS_GATEWAY),
                         policies=by_name(Kind.EGRESS_POLICY), leases=leases)

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    # -- one pass ---------------------------------------------------------------------

    def reconcile(self) -> bool:
        """One pass: claims, dataplane, publish, status. True when every step succeeded."""
        now = self.clock()
        snap = self._snapshot()
        nodes = self._node_cache.parse_all(snap.nodes.values())
        pods = [pod_view(obj) for obj in snap.pods]
        model = compute_egress(
            gateways=snap.gateways.values(), policies=snap.policies.values(),
            namespaces=namespace_labels(snap.namespaces), pods=pods,
            node_addresses=[n.internal_ip for n in nodes if n.internal_ip is not None],
            cluster=self.config.cluster)
        own_obj = snap.nodes.get(self.config.node_name)
        own = self._node_cache.parse(own_obj) if own_obj else None
        state = _Pass(model=model, own=own)
        ok = True
        try:
            state.records = self._read_records(model, snap.leases)
            kept = compute_kept_numbers({slot: record.annotations for slot, record
                                         in state.records.items()}, self.config.node_name)
            kept.update(self._numbers)
            numbers = compute_slot_numbers(model, kept)
            self._numbers = numbers
            self._number_error = None
        except ValueError as exc:
            # Permanent until the configuration changes: say it once, serve nothing new.
            if self._number_error != str(exc):
                log.error("cannot number the egress slots error=%s", exc)
            self._number_error = str(exc)
            numbers = {}
        state.numbers = dict(numbers)
        if not state.records:
            state.records = self._read_records(model, snap.leases)
        if own is None or own.internal_ip is None:
            # Without its own Node (InternalIP, labels) the gateway cannot decide what to
            # serve: it changes nothing (held slots stay up and are renewed) and waits.
            if not self._waiting_for_node:
                log.warning("node=%s waiting for its Node object with an InternalIP",
                            self.config.node_name)
            self._waiting_for_node = True
            self._step("status", lambda: self._write_status(model, snap, now))
            return False
        self._waiting_for_node = False
        if numbers:
            servable = compute_servable_slots(model, node_labels(own_obj))
            for info in servable.slots:
                external = self._external_interface(info)
                if external is not None:
                    state.servable[info.slot] = info
                    state.externals[info.slot] = external
        ok &= self._claim(state, now)
        desired = self._desired(state, numbers, nodes, pods)
        ok &= self._apply(desired, model)
        ok &= self._publish(state, desired, snap)
        self._update_flow_log(desired, pods)
        ok &= self._step("status", lambda: self._write_status(model, snap, now))
        self._last_pass = state
        return ok

    def _external_interface(self, info: SlotInfo) -> str | None:
        """The slot's external interface on this node; None: it cannot be served here.
        A failed lookup (transient) keeps the last answer, so a netlink hiccup never
        makes a held slot look unservable (which would release it)."""
        try:
            name = info.interface or self.kernel.default_route_interface()
            if name is None:
                self.metrics.count_error("external-interface")
                log.warning("slot=%s no default route: cannot find the external interface",
                            _fmt(info.slot))
                return None
            if self.kernel.link_index(name) is None:
                self.metrics.count_error("external-interface")
                log.warning("slot=%s external interface %s does not exist on this node",
                            _fmt(info.slot), name)
                return None
            self._externals[info.slot] = name
            return name
        except KernelError as exc:
            self.metrics.count_error("external-interface")
            log.warning("slot=%s external interface: %s", _fmt(info.slot), exc)
            return self._externals.get(info.slot)

    def _read_records(self, model: EgressModel, leases: Mapping[str, Object]
                      ) -> dict[SlotId, SlotRecord]:
        records: dict[SlotId, SlotRecord] = {}
        for view in model.gateways.values():
            for slot, _ in view.slots:
                try:
                    lease = self.store.get_lease(slot.lease_name)
                except DatastoreError as exc:
                    self.metrics.count_error("read-lease")
                    log.warning("slot=%s cannot read its lease: %s", _fmt(slot), exc)
                    continue
                obj = leases.get(slot.lease_name) or {}
                annotations = (obj.get("metadata") or {}).get("annotations") or {}
                records[slot] = SlotRecord(lease, {str(k): str(v) for k, v in
                                                   annotations.items()})
        return records

    # -- claims -----------------------------------------------------------------------

    def _claim(self, state: _Pass, now: float) -> bool:
        leases: dict[SlotId, Lease | None] = {
            slot: record.lease for slot, record in state.records.items()}
        with self._lock:
            held = set(self._held)
        plan = plan_claims(holder=self.identity, held=held, leases=leases,
                           servable=sorted(state.servable), now=now,
                           max_slots=self.config.max_slots, free_since=self._free_since,
                           orphan_grace=self.config.orphan_grace,
                           orphans_allowed=now - self.started_at >= self.config.startup_grace)
        state.claims = plan
        self._free_since = dict(plan.free_since)
        ok = True
        for slot in plan.lost:
            lease = leases.get(slot)
            self.fence(slot, f"lease held by {lease.holder if lease else '?'}")
        for slot in plan.release:
            ok &= self._release(slot, "no longer servable here")
        for slot in plan.adopt:
            ok &= self._acquire(state, slot) is not False
        taken = 0
        for slot in plan.candidates:
            if taken >= plan.capacity and slot not in plan.orphans:
                continue
            result = self._acquire(state, slot)
            if result:
                taken += slot not in plan.orphans
            ok &= result is not False
        return ok

    def _acquire(self, state: _Pass, slot: SlotId) -> bool | None:
        """Take the slot's lease. True: taken; None: someone else has it; False: error."""
        started = self.clock()
        try:
            lease = self.store.acquire_lease(slot.lease_name, self.identity,
                                             self.config.lease_duration)
        except LeaseHeld as exc:
            log.debug("slot=%s not taken: %s", _fmt(slot), exc)
            self.poke()  # try another slot on the next pass
            return None
        except DatastoreError as exc:
            self.metrics.count_error("acquire")
            log.warning("slot=%s acquire failed: %s", _fmt(slot), exc)
            return False
        with self._lock:
            self._held[slot] = HeldSlot(slot, valid_until=started + self.config.lease_duration)
        self.metrics.acquisitions += 1
        record = state.records.get(slot)
        previous = record.lease.holder if record and record.lease else None
        log.info("slot claimed slot=%s lease=%s holder=%s previous=%s transitions=%d",
                 _fmt(slot), slot.lease_name, self.identity, previous, lease.transitions)
        # The previous holder's key and endpoint must not stay next to our holderIdentity.
        info = state.servable.get(slot)
        if record is not None and info is not None and state.own is not None \
                and state.own.internal_ip is not None:
            wanted = compute_lease_annotations(
                public_key=self.public_key, internal_ip=state.own.internal_ip, slot=slot,
                egress_ip=info.egress_ip, node=self.config.node_name,
                number=state.numbers.get(slot))
            stale = annotations_to_clear(record.annotations, wanted)
            if stale:
                self._step("clear-annotations", lambda: self.store.patch_annotations(
                    Kind.LEASE, slot.lease_name, stale, namespace=LEASE_NAMESPACE))
        return True

    def fence(self, slot: SlotId, reason: str) -> None:
        """The lease is lost (or about to be): the IP goes now, the rest on the next pass."""
        with self._lock:
            held = self._held.pop(slot, None)
            if held is None:
                return
            if held.address is not None:
                try:
                    self.kernel.delete_egress_address(held.address)
                except KernelError as exc:
                    # It still expires on its own, before the lease can be taken.
                    self.metrics.count_error("fence")
                    log.error("slot=%s cannot remove %s: %s", _fmt(slot), held.address.ip, exc)
        self.metrics.fenced += 1
        log.warning("slot fenced slot=%s reason=%s ip_removed=%s", _fmt(slot), reason,
                    held.address.ip if held.address else None)
        self.poke()

    def _release(self, slot: SlotId, reason: str) -> bool:
        """Give a held slot up on purpose: IP first, then annotations, then the lease."""
        with self._lock:
            held = self._held.get(slot)
            if held is None:
                return True
            if held.address is not None:
                try:
                    self.kernel.delete_egress_address(held.address)
                except KernelError as exc:
                    # Not released: the lease then expires after the IP's lifetime ended.
                    self._held.pop(slot, None)
                    self.metrics.count_error("release")
                    log.error("slot=%s cannot remove %s; letting the lease expire: %s",
                              _fmt(slot), held.address.ip, exc)
                    return False
            self._held.pop(slot, None)
        try:
            self.store.patch_annotations(Kind.LEASE, slot.lease_name,
                                         dict.fromkeys(LEASE_ANNOTATIONS),
                                         namespace=LEASE_NAMESPACE)
            self.store.release_lease(slot.lease_name, self.identity)
        except DatastoreError as exc:
            self.metrics.count_error("release")
            log.warning("slot=%s release failed (it expires instead): %s", _fmt(slot), exc)
            return False
        self.metrics.releases += 1
        log.info("slot released slot=%s reason=%s", _fmt(slot), reason)
        return True

    # -- renewals (own thread) --------------------------------------------------------

    def _keep_leases(self) -> None:
        while not self.stop.is_set():
            wait = self.config.renew_interval
            for held in self.held().values():
                if self.stop.is_set():
                    return
                try:
                    renewed = self._renew(held.slot)
                except Exception:
                    # Never let this thread die: the IPs would expire and flap.
                    self.metrics.count_error("renew")
                    log.exception("slot=%s renewal failed", _fmt(held.slot))
                    renewed = False
                if not renewed:
                    wait = min(wait, 0.2)
            self.stop.wait(wait)

    def _renew(self, slot: SlotId) -> bool:
        started = self.clock()
        try:
            self.store.acquire_lease(slot.lease_name, self.identity, self.config.lease_duration)
        except LeaseHeld as exc:
            self.metrics.renew_failures += 1
            self.fence(slot, f"renewal refused: {exc}")
            return True
        except (DatastoreError, OSError) as exc:
            self.metrics.renew_failures += 1
            with self._lock:
                held = self._held.get(slot)
                deadline = held.valid_until - FENCE_MARGIN if held else 0.0
            if self.clock() >= deadline:
                self.fence(slot, f"cannot renew before the lease expires: {exc}")
            else:
                log.warning("slot=%s renewal failed, retrying: %s", _fmt(slot), exc)
            return False
        with self._lock:
            held = self._held.get(slot)
            released = held is None
        if released:
            # Given up (released or fenced) while this renewal was in flight: undo the
            # renewal, so a standby need not wait for the lease to expire.
            with contextlib.suppress(DatastoreError):
                self.store.release_lease(slot.lease_name, self.identity)
            return True
        with self._lock:
            held = self._held.get(slot)
            if held is None:
                return True
            held.valid_until = started + self.config.lease_duration
            if held.address is not None:
                lifetime = self._lifetime(held)
                if lifetime >= 1:
                    try:
                        self.kernel.replace_egress_address(held.address, lifetime)
                    except KernelError as exc:
                        self.metrics.count_error("refresh-ip")
                        log.warning("slot=%s cannot refresh %s: %s", _fmt(slot),
                                    held.address.ip, exc)
        return True

    def _lifetime(self, held: HeldSlot) -> int:
        """Seconds the IP may stay up: it must be gone before the lease can expire."""
        return int(held.valid_until - self.clock() - KERNEL_SLACK)

    # -- desired state ----------------------------------------------------------------

    def _desired(self, state: _Pass, numbers: Mapping[SlotId, int], nodes: list[NodeInfo],
                 pods: list[Any]) -> list[SlotDataplane]:
        held = self.held()
        peers = compute_slot_peers(nodes, self.public_key)
        allowed = compute_allowed_sources(state.model, pods)
        desired: list[SlotDataplane] = []
        for slot in sorted(held):
            info = state.servable.get(slot)
            if info is None or slot not in numbers:
                continue
            external = state.externals[slot]
            try:
                mtu = self.kernel.link_mtu(external) or 1500
            except KernelError:
                mtu = 1500
            desired.append(compute_slot_dataplane(
                info, number=numbers[slot], external_interface=external, external_mtu=mtu,
                allowed_sources=allowed.get(slot.gateway, ()), private_key=self.private_key,
                peers=peers))
        return desired

    # -- apply ------------------------------------------------------------------------

    def _step(self, op: str, action: Callable[[], Any]) -> bool:
        try:
            result = action()
        except Exception as exc:
            # Kernel and datastore errors are transient from here: count, log, retry.
            self.metrics.count_error(op)
            log.warning("reconcile step=%s failed: %s", op, exc)
            return False
        describe = getattr(result, "describe", None)
        if callable(describe):
            for line in describe():
                log.info("%s: %s", op, line)
        elif op == "nftables" and result is not None and not getattr(result, "empty", True):
            log.info("nftables: %s", result.summary())
        return True

    def _apply(self, desired: list[SlotDataplane], model: EgressModel) -> bool:
        ok = True
        ruleset = compute_gateway_ruleset(
            SlotRules(suffix=s.suffix, interface=s.interface,
                      external_interface=s.external_interface, egress_ip=s.egress_ip,
                      mark=s.mark, allowed_sources=s.allowed_sources) for s in desired)
        ok &= self._step("nftables", lambda: apply_ruleset(self.nft, ruleset))
        devices_ok: set[SlotId] = set()
        for s in desired:
            if self._step("wireguard", partial(self._apply_device, s.device)):
                devices_ok.add(s.slot)
            else:
                ok = False
        known = {ip for view in model.gateways.values() for _, ip in view.slots
                 if isinstance(ip, ipaddress.IPv4Address)}
        known |= {s.egress_ip for s in desired}
        with self._lock:
            known |= {h.address.ip for h in self._held.values() if h.address}
        try:
            observed = self.kernel.read(known)
        except KernelError as exc:
            self.metrics.count_error("read-kernel")
            log.warning("reconcile step=read-kernel failed: %s", exc)
            return False
        keep: set[str] = set()
        if self.clock() - self.started_at < self.config.adopt_grace:
            keep = set(observed.slot_interfaces)
        plan = plan_dataplane(desired, observed, keep_interfaces=keep)
        ready_slots = [s for s in desired if s.slot in devices_ok]
        ok &= self._apply_plan(plan, ready_slots, observed.egress_addresses)
        ok &= self._step("probe", lambda: self.probe.ensure(self._probe_interfaces(ready_slots)))
        return ok

    def _apply_device(self, device: Device) -> DevicePlan:
        """apply_device; a slot interface the backend cannot manage (say, a wireguard-go
        whose socket folder is gone) is ours by its name: delete it and start afresh."""
        try:
            return apply_device(self.wireguard, device)
        except NotWireGuardDeviceError as exc:
            log.warning("interface=%s unmanageable, recreating it: %s", device.name, exc)
            self.kernel.delete_link(device.name)
            return apply_device(self.wireguard, device)

    def _delete_interface(self, name: str) -> None:
        try:
            self.wireguard.delete(name)
        except NotWireGuardDeviceError:
            self.kernel.delete_link(name)

    def _probe_interfaces(self, slots: list[SlotDataplane]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for s in slots:
            index = self.kernel.link_index(s.interface)
            if index is not None:
                out[s.interface] = (index, s.mark)
        return out

    def _apply_plan(self, plan: DataplanePlan, slots: list[SlotDataplane],
                    present: frozenset[EgressAddress]) -> bool:
        ok = True
        k = self.kernel
        for address in plan.remove_addresses:
            with self._lock:
                owner = next((h for h in self._held.values() if h.address == address), None)
                if owner is not None:
                    owner.address = None
                ok &= self._step("remove-ip", partial(k.delete_egress_address, address))
            log.info("egress ip removed ip=%s interface=%s", address.ip, address.interface)
        for name in plan.add_probe_addresses:
            ok &= self._step("probe-address", partial(k.add_probe_address, name))
        for name in plan.set_rp_filter:
            ok &= self._step("rp-filter", partial(k.set_rp_filter, name, RP_FILTER_LOOSE))
        for route in plan.add_routes:
            ok &= self._step("route", partial(k.replace_route, route))
        for rule in plan.add_rules:
            ok &= self._step("rule", partial(k.add_rule, rule))
        for s in slots:
            ok &= self._bring_up(s, present)
        for rule in plan.remove_rules:
            ok &= self._step("rule", partial(k.delete_rule, rule))
        for route in plan.remove_routes:
            ok &= self._step("route", partial(k.delete_route, route))
        for name in plan.remove_interfaces:
            ok &= self._step("wireguard", partial(self._delete_interface, name))
        with self._lock:
            for s in slots:
                held = self._held.get(s.slot)
                if held is not None:
                    held.ready = ok and held.address is not None
        if not plan.empty:
            for line in plan.describe():
                log.info("dataplane: %s", line)
        return ok

    def _bring_up(self, s: SlotDataplane, present: frozenset[EgressAddress]) -> bool:
        """Add the egress IP of a held slot (and announce it), under the fencing lock."""
        address = EgressAddress(s.external_interface, s.egress_ip)
        with self._lock:
            held = self._held.get(s.slot)
            if held is None:
                return True  # fenced meanwhile
            if address in present:
                # Up already; its lifetime is the renewals' business (setting it here, from
                # an older renewal, would only shorten it).
                held.address = address
                return True
            lifetime = self._lifetime(held)
            if lifetime < 1:
                log.warning("slot=%s lease too close to expiry to bring %s up", _fmt(s.slot),
                            s.egress_ip)
                return False
            try:
                self.kernel.replace_egress_address(address, lifetime)
            except KernelError as exc:
                self.metrics.count_error("add-ip")
                log.warning("slot=%s cannot add %s: %s", _fmt(s.slot), s.egress_ip, exc)
                return False
            held.address = address
        log.info("egress ip up slot=%s ip=%s interface=%s lifetime=%ds", _fmt(s.slot),
                 s.egress_ip, s.external_interface, lifetime)
        try:
            mac = self.kernel.link_mac(s.external_interface)
        except KernelError:
            mac = None
        if mac is not None:
            if self._garp is not None:
                self._garp(s.external_interface, mac, s.egress_ip)
            else:
                announce(s.external_interface, mac, s.egress_ip, stop=self.stop)
        return True

    # -- publish ----------------------------------------------------------------------

    def _publish(self, state: _Pass, desired: list[SlotDataplane], snap: _Snapshot) -> bool:
        """Publish key, endpoint, egress IP and node on the lease of every held slot whose
        dataplane is complete (nodes start sending as soon as they read it)."""
        own = state.own
        if own is None or own.internal_ip is None:
            return True
        ok = True
        for s in desired:
            with self._lock:
                held = self._held.get(s.slot)
                if held is None or not held.ready:
                    continue
                published = held.published
            wanted = compute_lease_annotations(
                public_key=self.public_key, internal_ip=own.internal_ip, slot=s.slot,
                egress_ip=s.egress_ip, node=self.config.node_name, number=s.number)
            record = state.records.get(s.slot)
            current = record.annotations if record else {}
            if all(current.get(k) == v for k, v in wanted.items()):
                with self._lock:
                    if s.slot in self._held:
                        self._held[s.slot].published = wanted
                continue
            if published == wanted:
                continue  # patched on an earlier pass; the cache has not caught up yet

            def patch(slot: SlotId = s.slot, values: dict[str, str] = wanted) -> None:
                self.store.patch_annotations(Kind.LEASE, slot.lease_name, values,
                                             namespace=LEASE_NAMESPACE)

            if self._step("publish", patch):
                with self._lock:
                    if s.slot in self._held:
                        self._held[s.slot].published = wanted
                log.info("slot published slot=%s endpoint=%s public_key=%s", _fmt(s.slot),
                         wanted[ENDPOINT_ANNOTATION], self.public_key)
            else:
                ok = False
        return ok

    def _update_flow_log(self, desired: list[SlotDataplane], pods: list[Any]) -> None:
        if self._flow_log is None:
            return
        self._flow_log.update({s.mark: s.slot for s in desired},
                              {str(p.ip): f"{p.namespace}/{p.name}" for p in pods if p.ip})

    # -- status -----------------------------------------------------------------------

    def _write_status(self, model: EgressModel, snap: _Snapshot, now: float) -> None:
        records = self._read_records(model, snap.leases)
        updates = compute_status_updates(model, snap.gateways, snap.policies, records, now)
        for name, status in updates.gateways.items():
            with contextlib.suppress(NotFound):
                self.store.patch_status(Kind.EGRESS_GATEWAY, name, status)
        for name, status in updates.policies.items():
            with contextlib.suppress(NotFound):
                self.store.patch_status(Kind.EGRESS_POLICY, name, status)

    # -- drain ------------------------------------------------------------------------

    def drain(self) -> None:
        """Give every slot up so a standby takes it at once, then remove what we made."""
        for slot in sorted(self.held()):
            self._release(slot, "draining")
        if self._probe is not None:
            with contextlib.suppress(OSError):
                self._probe.ensure({})
        try:
            observed = self.kernel.read(set())
            plan = plan_dataplane([], observed)
            for rule in plan.remove_rules:
                self._step("rule", partial(self.kernel.delete_rule, rule))
            for route in plan.remove_routes:
                self._step("route", partial(self.kernel.delete_route, route))
            for name in plan.remove_interfaces:
                self._step("wireguard", partial(self._delete_interface, name))
        except KernelError as exc:
            log.warning("drain: %s", exc)
        self._step("nftables", self.nft.delete_table)
        log.info("drained holder=%s", self.identity)

    # -- health and metrics -----------------------------------------------------------

    def health(self) -> dict[str, bool]:
        alive = time.monotonic() - self.last_loop < 3 * self.config.resync_interval + 5
        held = self.held().values()
        ready = self.synced() and self.first_pass_ok and all(h.ready for h in held)
        return {"live": alive, "ready": ready}

    def collect_metrics(self) -> str:
        try:
            counters = self.nft.counters()
        except Exception as exc:  # a scrape must never fail on the kernel
            log.debug("reading nftables counters: %s", exc)
            counters = {}
        held = self.held()
        samples: list[SlotSample] = []
        state = self._last_pass
        for slot, info in sorted((state.servable if state else {}).items()):
            h = held.get(slot)
            samples.append(SlotSample(slot.gateway, slot.index, str(info.egress_ip),
                                      slot.gateway_interface[len("mgeg"):], h is not None,
                                      bool(h and h.ready)))
        return self.metrics.render(slots=samples, counters=counters)

    # -- run --------------------------------------------------------------------------

    def run(self) -> int:
        for informer in self.informers.values():
            informer.start()
        renewer = threading.Thread(target=self._keep_leases, name="leases", daemon=True)
        renewer.start()
        if self.config.metrics_address:
            serve_metrics(self.config.metrics_address, self.collect_metrics, self.health,
                          self.stop)
        if self.config.flow_log is not None:
            self._flow_log = FlowLog(self.config.flow_log).start()
        log.info("gateway started node=%s holder=%s public_key=%s max_slots=%d",
                 self.config.node_name, self.identity, self.public_key, self.config.max_slots)
        try:
            while not self.stop.is_set():
                self.last_loop = time.monotonic()
                self._poke.clear()
                ok = False
                if self.synced():
                    self.metrics.reconciles += 1
                    try:
                        ok = self.reconcile()
                    except Exception:
                        # A bug, not bad input (that becomes status): log it, retry.
                        self.metrics.count_error("reconcile")
                        log.exception("reconcile failed")
                    self.metrics.reconcile_failures += not ok
                    self.first_pass_ok |= ok
                wait = self.config.resync_interval if ok else self.config.retry_interval
                plan = self._last_pass.claims if self._last_pass else None
                if plan is not None and plan.next_check is not None:
                    wait = min(wait, max(0.0, plan.next_check - self.clock()) + 0.01)
                self._poke.wait(max(wait, 0.02))
                # Coalesce bursts of events (every renewal is one) into one pass.
                self.stop.wait(0.05)
        finally:
            self.stop.set()
            self._poke.set()
            renewer.join(timeout=5)
            self.drain()
            if self._flow_log is not None:
                self._flow_log.close()
            if self._probe is not None:
                self._probe.close()
            for informer in self.informers.values():
                informer.stop()
        return 0


def main(args: argparse.Namespace) -> int:
    cluster = load_cluster_config(args.cluster_config) if args.cluster_config \
        else DEFAULT_CLUSTER_CONFIG
    config = GatewayConfig(
        node_name=args.node, cluster=cluster, state_dir=args.state_dir,
        max_slots=args.max_slots, wireguard_backend=args.wireguard_backend,
        wireguard_log=args.wireguard_log, wireguard_log_level=args.wireguard_log_level,
        identity=args.identity, metrics_address=args.metrics_address or None,
        flow_log=args.flow_log, resync_interval=args.resync_interval)
    try:
        store = FileDatastore(args.datastore)
    except (OSError, DatastoreError) as exc:
        raise GatewayError(f"cannot open the datastore at {args.datastore}: {exc}") from exc
    try:
        gateway = Gateway(config, store)
        gateway.wireguard  # noqa: B018 - fail at start, clearly, without WireGuard
    except WireGuardError as exc:
        store.close()
        raise GatewayError(str(exc)) from exc

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        gateway.stop.set()
        gateway.poke()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return gateway.run()
    finally:
        store.close()


if __name__ == "__main__":
    from gateway.options import add_arguments

    parser = argparse.ArgumentParser(prog="meshgress gateway")
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    parsed = parser.parse_args()
    logging.basicConfig(level=parsed.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(parsed))
