"""`meshgress agent`: the node agent process, one per node.

Level-triggered, in the shape the design fixes:
1. informers fill caches (no kernel I/O there) and poke the loop;
2. `compute_mesh` and `compute_ruleset` turn the caches into this node's desired state;
3. each subsystem plans the difference against the kernel: read in full at start, on
   every resync (`resync_interval`) and after any error, and in between as last read plus
   the writes made since (`nodeagent.tracker`: what lets one node's change reach the
   kernel in tens of milliseconds in a 5,000-node cluster);
4. apply adds before it removes, retries on a timer, and the periodic resync repairs drift.

Start-up order is what makes the node fail closed: the `inet meshgress` table (leak guard
and masquerade) and the unreachable fallback for the cluster pod range are programmed
before the CNI server accepts its first pod, and the WireGuard device has its peers before
this node publishes its public key — so a peer that learns the key can handshake at once.

A restart adopts what it finds: nothing is flushed, wireguard-go keeps running (it lives in
its own session), and only differences are applied. Stopping (SIGTERM) leaves the
dataplane in place, so traffic flows while the agent is away.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cni.ipam import Ipam
from cni.model import PodAttachment
from cni.server import serve as serve_cni
from cni.service import CniService
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig, load_cluster_config
from meshgress.datastore import Datastore, DatastoreError, Kind, NotFound
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.informer import Informer
from meshgress.egress import compute_egress, namespace_labels, pod_view
from meshgress.kernel_ids import WIREGUARD_INTERFACE, WIREGUARD_PORT
from meshgress.slots import probe_source
from nodeagent import host
from nodeagent.egress_apply import EgressKernel
from nodeagent.mesh import (
    MeshInputs,
    MeshState,
    NodeInfo,
    NodeParseCache,
    RouteSpec,
    compute_mesh,
    compute_mtu,
    compute_node_annotations,
)
from nodeagent.metrics import AgentMetrics, SlotSample, serve_metrics
from nodeagent.nft import NftablesAdapter, apply_ruleset
from nodeagent.nft_model import FirewallSpec, Ruleset, compute_ruleset
from nodeagent.options import DEFAULT_CNI_SOCKET, DEFAULT_METRICS_ADDRESS, DEFAULT_STATE_DIR
from nodeagent.prober import SlotProber
from nodeagent.routes import NetlinkRoutes, apply_routes
from nodeagent.steering import (
    POLICY_COUNTER_PREFIX,
    LocalPod,
    SteeringInputs,
    SteeringState,
    compute_steering,
    parse_slot_lease,
    policy_flows_counter,
    slot_flows_counter,
)
from nodeagent.tracker import TrackedDataplane, apply_device_tracked
from wireguard.backend import WireGuardBackend, detect_backend
from wireguard.keys import load_or_create_private_key, public_key
from wireguard.model import Device

log = logging.getLogger("meshgress.agent")


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    datastore_dir: Path
    cluster: ClusterConfig = DEFAULT_CLUSTER_CONFIG
    state_dir: Path = DEFAULT_STATE_DIR
    cni_socket: Path = DEFAULT_CNI_SOCKET
    wireguard_backend: str | None = None
    wireguard_log: Path | None = None
    wireguard_log_level: str | None = None
    mtu: int | None = None
    metrics_address: str | None = DEFAULT_METRICS_ADDRESS
    resync_interval: float = 10.0
    retry_interval: float = 1.0
    node_grace: float = 30.0
    """How long a node that vanished from the datastore keeps its peer and routes (a
    re-list or a brief datastore hiccup must not tear the mesh down)."""


class _Lines:
    """Adapts a list of change descriptions to what `_step` logs."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def describe(self) -> list[str]:
        return self.lines


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


@dataclass
class _Seen:
    info: NodeInfo
    at: float


@dataclass
class AgentState:
    """What the loop remembers about the cluster (never about the kernel)."""

    last_seen: dict[str, _Seen] = field(default_factory=dict)
    mesh: MeshState | None = None
    steering: SteeringState | None = None
    mtu: int | None = None
    published: bool = False
    first_apply_ok: bool = False
    last_loop: float = 0.0


class Agent:
    def __init__(self, config: AgentConfig, store: Datastore,
                 wireguard: WireGuardBackend | None = None) -> None:
        self.config = config
        self.store = store
        self.stop = threading.Event()
        self._poke = threading.Event()
        self._health_changed = threading.Event()
        poke = self._poke.set
        self.nodes = Informer(store, Kind.NODE, on_change=poke)
        self.pods = Informer(store, Kind.POD, on_change=poke,
                             field_node_name=config.node_name)
        self.namespaces = Informer(store, Kind.NAMESPACE, on_change=poke)
        self.gateways = Informer(store, Kind.EGRESS_GATEWAY, on_change=poke)
        self.policies = Informer(store, Kind.EGRESS_POLICY, on_change=poke)
        self.leases = Informer(store, Kind.LEASE, on_change=poke)
        self.informers = (self.nodes, self.pods, self.namespaces, self.gateways,
                          self.policies, self.leases)
        # Serialises reconciles: the loop's and the CNI hook's (a pod's steering must be
        # in place before its ADD returns).
        self._reconcile_lock = threading.Lock()
        self._local_pods: dict[tuple[str, str], LocalPod] = {}
        self._hook_labels: dict[tuple[str, str], dict[str, Any]] = {}
        self.prober: SlotProber | None = None
        self._egress: EgressKernel | None = None
        self._slot_numbers_seen: dict[str, int] = {}
        self.state = AgentState()
        self.metrics = AgentMetrics(started_at=time.time())
        self._wireguard = wireguard
        key_path = config.state_dir / "wireguard" / "private.key"
        self.private_key = load_or_create_private_key(key_path)
        self.public_key = public_key(self.private_key)
        self._routes: NetlinkRoutes | None = None
        self._node_cache = NodeParseCache()
        self._wg_tracked: TrackedDataplane[Device | None] = TrackedDataplane(
            "wireguard", resync_interval=config.resync_interval)
        self._routes_tracked: TrackedDataplane[frozenset[RouteSpec]] = TrackedDataplane(
            "routes", resync_interval=config.resync_interval)
        self._nft: NftablesAdapter | None = None
        self.cni_ready = threading.Event()

    # -- caches ---------------------------------------------------------------------

    def _own_node(self) -> NodeInfo | None:
        obj = self.nodes.snapshot().get(("", self.config.node_name))
        return self._node_cache.parse(obj) if obj else None

    def _all_nodes(self) -> list[NodeInfo]:
        """Every cached Node, parsed (only those that changed since the last pass are)."""
        return self._node_cache.parse_all(self.nodes.snapshot().values())

    def _nodes_with_grace(self, now: float) -> tuple[NodeInfo, ...]:
        current = {info.name: info for info in self._all_nodes()}
        for name, info in current.items():
            self.state.last_seen[name] = _Seen(info, now)
        for name in list(self.state.last_seen):
            if name in current:
                continue
            if now - self.state.last_seen[name].at > self.config.node_grace:
                log.info("node %s is gone for %.0fs: removing its peer", name,
                         self.config.node_grace)
                del self.state.last_seen[name]
        return tuple(seen.info for seen in self.state.last_seen.values())

    # -- reconcile ------------------------------------------------------------------

    def reconcile(self) -> bool:
        """One pass: compute, plan against the kernel, apply. True when all succeeded."""
        with self._reconcile_lock:
            return self._reconcile()

    def _reconcile(self) -> bool:
        started = time.monotonic()
        ok = True
        own = self._own_node()
        if own is None or not own.pod_cidrs or own.internal_ip is None:
            log.warning("node %s: waiting for its Node object with spec.podCIDRs and an "
                        "InternalIP", self.config.node_name)
            return False
        if self.state.mtu is None:
            self.state.mtu = self.config.mtu or compute_mtu(
                host.underlay_mtu(str(own.internal_ip)), own.internal_ip.version == 6)
        mesh = compute_mesh(MeshInputs(
            self_name=self.config.node_name, nodes=self._nodes_with_grace(time.time()),
            private_key=self.private_key, mtu=self.state.mtu, cluster=self.config.cluster))
        self.state.mesh = mesh
        base = self._base_ruleset()
        egress = self.egress_kernel(own)
        try:
            self._slot_numbers_seen = egress.slot_numbers()
        except Exception as exc:
            log.warning("reading the egress slot tables: %s", exc)
        steering = self._compute_steering(own)
        self.state.steering = steering
        ruleset = _with_steering(base, steering)
        # Order matters: the guard and egress tunnels first, then the marks that point
        # into them; peers, then routes into the mesh; what is obsolete last.
        if not self.state.first_apply_ok:
            ok &= self._step("nftables", lambda: apply_ruleset(self.nft, base))
        ok &= self._step("forwarding", host.ensure_ip_forwarding)
        ok &= self._step("egress", lambda: _Lines(egress.apply_adds(steering)))
        ok &= self._step("nftables", lambda: apply_ruleset(self.nft, ruleset))
        ok &= self._step("egress", lambda: _Lines(egress.apply_removes(steering)))
        ok &= self._step("wireguard", lambda: apply_device_tracked(
            self.wireguard, mesh.device, self._wg_tracked))
        ok &= self._step("routes", lambda: apply_routes(self.routes, mesh.routes,
                                                        self._routes_tracked))
        if self.prober is not None:
            self.prober.set_targets(steering.probe_targets)
        if ok and not self.state.first_apply_ok:
            self.state.first_apply_ok = True
        if self.state.first_apply_ok:
            ok &= self._step("publish", lambda: self._publish(own))
        self.metrics.observe_reconcile(time.monotonic() - started, ok)
        self.metrics.peers_expected = len(mesh.device.peers)
        self.metrics.skipped_nodes = dict(mesh.skipped)
        for tracked in (self._wg_tracked, self._routes_tracked):
            self.metrics.dataplane_reads[tracked.name] = tracked.full_reads
        return ok

    def next_resync_in(self) -> float:
        """Seconds until a tracked dataplane is due for its full read (the loop wakes by
        then even without events, so drift is repaired within one resync interval)."""
        return min(t.resync_in() for t in (self._wg_tracked, self._routes_tracked))

    def _step(self, op: str, action: Any) -> bool:
        try:
            plan = action()
        except Exception as exc:
            # Kernel and datastore errors are transient from here: count, log, retry.
            self.metrics.errors[op] = self.metrics.errors.get(op, 0) + 1
            log.warning("reconcile %s failed: %s", op, exc)
            log.debug("reconcile %s failed", op, exc_info=True)
            return False
        lines = plan.describe() if hasattr(plan, "describe") else []
        for line in lines:
            log.info("%s: %s", op, line)
        return True

    def _base_ruleset(self) -> Ruleset:
        return compute_ruleset(FirewallSpec(
            cluster_pod_cidrs=tuple(c for c in self.config.cluster.pod_cidrs
                                    if isinstance(c, ipaddress.IPv4Network)),
            service_cidrs=tuple(c for c in self.config.cluster.service_cidrs
                                if isinstance(c, ipaddress.IPv4Network))))

    def _local_pod_views(self) -> list[Any]:
        """This node's pods with their labels (from the cache, or as the CNI hook read
        them) and their addresses (from the CNI's own allocations: authoritative)."""
        cached = {(p["metadata"].get("namespace", ""), p["metadata"]["name"]): p
                  for p in self.pods.snapshot().values()}
        views = []
        for key, pod in self._local_pods.items():
            obj = cached.get(key) or self._hook_labels.get(key)
            base = pod_view(obj) if obj else pod_view(
                {"metadata": {"namespace": key[0], "name": key[1]}})
            views.append(dataclasses.replace(base, ip=pod.ip, node=self.config.node_name))
        return views

    def _compute_steering(self, own: NodeInfo) -> SteeringState:
        now = time.time()
        nodes = self._all_nodes()
        model = compute_egress(
            gateways=self.gateways.snapshot().values(),
            policies=self.policies.snapshot().values(),
            namespaces=namespace_labels(self.namespaces.snapshot().values()),
            pods=self._local_pod_views(),
            node_addresses=[n.internal_ip for n in nodes if n.internal_ip is not None],
            cluster=self.config.cluster)
        holders = {}
        for obj in self.leases.snapshot().values():
            holder = parse_slot_lease(obj, now)
            if holder is not None:
                holders[holder.slot] = holder
        # Numbers in use: the kernel's (last read) over those this agent last assigned.
        kept = dict(self.state.steering.numbers) if self.state.steering else {}
        for gw in model.gateways.values():
            for slot, _ in gw.slots:
                number = self._slot_numbers_seen.get(slot.node_interface)
                if number is not None:
                    kept[slot] = number
        assert self.state.mtu is not None
        return compute_steering(SteeringInputs(
            model=model, local_pods=tuple(self._local_pods.values()), holders=holders,
            healthy=self.prober.healthy() if self.prober else frozenset(),
            private_key=self.private_key, mtu=self.state.mtu,
            probe_source=probe_source(own.pod_cidrs[0]), kept_numbers=kept))

    def egress_kernel(self, own: NodeInfo) -> EgressKernel:
        if self._egress is None:
            self._egress = EgressKernel(self.wireguard, probe_source(own.pod_cidrs[0]))
        return self._egress

    # -- failover fast path --------------------------------------------------------------

    def _on_health_change(self) -> None:
        self._health_changed.set()
        self._poke.set()

    def reconcile_health(self) -> bool:
        """A slot's health changed: move its buckets now, by the nftables step alone.

        Health moves marks between slots whose tunnels, tables and rules already exist,
        so nothing else needs to change first; the full pass that follows checks the rest.
        Skipping the other steps (each reads the kernel) is what keeps failover short."""
        started = time.monotonic()
        with self._reconcile_lock:
            own = self._own_node()
            if own is None or not own.pod_cidrs or self.state.mtu is None:
                return False
            steering = self._compute_steering(own)
            base = self._base_ruleset()
            ok = self._step("nftables", lambda: apply_ruleset(
                self.nft, _with_steering(base, steering)))
            if ok:
                self.state.steering = steering
        log.info("slot health changed: buckets moved in %.0f ms",
                 (time.monotonic() - started) * 1000)
        return ok

    # -- CNI hooks: run before the pod's ADD answers ------------------------------------

    def on_pod_ready(self, attachment: PodAttachment) -> None:
        """Program the pod's egress steering before the runtime hears back, so its first
        packet already takes the right path. Raising fails the ADD (the runtime retries)."""
        if not attachment.namespace or not attachment.name:
            return
        key = (attachment.namespace, attachment.name)
        try:
            # Fresh from the store: the cache may not have seen the Pod yet.
            self._hook_labels[key] = self.store.get(Kind.POD, attachment.name,
                                                    attachment.namespace)
        except NotFound:
            self._hook_labels.pop(key, None)
        self._local_pods[key] = LocalPod(attachment.namespace, attachment.name, attachment.ip)
        with self._reconcile_lock:
            own = self._own_node()
            if own is None or not own.pod_cidrs or self.state.mtu is None:
                raise RuntimeError("the agent does not know this node's pod CIDR yet")
            steering = self._compute_steering(own)
            if not any(attachment.ip in s.elements for s in steering.sets
                       if s.name.endswith("_pods")):
                self._poke.set()  # not selected by any policy: nothing to wait for
                return
            # Selected: program its marks now (the tunnels and tables already exist).
            base = self._base_ruleset()
            apply_ruleset(self.nft, _with_steering(base, steering))
            self.state.steering = steering
        self._poke.set()

    def on_pod_removed(self, attachment: PodAttachment) -> None:
        if attachment.namespace and attachment.name:
            key = (attachment.namespace, attachment.name)
            self._local_pods.pop(key, None)
            self._hook_labels.pop(key, None)
            self._poke.set()

    def _load_local_pods(self, pod_cidr: ipaddress.IPv4Network) -> None:
        ipam = Ipam(pod_cidr, self.config.state_dir / "cni" / "ipam")
        try:
            for allocation in ipam.allocations():
                if allocation.namespace and allocation.name:
                    key = (allocation.namespace, allocation.name)
                    self._local_pods[key] = LocalPod(key[0], key[1], allocation.ip)
        finally:
            ipam.close()

    def _publish(self, own: NodeInfo) -> None:
        """Publish this node's key and endpoint on its Node (only when they differ)."""
        assert own.internal_ip is not None
        wanted = compute_node_annotations(self.public_key, str(own.internal_ip), WIREGUARD_PORT)
        obj = self.nodes.snapshot().get(("", self.config.node_name)) or {}
        current = (obj.get("metadata") or {}).get("annotations") or {}
        if any(current.get(k) != v for k, v in wanted.items()):
            self.store.patch_annotations(Kind.NODE, self.config.node_name, wanted)
            log.info("published public key %s and endpoint %s", self.public_key,
                     wanted["meshgress.io/wireguard-endpoint"])
        self.state.published = True

    # -- adapters (created lazily, in the agent's own network namespace) -------------

    @property
    def wireguard(self) -> WireGuardBackend:
        if self._wireguard is None:
            self._wireguard = detect_backend(self.config.wireguard_backend,
                                             log_path=self.config.wireguard_log,
                                             log_level=self.config.wireguard_log_level)
            log.info("WireGuard backend: %s", self._wireguard.kind)
        return self._wireguard

    @property
    def routes(self) -> NetlinkRoutes:
        if self._routes is None:
            self._routes = NetlinkRoutes()
        return self._routes

    @property
    def nft(self) -> NftablesAdapter:
        if self._nft is None:
            self._nft = NftablesAdapter()
        return self._nft

    # -- threads --------------------------------------------------------------------

    def _serve_cni(self) -> None:
        own = self._own_node()
        assert own is not None and own.pod_cidrs
        service = CniService(own.pod_cidrs[0], self.config.state_dir / "cni",
                             pod_ready_hook=self.on_pod_ready,
                             pod_removed_hook=self.on_pod_removed, mtu=self.state.mtu)
        self.cni_ready.set()
        try:
            serve_cni(self.config.cni_socket, service, self.stop)
        except Exception:
            log.exception("CNI server stopped")
            self.cni_ready.clear()
            self.stop.set()

    def health(self) -> dict[str, bool]:
        alive = time.monotonic() - self.state.last_loop < 3 * self.config.resync_interval + 5
        ready = (self.synced() and self.state.first_apply_ok
                 and self.state.published and self.cni_ready.is_set())
        return {"live": alive, "ready": ready}

    def collect_metrics(self) -> str:
        try:
            counters = self.nft.counters()
        except Exception as exc:
            log.debug("reading nftables counters: %s", exc)
            counters = {}
        try:
            stats = self.wireguard.stats(WIREGUARD_INTERFACE)
        except Exception as exc:
            log.debug("reading WireGuard stats: %s", exc)
            stats = ()
        names = dict(self.state.mesh.peer_names) if self.state.mesh else {}
        return self.metrics.render(counters=counters, peer_stats=stats, peer_names=names,
                                   now=time.time(), slots=self._slot_samples(counters),
                                   selected_pods=dict(self.state.steering.selected_pods)
                                   if self.state.steering else {},
                                   policy_flows={
                                       name: counters.get(policy_flows_counter(name), (0, 0))[0]
                                       for name in (self.state.steering.selected_pods
                                                    if self.state.steering else {})})

    def _slot_samples(self, counters: dict[str, tuple[int, int]]) -> list[SlotSample]:
        steering = self.state.steering
        if steering is None or self.prober is None:
            return []
        probes = self.prober.stats()
        samples = []
        for slot, number in sorted(steering.numbers.items()):
            probe = probes.get(slot)
            if probe is None:
                continue  # no holder: no tunnel here
            try:
                tunnel = self.wireguard.stats(slot.node_interface)
            except Exception as exc:
                log.debug("reading WireGuard stats of %s: %s", slot.node_interface, exc)
                tunnel = ()
            samples.append(SlotSample(
                gateway=slot.gateway, index=slot.index, healthy=bool(probe["healthy"]),
                probes_sent=int(probe["sent"]), probes_answered=int(probe["answered"]),
                failovers=int(probe["failures"]),
                flows=counters.get(slot_flows_counter(number), (0, 0))[0],
                tx_bytes=sum(p.tx_bytes for p in tunnel),
                rx_bytes=sum(p.rx_bytes for p in tunnel)))
        return samples

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    def run(self) -> int:
        for informer in self.informers:
            informer.start()
        if self.config.metrics_address:
            serve_metrics(self.config.metrics_address, self.collect_metrics, self.health,
                          self.stop)
        cni_thread: threading.Thread | None = None
        try:
            while not self.stop.is_set():
                self.state.last_loop = time.monotonic()
                self._poke.clear()
                own = self._own_node()
                if self.prober is None and own is not None and own.pod_cidrs:
                    self._load_local_pods(own.pod_cidrs[0])
                    self.prober = SlotProber(str(probe_source(own.pod_cidrs[0])),
                                             self._on_health_change).start()
                if self._health_changed.is_set() and self.state.first_apply_ok:
                    self._health_changed.clear()
                    self.reconcile_health()
                ok = self.synced() and self.reconcile()
                if ok and cni_thread is None:
                    # The guard, the fallback and the mesh are in place: pods may come.
                    cni_thread = threading.Thread(target=self._serve_cni, name="cni",
                                                  daemon=True)
                    cni_thread.start()
                wait = (min(self.config.resync_interval, max(self.next_resync_in(), 0.0))
                        if ok else self.config.retry_interval)
                self._poke.wait(wait)
        finally:
            self.stop.set()
            if cni_thread is not None:
                cni_thread.join(timeout=10)
            if self.prober is not None:
                self.prober.stop()
            for informer in self.informers:
                informer.stop()
        return 0


def _with_steering(base: Ruleset, steering: SteeringState) -> Ruleset:
    """The node's whole table: the guard and masquerade, plus the egress steering."""
    return Ruleset(sets=base.sets + steering.sets, counters=base.counters + steering.counters,
                   chains=base.chains + steering.chains,
                   pruned_counters=(POLICY_COUNTER_PREFIX,))


def main(args: argparse.Namespace) -> int:
    cluster = load_cluster_config(args.cluster_config) if args.cluster_config \
        else DEFAULT_CLUSTER_CONFIG
    config = AgentConfig(
        node_name=args.node, datastore_dir=args.datastore, cluster=cluster,
        state_dir=args.state_dir, cni_socket=args.cni_socket,
        wireguard_backend=args.wireguard_backend, wireguard_log=args.wireguard_log,
        wireguard_log_level=args.wireguard_log_level, mtu=args.mtu,
        metrics_address=args.metrics_address or None, resync_interval=args.resync_interval,
        node_grace=args.node_grace)
    try:
        store = FileDatastore(config.datastore_dir)
    except (OSError, DatastoreError) as exc:
        raise AgentError(f"cannot open the datastore at {config.datastore_dir}: {exc}") from exc
    agent = Agent(config, store)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("meshgress agent on node %s, public key %s", config.node_name, agent.public_key)
    try:
        return agent.run()
    finally:
        store.close()
