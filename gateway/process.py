"""`meshgress gateway`: the egress gateway process, one per gateway node (host network).

Level-triggered, like the node agent:
1. informers fill caches (Nodes, Pods, Namespaces, EgressGateways, EgressPolicies, Leases)
   and only poke the loop;
2. `compute_egress` and `gateway.compute` turn the caches into the slots this node may
   serve; each pass reads the slots' Leases afresh, not from the cache (the claims must
   not act on a holder the cache has not caught up with, nor the publication on
   annotations it has not), and `gateway.claims.plan_claims` decides which leases to keep,
   take or give up;
3. the loop reads the kernel as it is now, plans (`gateway.dataplane`, the nftables plan,
   the WireGuard plan) and applies: fencing removals first, then adds, then removes;
   it publishes its key and endpoint on the Lease of every slot it serves completely
   whenever that Lease, as read on this pass, says otherwise (whoever changed it: an old
   holder's late release, a person, a Lease deleted and created again by the renewal);
   any failure brings the next pass after the retry backoff, and it resyncs periodically;
   it writes status.

Fencing — an egress IP is up only while this process holds its lease — is the lease
keeper's (`gateway.leases`): its own thread renews held leases, fences a slot whose lease
is lost (the IP goes at once, the loop tears the rest down), and the IP lives in the kernel
with a lifetime shorter than the lease.

A slot is servable here only while this node's links can carry it (`gateway.uplink`): a
kernel notification pokes the loop the moment a link goes down, loses its carrier or its
default route, and the pass releases the slots that depended on it (IP first, then the
lease: a standby takes them at once) and claims nothing there until the link is back —
then, if others took its slots meanwhile, this process is a standby with nothing left over.

Drain (SIGTERM/SIGINT): for every held slot, remove the IP, then release the lease with the
slot's annotations cleared in the same write (a standby takes it at once), then remove the
slot interfaces, rules, routes and the gateway's nftables table.

Only this module and the apply modules (`dataplane`, `probe`, `garp`, `flowlog`) touch
the kernel or the datastore; everything they act on is computed by pure functions.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gateway.claims import ORPHAN_GRACE_SECONDS, ClaimLimits, ClaimPlan, plan_claims
from gateway.compute import (
    SlotDataplane,
    SlotInfo,
    compute_allowed_sources,
    compute_kept_numbers,
    compute_servable_slots,
    compute_slot_dataplane,
    compute_slot_numbers,
    compute_slot_peers,
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
from gateway.leases import LeaseKeeper, slot_name
from gateway.metrics import GatewayMetrics, SlotSample
from gateway.options import DEFAULT_STATE_DIR
from gateway.probe import ProbeResponder, ProbeSocket
from gateway.rules import SlotRules, compute_gateway_ruleset
from gateway.status import (
    REPORTING_CONTROLLER,
    SlotRecord,
    compute_status_events,
    compute_status_updates,
)
from gateway.uplink import ChangeWatch, UplinkView, UplinkWatcher, compute_uplink_fault
from meshgress import prometheus
from meshgress.binaries import WIREGUARD_GO_ON_PATH, describe_wireguard_go
from meshgress.cluster import (
    ENDPOINT_ANNOTATION,
    NodeInfo,
    NodeParseCache,
    node_labels,
    slot_annotations_to_clear,
    slot_lease_annotations,
)
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig
from meshgress.datastore import (
    LEASE_NAMESPACE,
    Datastore,
    DatastoreError,
    EventRecord,
    Kind,
    Lease,
    NotFound,
    Object,
    ObjectReference,
    parse_lease,
)
from meshgress.egress import EgressModel, PodView, compute_egress, namespace_labels, pod_view
from meshgress.kernel.nftables import NftablesAdapter, NftablesPort, apply_ruleset
from meshgress.kernel.rtnl import LinkWatch
from meshgress.kernel_ids import GATEWAY_NFT_TABLE, NFT_FAMILY
from meshgress.runtime import LoopMetrics, Pass, ReconcileLoop
from meshgress.slots import (
    LEASE_DURATION_SECONDS,
    LEASE_RENEW_SECONDS,
    MAX_SLOTS,
    SlotId,
)
from wireguard.backend import WireGuardBackend, apply_device, detect_backend
from wireguard.errors import NotWireGuardDeviceError
from wireguard.keys import load_or_create_private_key, public_key
from wireguard.model import Device
from wireguard.plan import DevicePlan

log = logging.getLogger("meshgress.gateway")


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
    wireguard_go: str = WIREGUARD_GO_ON_PATH
    """The wireguard-go program (userspace backend)."""
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
class _Snapshot:
    nodes: dict[str, Object]
    pods: list[Object]
    namespaces: list[Object]
    gateways: dict[str, Object]
    policies: dict[str, Object]


@dataclass
class _Pass:
    """What one reconcile pass computed, for the steps that follow."""

    model: EgressModel
    own: NodeInfo | None
    servable: dict[SlotId, SlotInfo] = field(default_factory=dict)
    externals: dict[SlotId, str] = field(default_factory=dict)
    records: dict[SlotId, SlotRecord] = field(default_factory=dict)
    unservable: dict[SlotId, str] = field(default_factory=dict)
    """Slots the gateway's node selects but whose uplink here is faulty, and why."""
    claims: ClaimPlan | None = None
    numbers: dict[SlotId, int] = field(default_factory=dict)


@dataclass
class GatewayPorts:
    """Everything the gateway touches outside itself and the datastore. `real` builds the
    kernel's, in the calling thread's network namespace; tests pass fakes."""

    kernel: KernelPort
    wireguard: WireGuardBackend
    nft: NftablesPort
    probe: ProbeResponder
    garp: Callable[[str, bytes, ipaddress.IPv4Address], Any] | None = None
    """Announces an egress IP (None: gratuitous ARP on the real interface)."""
    uplink_watch: ChangeWatch | None = None
    """Kernel notifications of link and default-route changes (None: the links are read
    on every pass, and passes come with events and resyncs only)."""

    @classmethod
    def real(cls, config: GatewayConfig) -> GatewayPorts:
        wireguard = detect_backend(config.wireguard_backend, log_path=config.wireguard_log,
                                   log_level=config.wireguard_log_level,
                                   wireguard_go=config.wireguard_go)
        log.info("wireguard backend=%s%s", wireguard.kind,
                 f" program={describe_wireguard_go(config.wireguard_go)}"
                 if wireguard.kind == "userspace" else "")
        watch: ChangeWatch | None = None
        try:
            watch = LinkWatch()
        except OSError as exc:
            log.error("cannot watch the links (a lost uplink is noticed at the next resync "
                      "only): %s", exc)
        return cls(kernel=NetlinkKernel(), wireguard=wireguard,
                   nft=NftablesAdapter(NFT_FAMILY, GATEWAY_NFT_TABLE), probe=ProbeResponder(),
                   uplink_watch=watch)


class Gateway:
    def __init__(self, config: GatewayConfig, store: Datastore, ports: GatewayPorts, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.ports = ports
        self.kernel = ports.kernel
        self.identity = config.identity or f"{config.node_name}/{os.getpid()}"
        self.clock = clock
        self.loop = ReconcileLoop(
            store, dict.fromkeys((Kind.NODE, Kind.POD, Kind.NAMESPACE, Kind.EGRESS_GATEWAY,
                                  Kind.EGRESS_POLICY, Kind.LEASE)),
            log=log, metrics=LoopMetrics("meshgress_gateway_", "meshgress_gateway_errors_total"),
            resync_interval=config.resync_interval, retry_interval=config.retry_interval,
            coalesce=0.05, wall_clock=clock)
        self.stop = self.loop.stop
        self.leases = LeaseKeeper(store, ports.kernel, identity=self.identity,
                                  lease_duration=config.lease_duration,
                                  renew_interval=config.renew_interval, clock=clock,
                                  count_error=self.loop.metrics.count_error,
                                  on_lost=self.loop.poke)
        self._free_since: dict[SlotId, float] = {}
        self._externals: dict[SlotId, str] = {}
        self._uplinks: UplinkView | None = None
        self._uplinks_read_at = float("-inf")
        self._uplinks_changed = threading.Event()
        self._uplink_faults: dict[SlotId, str] = {}
        self._uplink_watcher: UplinkWatcher | None = None
        self._flow_log: FlowLog | None = None
        self.metrics = GatewayMetrics(self.leases.metrics)
        self.private_key = load_or_create_private_key(config.state_dir / "private.key")
        self.public_key = public_key(self.private_key)
        self.started_at = clock()
        self.first_pass_ok = False
        self._number_error: str | None = None
        self._over_slot_limit: dict[str, tuple[str, ...]] = {}
        # The number (port, mark, table) of every slot, kept for as long as the slot
        # exists: renumbering would move a held slot's endpoint under its flows.
        self._numbers: dict[SlotId, int] = {}
        # A pass parses only the Nodes that changed since the last one (5,000 of them
        # would cost most of a second every pass).
        self._node_cache = NodeParseCache()
        self._waiting_for_node = False
        self._last_pass: _Pass | None = None

    def held(self) -> dict[SlotId, Any]:
        return self.leases.held()

    def poke(self) -> None:
        self.loop.poke()

    def synced(self) -> bool:
        return self.loop.synced()

    # -- caches -----------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        def by_name(kind: Kind) -> dict[str, Object]:
            return {name: obj for (_, name), obj in self.loop.snapshot(kind).items()}

        return _Snapshot(nodes=by_name(Kind.NODE),
                         pods=list(self.loop.snapshot(Kind.POD).values()),
                         namespaces=list(self.loop.snapshot(Kind.NAMESPACE).values()),
                         gateways=by_name(Kind.EGRESS_GATEWAY),
                         policies=by_name(Kind.EGRESS_POLICY))

    # -- one pass ---------------------------------------------------------------------

    def reconcile(self) -> Pass:
        """One pass: claims, dataplane, publish, status."""
        now = self.clock()
        snap = self._snapshot()
        nodes = self._node_cache.parse_all(snap.nodes.values())
        pods = [pod_view(obj) for obj in snap.pods]
        model = compute_egress(
            gateways=snap.gateways.values(), policies=snap.policies.values(),
            namespaces=namespace_labels(snap.namespaces), pods=pods,
            node_addresses=[n.internal_ip for n in nodes if n.internal_ip is not None],
            cluster=self.config.cluster)
        self._report_slot_limit(model.over_slot_limit())
        own_obj = snap.nodes.get(self.config.node_name)
        own = self._node_cache.parse(own_obj) if own_obj else None
        state = _Pass(model=model, own=own)
        state.records = self._read_records(model)
        state.numbers = self._number_slots(model, state.records)
        if own is None or own.internal_ip is None:
            # Without its own Node (InternalIP, labels) the gateway cannot decide what to
            # serve: it changes nothing (held slots stay up and are renewed) and waits.
            if not self._waiting_for_node:
                log.warning("node=%s waiting for its Node object with an InternalIP",
                            self.config.node_name)
            self._waiting_for_node = True
            self.loop.step("status", lambda: self._write_status(model, snap))
            return Pass(ran=False)
        self._waiting_for_node = False
        self.loop.serve_on_node_ip(own.internal_ip)
        if state.numbers:
            servable = compute_servable_slots(model, node_labels(own_obj))
            uplinks = self._read_uplinks()
            for info in servable.slots:
                if info.slot not in state.numbers:
                    continue  # came while the slots could not be numbered
                external, fault = self._external_interface(info, uplinks, own)
                if external is not None:
                    state.servable[info.slot] = info
                    state.externals[info.slot] = external
                elif fault is not None:
                    state.unservable[info.slot] = fault
            self._report_uplinks(state.unservable)
        ok = self._claim(state, now)
        desired = self._desired(state, nodes, pods)
        ok &= self._apply(desired, model)
        ok &= self._publish(state, desired)
        self._update_flow_log(desired, pods)
        ok &= self.loop.step("status", lambda: self._write_status(model, snap))
        self._last_pass = state
        self.first_pass_ok |= ok
        wake = None
        if state.claims is not None and state.claims.next_check is not None:
            wake = max(0.0, state.claims.next_check - self.clock()) + 0.01
        return Pass(wake_in=wake)

    def _number_slots(self, model: EgressModel, records: Mapping[SlotId, SlotRecord]
                      ) -> dict[SlotId, int]:
        kept = compute_kept_numbers({slot: record.annotations for slot, record
                                     in records.items()}, self.config.node_name)
        kept.update(self._numbers)
        try:
            numbers = compute_slot_numbers(model, kept)
        except ValueError as exc:
            # A bug (compute_egress caps the slots), permanent until the configuration
            # changes: say it once, and keep the last numbers of the slots that remain, so
            # that what is held stays servable (and held); new slots get nothing.
            if self._number_error != str(exc):
                log.error("cannot number the egress slots error=%s", exc)
            self._number_error = str(exc)
            present = {slot for view in model.gateways.values() for slot, _ in view.slots}
            return {slot: n for slot, n in self._numbers.items() if slot in present}
        self._numbers = numbers
        self._number_error = None
        return dict(numbers)

    def _report_slot_limit(self, over: dict[str, tuple[str, ...]]) -> None:
        """Log the egress IPs that get no slot when they change, not on every pass (status
        says it too: SlotLimitExceeded)."""
        if over == self._over_slot_limit:
            return
        if over:
            log.warning("egress IPs get no slot and are not served: at most %d are served "
                        "across all EgressGateways, the gateways created first keep theirs "
                        "count=%d not_served=%s", MAX_SLOTS, sum(map(len, over.values())),
                        ";".join(f"{name}:{','.join(ips)}" for name, ips in over.items()))
        else:
            log.info("every egress IP has a slot again")
        self._over_slot_limit = over

    def _on_uplink_change(self) -> None:
        """The kernel announced a link or default-route change (watcher thread)."""
        self._uplinks_changed.set()
        self.poke()

    def _read_uplinks(self) -> UplinkView | None:
        """The links as they are now; None when they cannot be read (a transient error:
        the last answers stand, so a netlink hiccup never releases a held slot).

        With a working watch the kernel is read again only after it announced a change,
        and on every resync (the node's address moving is not announced): between them a
        pass plans against the last read, which spares every pass a dump of the main
        table (a route per node of the mesh)."""
        watching = self._uplink_watcher is not None and self._uplink_watcher.working
        if (watching and self._uplinks is not None and not self._uplinks_changed.is_set()
                and self.clock() - self._uplinks_read_at < self.config.resync_interval):
            return self._uplinks
        self._uplinks_changed.clear()  # before reading: a change during the read counts
        try:
            self._uplinks = self.kernel.read_uplinks()
        except KernelError as exc:
            self._uplinks_changed.set()
            self.loop.note_failure("read-uplinks")
            log.warning("cannot read the links: %s", exc)
            return None
        self._uplinks_read_at = self.clock()
        return self._uplinks

    def _external_interface(self, info: SlotInfo, uplinks: UplinkView | None, own: NodeInfo
                            ) -> tuple[str | None, str | None]:
        """The slot's external interface on this node, or None and why it cannot be served
        here now. Without a fresh read of the links the last answer stands."""
        if uplinks is None:
            external = self._externals.get(info.slot)
            return external, (None if external else "the links cannot be read")
        external = info.interface or uplinks.default_interface
        fault = compute_uplink_fault(uplinks, external, own.internal_ip)
        if fault is not None:
            self._externals.pop(info.slot, None)
            return None, fault
        assert external is not None
        self._externals[info.slot] = external
        return external, None

    def _report_uplinks(self, faults: Mapping[SlotId, str]) -> None:
        """Log each uplink fault once, when it appears and when it clears (not every
        pass), with the slots it concerns."""
        held = self.leases.held()

        def by_fault(slots: Mapping[SlotId, str]) -> dict[str, list[SlotId]]:
            grouped: dict[str, list[SlotId]] = {}
            for slot, fault in sorted(slots.items()):
                grouped.setdefault(fault, []).append(slot)
            return grouped

        now, before = by_fault(faults), by_fault(self._uplink_faults)
        for fault, slots in now.items():
            if before.get(fault) != slots:
                self.loop.metrics.count_error("external-interface")
                log.warning("uplink fault=%r releasing=%s not_claiming=%s", fault,
                            ",".join(slot_name(s) for s in slots if s in held) or "-",
                            ",".join(slot_name(s) for s in slots if s not in held) or "-")
        for fault, slots in before.items():
            cleared = [s for s in slots if s not in faults]
            if cleared:
                log.info("uplink fault cleared fault=%r servable_again=%s", fault,
                         ",".join(slot_name(s) for s in cleared))
        self._uplink_faults = dict(faults)

    def _read_records(self, model: EgressModel) -> dict[SlotId, SlotRecord]:
        """Every slot's Lease as stored now, read afresh (the cache may lag behind a
        take-over): its holder and its annotations, of one version."""
        records: dict[SlotId, SlotRecord] = {}
        for view in model.gateways.values():
            for slot, _ in view.slots:
                try:
                    obj = self.store.get(Kind.LEASE, slot.lease_name, LEASE_NAMESPACE)
                    lease = parse_lease(obj)
                except NotFound:
                    records[slot] = SlotRecord(None)
                    continue
                except DatastoreError as exc:
                    self.loop.note_failure("read-lease")
                    log.warning("slot=%s cannot read its lease: %s", slot_name(slot), exc)
                    continue
                annotations = (obj.get("metadata") or {}).get("annotations") or {}
                records[slot] = SlotRecord(lease, {str(k): str(v) for k, v in
                                                   annotations.items()})
        return records

    # -- claims -----------------------------------------------------------------------

    def _claim(self, state: _Pass, now: float) -> bool:
        leases: dict[SlotId, Lease | None] = {
            slot: record.lease for slot, record in state.records.items()}
        plan = plan_claims(holder=self.identity, held=set(self.leases.held()), leases=leases,
                           servable=sorted(state.servable), now=now,
                           free_since=self._free_since,
                           limits=ClaimLimits(
                               max_slots=self.config.max_slots,
                               orphan_grace=self.config.orphan_grace,
                               orphans_allowed=now - self.started_at >= self.config.startup_grace,
                               orphans_from=self.started_at + self.config.startup_grace))
        state.claims = plan
        self._free_since = dict(plan.free_since)
        ok = True
        for slot in plan.lost:
            lease = leases.get(slot)
            self.leases.fence(slot, f"lease held by {lease.holder if lease else '?'}")
        for slot in plan.release:
            ok &= self._release(slot, state.unservable.get(slot, "no longer servable here"))
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

    def _release(self, slot: SlotId, reason: str) -> bool:
        if self.leases.release(slot, reason):
            return True
        self.loop.note_failure("release")
        return False

    def _acquire(self, state: _Pass, slot: SlotId) -> bool | None:
        """Take the slot's lease. True: taken; None: someone else has it; False: error."""
        try:
            lease = self.leases.acquire(slot)
        except DatastoreError as exc:
            self.loop.note_failure("acquire")
            log.warning("slot=%s acquire failed: %s", slot_name(slot), exc)
            return False
        if lease is None:
            self.poke()  # try another slot on the next pass
            return None
        record = state.records.get(slot)
        previous = record.lease.holder if record and record.lease else None
        log.info("slot claimed slot=%s lease=%s holder=%s previous=%s transitions=%d",
                 slot_name(slot), slot.lease_name, self.identity, previous, lease.transitions)
        if previous is not None and previous != self.identity:
            self._record_takeover(slot, previous, state.servable.get(slot))
        # The previous holder's key and endpoint must not stay next to our holderIdentity.
        info = state.servable.get(slot)
        if record is not None and info is not None and state.own is not None \
                and state.own.internal_ip is not None:
            wanted = slot_lease_annotations(
                holder=self.identity, public_key=self.public_key,
                internal_ip=state.own.internal_ip,
                egress_ip=info.egress_ip, node=self.config.node_name,
                number=state.numbers.get(slot))
            stale = slot_annotations_to_clear(record.annotations, wanted)
            if stale:
                self.loop.step("clear-annotations", lambda: self.store.patch_annotations(
                    Kind.LEASE, slot.lease_name, stale, namespace=LEASE_NAMESPACE))
        return True

    def _record_takeover(self, slot: SlotId, previous: str, info: SlotInfo | None) -> None:
        """A Normal Event on the EgressGateway: this process took a slot over from a
        holder that stopped renewing its lease (crashed, cut off, or restarted)."""
        obj = self.loop.snapshot(Kind.EGRESS_GATEWAY).get(("", slot.gateway)) or {
            "metadata": {"name": slot.gateway}}
        ip = f"egress IP {info.egress_ip} " if info is not None else ""
        event = EventRecord(
            regarding=ObjectReference.to(Kind.EGRESS_GATEWAY, obj), reason="SlotTakenOver",
            note=f"{ip}(slot {slot.index}) taken over by {self.identity} on node "
                 f"{self.config.node_name}: the lease of {previous} had expired",
            type="Normal", action="TakeOver", reporting_controller=REPORTING_CONTROLLER,
            reporting_instance=self.identity)
        self.loop.step("event", lambda: self.store.record_event(event))

    # -- desired state ----------------------------------------------------------------

    def _desired(self, state: _Pass, nodes: list[NodeInfo], pods: list[PodView]
                 ) -> list[SlotDataplane]:
        held = self.leases.held()
        peers = compute_slot_peers(nodes, self.public_key)
        allowed = compute_allowed_sources(state.model, pods)
        desired: list[SlotDataplane] = []
        for slot in sorted(held):
            info = state.servable.get(slot)
            if info is None or slot not in state.numbers:
                continue
            external = state.externals[slot]
            try:
                mtu = self.kernel.link_mtu(external) or 1500
            except KernelError:
                mtu = 1500
            desired.append(compute_slot_dataplane(
                info, number=state.numbers[slot], external_interface=external,
                external_mtu=mtu, allowed_sources=allowed.get(slot.gateway, ()),
                private_key=self.private_key, peers=peers))
        return desired

    # -- apply ------------------------------------------------------------------------

    def _apply(self, desired: list[SlotDataplane], model: EgressModel) -> bool:
        ok = True
        step = self.loop.step
        ruleset = compute_gateway_ruleset(
            SlotRules(suffix=s.suffix, interface=s.interface,
                      external_interface=s.external_interface, egress_ip=s.egress_ip,
                      mark=s.mark, allowed_sources=s.allowed_sources) for s in desired)
        rules_ok = step("nftables", lambda: apply_ruleset(self.ports.nft, ruleset))
        ok &= rules_ok
        devices_ok: set[SlotId] = set()
        for s in desired:
            if step("wireguard", partial(self._apply_device, s.device)):
                devices_ok.add(s.slot)
            else:
                ok = False
        known = {ip for view in model.gateways.values() for _, ip in view.slots
                 if isinstance(ip, ipaddress.IPv4Address)}
        known |= {s.egress_ip for s in desired}
        known |= {address.ip for address in self.leases.addresses()}
        try:
            observed = self.kernel.read(known)
        except KernelError as exc:
            self.loop.note_failure("read-kernel")
            log.warning("reconcile step=read-kernel failed: %s", exc)
            return False
        keep: set[str] = set()
        if self.clock() - self.started_at < self.config.adopt_grace:
            keep = set(observed.slot_interfaces)
        plan = plan_dataplane(desired, observed, keep_interfaces=keep)
        ready_slots = [s for s in desired if s.slot in devices_ok]
        ok &= self._apply_plan(plan, ready_slots, observed.egress_addresses)
        if not rules_ok:
            # Without its SNAT and source filter a slot would forward pods' packets with
            # their own addresses: not ready, so it is neither published nor counted.
            self.leases.set_ready((s.slot for s in ready_slots), False)
        ok &= step("probe", lambda: self.ports.probe.ensure(self._probe_interfaces(ready_slots)))
        return ok

    def _apply_device(self, device: Device) -> DevicePlan:
        """apply_device; a slot interface the backend cannot manage (say, a wireguard-go
        whose socket folder is gone) is ours by its name: delete it and start afresh."""
        try:
            return apply_device(self.ports.wireguard, device)
        except NotWireGuardDeviceError as exc:
            log.warning("interface=%s unmanageable, recreating it: %s", device.name, exc)
            self.kernel.delete_link(device.name)
            return apply_device(self.ports.wireguard, device)

    def _delete_interface(self, name: str) -> None:
        try:
            self.ports.wireguard.delete(name)
        except NotWireGuardDeviceError:
            self.kernel.delete_link(name)

    def _probe_interfaces(self, slots: list[SlotDataplane]) -> dict[str, ProbeSocket]:
        out: dict[str, ProbeSocket] = {}
        for s in slots:
            index = self.kernel.link_index(s.interface)
            if index is not None:
                out[s.interface] = ProbeSocket(index, s.mark, s.egress_ip)
        return out

    def _apply_plan(self, plan: DataplanePlan, slots: list[SlotDataplane],
                    present: frozenset[EgressAddress]) -> bool:
        ok = True
        k = self.kernel
        step = self.loop.step
        for address in plan.remove_addresses:
            self.leases.forget_address(address)
            ok &= step("remove-ip", partial(k.delete_egress_address, address))
            log.info("egress ip removed ip=%s interface=%s", address.ip, address.interface)
        for name in plan.add_interface_addresses:
            ok &= step("interface-address", partial(k.add_interface_address, name))
        for name in plan.set_rp_filter:
            ok &= step("rp-filter", partial(k.set_rp_filter, name, RP_FILTER_LOOSE))
        for route in plan.add_routes:
            ok &= step("route", partial(k.replace_route, route))
        for rule in plan.add_rules:
            ok &= step("rule", partial(k.add_rule, rule))
        for s in slots:
            ok &= self._bring_up(s, present)
        for rule in plan.remove_rules:
            ok &= step("rule", partial(k.delete_rule, rule))
        for route in plan.remove_routes:
            ok &= step("route", partial(k.delete_route, route))
        for name in plan.remove_interfaces:
            ok &= step("wireguard", partial(self._delete_interface, name))
        self.leases.set_ready((s.slot for s in slots), ok)
        if not plan.empty:
            for line in plan.describe():
                log.info("dataplane: %s", line)
        return ok

    def _bring_up(self, s: SlotDataplane, present: frozenset[EgressAddress]) -> bool:
        """Add the egress IP of a held slot (and announce it)."""
        address = EgressAddress(s.external_interface, s.egress_ip)
        added = self.leases.bring_up(s.slot, address, address in present)
        if added is None:
            return True
        if not added:
            self.loop.note_failure("add-ip")
            return False
        try:
            mac = self.kernel.link_mac(s.external_interface)
        except KernelError:
            mac = None
        if mac is not None:
            if self.ports.garp is not None:
                self.ports.garp(s.external_interface, mac, s.egress_ip)
            else:
                announce(s.external_interface, mac, s.egress_ip, stop=self.stop)
        return True

    # -- publish ----------------------------------------------------------------------

    def _publish(self, state: _Pass, desired: list[SlotDataplane]) -> bool:
        """Publish key, endpoint, egress IP and node on the lease of every held slot whose
        dataplane is complete (nodes start sending as soon as they read it)."""
        own = state.own
        if own is None or own.internal_ip is None:
            return True
        ok = True
        held = self.leases.held()
        for s in desired:
            mine = held.get(s.slot)
            if mine is None or not mine.ready:
                continue
            wanted = slot_lease_annotations(
                holder=self.identity, public_key=self.public_key, internal_ip=own.internal_ip,
                egress_ip=s.egress_ip, node=self.config.node_name, number=s.number)
            # Compared with the Lease as read on this pass, never with what this process
            # wrote before: whoever cleared it since (an old holder's late release, a
            # person) has it published again.
            record = state.records.get(s.slot)
            current = record.annotations if record else {}
            if all(current.get(k) == v for k, v in wanted.items()):
                continue

            def patch(slot: SlotId = s.slot, values: dict[str, str] = wanted) -> None:
                self.store.patch_annotations(Kind.LEASE, slot.lease_name, values,
                                             namespace=LEASE_NAMESPACE)

            if self.loop.step("publish", patch):
                log.info("slot published slot=%s endpoint=%s public_key=%s",
                         slot_name(s.slot), wanted[ENDPOINT_ANNOTATION], self.public_key)
            else:
                ok = False
        return ok

    def _update_flow_log(self, desired: list[SlotDataplane], pods: list[PodView]) -> None:
        if self._flow_log is None:
            return
        self._flow_log.update({s.mark: s.slot for s in desired},
                              {str(p.ip): f"{p.namespace}/{p.name}" for p in pods if p.ip})

    # -- status -----------------------------------------------------------------------

    def _write_status(self, model: EgressModel, snap: _Snapshot) -> None:
        records = self._read_records(model)
        updates = compute_status_updates(model, snap.gateways, snap.policies, records,
                                         self.clock())
        for event in compute_status_events(updates, snap.gateways, snap.policies,
                                           reporting_instance=self.identity):
            self.loop.step("event", partial(self.store.record_event, event))
        for name, status in updates.gateways.items():
            with contextlib.suppress(NotFound):
                self.store.patch_status(Kind.EGRESS_GATEWAY, name, status)
        for name, status in updates.policies.items():
            with contextlib.suppress(NotFound):
                self.store.patch_status(Kind.EGRESS_POLICY, name, status)

    # -- drain ------------------------------------------------------------------------

    def drain(self) -> None:
        """Give every slot up so a standby takes it at once, then remove what we made."""
        for slot in sorted(self.leases.held()):
            self._release(slot, "draining")
        with contextlib.suppress(OSError):
            self.ports.probe.ensure({})
        step = self.loop.step
        try:
            observed = self.kernel.read(set())
            plan = plan_dataplane([], observed)
            for rule in plan.remove_rules:
                step("rule", partial(self.kernel.delete_rule, rule))
            for route in plan.remove_routes:
                step("route", partial(self.kernel.delete_route, route))
            for name in plan.remove_interfaces:
                step("wireguard", partial(self._delete_interface, name))
        except KernelError as exc:
            log.warning("drain: %s", exc)
        step("nftables", self.ports.nft.delete_table)
        log.info("drained holder=%s", self.identity)

    # -- health and metrics -----------------------------------------------------------

    def ready(self) -> bool:
        held = self.leases.held().values()
        return self.synced() and self.first_pass_ok and all(h.ready for h in held)

    def health(self) -> dict[str, bool]:
        return {"live": self.loop.live(), "ready": self.ready()}

    def render_metrics(self, page: prometheus.Exposition) -> None:
        try:
            counters = self.ports.nft.counters()
        except Exception as exc:  # a scrape must never fail on the kernel
            log.debug("reading nftables counters: %s", exc)
            counters = {}
        held = self.leases.held()
        samples: list[SlotSample] = []
        state = self._last_pass
        for slot, info in sorted((state.servable if state else {}).items()):
            h = held.get(slot)
            samples.append(SlotSample(slot.gateway, slot.index, str(info.egress_ip),
                                      slot.suffix, h is not None, bool(h and h.ready)))
        self.metrics.render(page, slots=samples, counters=counters)

    def collect_metrics(self) -> str:
        page = prometheus.Exposition()
        self.loop.metrics.render(page)
        self.render_metrics(page)
        return page.render()

    # -- run --------------------------------------------------------------------------

    def run(self) -> int:
        self.leases.start()
        if self.ports.uplink_watch is not None:
            self._uplink_watcher = UplinkWatcher(self.ports.uplink_watch,
                                                 self._on_uplink_change).start()
        if self.config.metrics_address:
            self.loop.serve_metrics(self.config.metrics_address, self.render_metrics,
                                    self.ready)
        if self.config.flow_log is not None:
            self._flow_log = FlowLog(self.config.flow_log).start()
        log.info("gateway started node=%s holder=%s public_key=%s max_slots=%d",
                 self.config.node_name, self.identity, self.public_key, self.config.max_slots)
        try:
            self.loop.run(self.reconcile)
        finally:
            if self._uplink_watcher is not None:
                self._uplink_watcher.close()
            self.leases.stop()
            self.drain()
            if self._flow_log is not None:
                self._flow_log.close()
            self.ports.probe.close()
        return 0
