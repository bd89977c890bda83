"""`meshgress agent`: the node agent process, one per node.

Level-triggered, on the shared reconcile runtime (`meshgress.runtime`):
1. informers fill caches (no kernel I/O there) and poke the loop;
2. `compute_mesh`, `compute_ruleset` and `compute_steering` turn the caches into this
   node's desired state, purely;
3. the managers (`nodeagent.managers`) plan it against the kernel and apply it — the mesh
   against the kernel as last read plus the writes made since (read in full at start, on
   every resync and after any error: `nodeagent.tracker`), the firewall and steering
   against a fresh read;
4. adds come before removals, failed steps are retried with backoff, and the periodic
   resync repairs drift.

Start-up order is what makes the node fail closed: the `inet meshgress` table (leak guard
and masquerade) and the unreachable fallback for the cluster pod range are programmed
before the CNI server accepts its first pod, and the WireGuard device has its peers before
this node publishes its public key — so a peer that learns the key can handshake at once.

A restart adopts what it finds: nothing is flushed, wireguard-go keeps running (it lives in
its own session), and only differences are applied. Stopping (SIGTERM) leaves the
dataplane in place, so traffic flows while the agent is away.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meshgress import prometheus
from meshgress.binaries import WIREGUARD_GO_ON_PATH, describe_wireguard_go
from meshgress.cluster import NodeInfo, NodeParseCache, node_annotations, parse_slot_holder
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig
from meshgress.datastore import Datastore, Kind, NotFound
from meshgress.egress import PodView, compute_egress, namespace_labels, pod_view
from meshgress.kernel.nft_model import NftPlan, Ruleset
from meshgress.kernel.nftables import NftablesAdapter, NftablesPort
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE, WIREGUARD_INTERFACE, WIREGUARD_PORT
from meshgress.runtime import LoopMetrics, Pass, ReconcileLoop
from meshgress.slots import MAX_SLOTS, SlotId, probe_source
from nodeagent.firewall import (
    FirewallSpec,
    compute_node_networks,
    compute_ruleset,
    with_steering,
)
from nodeagent.host import HostPort, NodeHost
from nodeagent.managers import FirewallManager, MeshManager, SteeringManager
from nodeagent.mesh import MeshInputs, MeshState, compute_mesh
from nodeagent.metrics import AgentMetrics, SlotSample
from nodeagent.options import DEFAULT_ENDPOINT_PORTS, DEFAULT_METRICS_ADDRESS, DEFAULT_STATE_DIR
from nodeagent.prober import SlotProber
from nodeagent.routes import NetlinkRoutes, RouteAdapter
from nodeagent.steering import (
    LocalPod,
    SteeringInputs,
    SteeringState,
    compute_steering,
    policy_flows_counter,
    slot_flows_counter,
)
from nodeagent.steering_kernel import NetlinkSteering, SteeringPort
from wireguard.backend import WireGuardBackend, detect_backend
from wireguard.keys import load_or_create_private_key, public_key
from wireguard.model import tunnel_mtu

log = logging.getLogger("meshgress.agent")

PodHook = Callable[[LocalPod], None]
ProberFactory = Callable[[str, Callable[[], None]], SlotProber]
"""Starts probing egress slots from a source address, calling back on health changes."""


class PodNetwork(Protocol):
    """The CNI plugin's server half, which the agent hosts: it wires pods into this node's
    pod CIDR and tells the agent about each one before the pod's ADD answers (so a pod's
    steering is in place before its first packet). Joined to the agent by the process
    that assembles it (`meshgress.assembly`): the agent never imports the CNI code."""

    def local_pods(self, pod_cidr: ipaddress.IPv4Network) -> list[LocalPod]:
        """The pods wired on this node before this process started."""
        ...

    def serve(self, pod_cidr: ipaddress.IPv4Network, mtu: int, *, on_ready: PodHook,
              on_removed: PodHook, stop: threading.Event,
              on_listening: Callable[[], None]) -> None:
        """Accept CNI requests until `stop` is set. `on_ready` raising fails that ADD.
        `on_listening` runs once requests are accepted and every DEL queued while the
        agent was away has been run (or has failed and stays queued)."""
        ...

    def render_metrics(self, page: prometheus.Exposition) -> None:
        """Its own metrics, for the agent's scrape."""
        ...


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    cluster: ClusterConfig = DEFAULT_CLUSTER_CONFIG
    state_dir: Path = DEFAULT_STATE_DIR
    wireguard_backend: str | None = None
    wireguard_log: Path | None = None
    wireguard_log_level: str | None = None
    wireguard_go: str = WIREGUARD_GO_ON_PATH
    """The wireguard-go program (userspace backend)."""
    mtu: int | None = None
    metrics_address: str | None = DEFAULT_METRICS_ADDRESS
    resync_interval: float = 10.0
    retry_interval: float = 1.0
    node_grace: float = 30.0
    """How long a node that vanished from the datastore keeps its peer and routes (a
    re-list or a brief datastore hiccup must not tear the mesh down)."""
    endpoint_ports: tuple[int, ...] = DEFAULT_ENDPOINT_PORTS
    """meshgress's endpoint ports on every node, guarded by the node's table (the agent's
    own metrics ports are added)."""
    metrics_allow_from: tuple[ipaddress.IPv4Network, ...] = ()
    metrics_allow_namespaces: tuple[str, ...] = ()

    @property
    def guarded_ports(self) -> tuple[int, ...]:
        own = prometheus.parse_listen_addresses(self.metrics_address or "")
        if not self.endpoint_ports:
            return ()
        return tuple(sorted(set(self.endpoint_ports) | {a.port for a in own}))


@dataclass
class AgentPorts:
    """Everything the agent touches outside itself. `real` builds the kernel's, in the
    calling thread's network namespace; tests pass fakes."""

    wireguard: WireGuardBackend
    routes: RouteAdapter
    nft: NftablesPort
    steering: SteeringPort
    host: HostPort
    pods: PodNetwork
    prober: ProberFactory = SlotProber

    @classmethod
    def real(cls, config: AgentConfig, pods: PodNetwork) -> AgentPorts:
        wireguard = detect_backend(config.wireguard_backend, log_path=config.wireguard_log,
                                   log_level=config.wireguard_log_level,
                                   wireguard_go=config.wireguard_go)
        log.info("WireGuard backend: %s%s", wireguard.kind,
                 f" ({describe_wireguard_go(config.wireguard_go)})"
                 if wireguard.kind == "userspace" else "")
        return cls(wireguard=wireguard, routes=NetlinkRoutes(),
                   nft=NftablesAdapter(NFT_FAMILY, NFT_TABLE), steering=NetlinkSteering(),
                   host=NodeHost(), pods=pods)


@dataclass
class _Seen:
    info: NodeInfo
    at: float


@dataclass
class AgentState:
    """What the agent remembers about the cluster (never about the kernel)."""

    last_seen: dict[str, _Seen] = field(default_factory=dict)
    mesh: MeshState | None = None
    steering: SteeringState | None = None
    mtu: int | None = None
    node_addresses: frozenset[int] = frozenset()
    """Every node's IPv4 InternalIP (this one's too), as of the last pass..."""
    node_networks: tuple[ipaddress.IPv4Network, ...] = ()
    """... merged into networks (recomputed only when they change)."""
    published: bool = False
    first_apply_ok: bool = False
    waiting_for_node: bool = False
    over_slot_limit: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Gateway → its egress IPs that get no slot, as last logged."""


class Agent:
    def __init__(self, config: AgentConfig, store: Datastore, ports: AgentPorts) -> None:
        self.config = config
        self.store = store
        self.ports = ports
        self.loop = ReconcileLoop(
            store, {Kind.NODE: None, Kind.POD: config.node_name, Kind.NAMESPACE: None,
                    Kind.EGRESS_GATEWAY: None, Kind.EGRESS_POLICY: None, Kind.LEASE: None},
            log=log, metrics=LoopMetrics("meshgress_", "meshgress_reconcile_errors_total"),
            resync_interval=config.resync_interval, retry_interval=config.retry_interval)
        self.stop = self.loop.stop
        key_path = config.state_dir / "wireguard" / "private.key"
        self.private_key = load_or_create_private_key(key_path)
        self.public_key = public_key(self.private_key)
        self.mesh = MeshManager(ports.wireguard, ports.routes,
                                resync_interval=config.resync_interval,
                                own_public_key=self.public_key)
        self.firewall = FirewallManager(ports.nft)
        self.steering = SteeringManager(ports.steering, ports.wireguard)
        # Serialises passes: the loop's and the CNI hook's (a pod's steering must be in
        # place before its ADD returns). Guards the pod maps below too.
        self._reconcile_lock = threading.Lock()
        self._local_pods: dict[tuple[str, str], LocalPod] = {}
        self._hook_labels: dict[tuple[str, str], dict[str, Any]] = {}
        self._health_changed = threading.Event()
        self.prober: SlotProber | None = None
        self.state = AgentState()
        self.metrics = AgentMetrics(started_at=time.time())
        self._node_cache = NodeParseCache()
        self._guarded_ports = config.guarded_ports
        self._base: tuple[tuple[Any, ...], Ruleset] | None = None
        self.cni_ready = threading.Event()
        self._cni_thread: threading.Thread | None = None

    # -- caches ---------------------------------------------------------------------

    def _own_node(self) -> NodeInfo | None:
        obj = self.loop.snapshot(Kind.NODE).get(("", self.config.node_name))
        return self._node_cache.parse(obj) if obj else None

    def _all_nodes(self) -> list[NodeInfo]:
        """Every cached Node, parsed (only those that changed since the last pass are)."""
        return self._node_cache.parse_all(self.loop.snapshot(Kind.NODE).values())

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

    def _usable_own_node(self) -> NodeInfo | None:
        own = self._own_node()
        if own is None or not own.pod_cidrs or own.internal_ip is None:
            if not self.state.waiting_for_node:
                log.warning("node %s: waiting for its Node object with spec.podCIDRs and "
                            "an InternalIP", self.config.node_name)
            self.state.waiting_for_node = True
            return None
        self.state.waiting_for_node = False
        return own

    # -- one pass ---------------------------------------------------------------------

    def reconcile(self) -> Pass:
        """One pass: compute, plan against the kernel, apply."""
        with self._reconcile_lock:
            return self._reconcile()

    def _reconcile(self) -> Pass:
        own = self._usable_own_node()
        if own is None or self.prober is None:
            # The prober starts once the pods wired before this process are loaded
            # (`_before_pass`): a pass without them would drop their steering.
            return Pass(ran=False)
        step = self.loop.step
        self.loop.serve_on_node_ip(own.internal_ip)
        if self.state.mtu is None:
            assert own.internal_ip is not None
            self.state.mtu = self.config.mtu or tunnel_mtu(
                self.ports.host.underlay_mtu(str(own.internal_ip)), own.internal_ip.version == 6)
        nodes = self._nodes_with_grace(time.time())
        addresses = frozenset(int(n.internal_ip) for n in nodes
                              if isinstance(n.internal_ip, ipaddress.IPv4Address))
        if addresses != self.state.node_addresses:
            self.state.node_addresses = addresses
            self.state.node_networks = compute_node_networks(
                ipaddress.IPv4Address(a) for a in addresses)
        mesh = compute_mesh(MeshInputs(
            self_name=self.config.node_name, nodes=nodes,
            private_key=self.private_key, mtu=self.state.mtu, cluster=self.config.cluster))
        self.state.mesh = mesh
        source = probe_source(own.pod_cidrs[0])
        base = self._base_ruleset()
        ok = step("egress-read", lambda: self.steering.read(source))
        # Steering that cannot be computed (a bug: bad input becomes status) fails its
        # step, so the pass is retried, and holds up nothing else: the last steering
        # computed stays applied (before the first one, the kernel's steering is left as
        # it is) and the mesh, routes, publishing and CNI server go ahead. Pods' ADDs fail
        # meanwhile (`on_pod_ready`), so no new pod leaves unsteered.
        computed = self._try_compute_steering(own)
        if computed is not None:
            self.state.steering = computed
        steering = self.state.steering
        # Order matters: the guard and fallback first of all; then the egress tunnels,
        # then the marks that point into them; peers, then routes into the mesh; what is
        # obsolete last.
        if not self.state.first_apply_ok:
            ok &= step("nftables", lambda: self._ensure_guard(base))
        ok &= step("forwarding", self.ports.host.ensure_ip_forwarding)
        if steering is not None:
            plan = self.steering.plan(steering)
            ok &= step("egress", lambda: self.steering.apply_adds(plan, source))
            ok &= step("nftables", lambda: self.firewall.apply(
                with_steering(base, steering)))
            ok &= step("egress", lambda: self.steering.apply_removes(plan))
        ok &= step("wireguard", lambda: self.mesh.apply_device(mesh.device))
        ok &= step("handshakes", lambda: self.mesh.kick_handshakes(mesh.device.name))
        ok &= step("routes", lambda: self.mesh.apply_routes(self.mesh.routes(mesh)))
        if self.prober is not None and steering is not None:
            self.prober.set_targets(steering.probe_targets)
        if ok and not self.state.first_apply_ok:
            self.state.first_apply_ok = True
            self._start_cni(own)
        if self.state.first_apply_ok:
            ok &= step("publish", lambda: self._publish(own))
        self.metrics.peers_expected = len(mesh.device.peers)
        self.metrics.skipped_nodes = dict(mesh.skipped)
        self.metrics.dataplane_reads = self.mesh.full_reads()
        return Pass(wake_in=self.mesh.resync_in())

    def _ensure_guard(self, base: Ruleset) -> NftPlan | None:
        """On a node's first start, the guard and masquerade before anything else. A
        restart finds its table in place, guard included: it is left as it is, because
        cutting it back to the bare guard would take the previous run's egress steering
        out until this pass puts it back, and new flows of selected pods would leave with
        the node's address meanwhile."""
        if self.ports.nft.read() is not None:
            return None
        return self.firewall.apply(base)

    def _base_ruleset(self) -> Ruleset:
        """The table without steering. Computed again only when the nodes or the allowed
        pods changed: the failover fast path and a pod's ADD call it too, and at 5,000
        nodes checking the node set alone costs tens of milliseconds."""
        allowed = set(self.config.metrics_allow_namespaces)
        pods = tuple(sorted(pod.ip for pod in self._local_pods.values()
                            if pod.namespace in allowed))
        key = (self.state.node_networks, pods)
        if self._base is not None and self._base[0] == key:
            return self._base[1]
        ruleset = compute_ruleset(FirewallSpec(
            cluster_pod_cidrs=tuple(c for c in self.config.cluster.pod_cidrs
                                    if isinstance(c, ipaddress.IPv4Network)),
            service_cidrs=tuple(c for c in self.config.cluster.service_cidrs
                                if isinstance(c, ipaddress.IPv4Network)),
            endpoint_ports=self._guarded_ports,
            node_networks=self.state.node_networks,
            endpoint_allowed_sources=self.config.metrics_allow_from,
            endpoint_allowed_pods=pods))
        self._base = (key, ruleset)
        return ruleset

    def _local_pod_views(self) -> list[PodView]:
        """This node's pods with their labels (from the cache, or as the CNI hook read
        them) and their addresses (from the CNI's own allocations: authoritative)."""
        cached = {(p["metadata"].get("namespace", ""), p["metadata"]["name"]): p
                  for p in self.loop.snapshot(Kind.POD).values()}
        views = []
        for key, pod in self._local_pods.items():
            obj = cached.get(key) or self._hook_labels.get(key)
            base = pod_view(obj) if obj else pod_view(
                {"metadata": {"namespace": key[0], "name": key[1]}})
            views.append(dataclasses.replace(base, ip=pod.ip, node=self.config.node_name))
        return views

    def _try_compute_steering(self, own: NodeInfo) -> SteeringState | None:
        """`_compute_steering` as a step of the pass: None when it failed (reported)."""
        computed: list[SteeringState] = []
        if self.loop.step("steering", lambda: computed.append(self._compute_steering(own))):
            return computed[0]
        return None

    def _compute_steering(self, own: NodeInfo) -> SteeringState:
        now = time.time()
        nodes = self._all_nodes()
        model = compute_egress(
            gateways=self.loop.snapshot(Kind.EGRESS_GATEWAY).values(),
            policies=self.loop.snapshot(Kind.EGRESS_POLICY).values(),
            namespaces=namespace_labels(self.loop.snapshot(Kind.NAMESPACE).values()),
            pods=self._local_pod_views(),
            node_addresses=[n.internal_ip for n in nodes if n.internal_ip is not None],
            cluster=self.config.cluster)
        self._report_slot_limit(model.over_slot_limit())
        holders = {}
        for obj in self.loop.snapshot(Kind.LEASE).values():
            holder = parse_slot_holder(obj, now)
            if holder is not None:
                holders[holder.slot] = holder
        # Numbers in use: the kernel's (last read) over those this agent last assigned.
        kept: dict[SlotId, int] = dict(self.state.steering.numbers) if self.state.steering \
            else {}
        in_kernel = self.steering.observed.slot_numbers()
        for gw in model.gateways.values():
            for slot, _ in gw.slots:
                number = in_kernel.get(slot.node_interface)
                if number is not None:
                    kept[slot] = number
        assert self.state.mtu is not None
        return compute_steering(SteeringInputs(
            model=model, local_pods=tuple(self._local_pods.values()), holders=holders,
            healthy=self.prober.healthy() if self.prober else frozenset(),
            private_key=self.private_key, mtu=self.state.mtu,
            probe_source=probe_source(own.pod_cidrs[0]), kept_numbers=kept,
            node_name=self.config.node_name))

    def _report_slot_limit(self, over: dict[str, tuple[str, ...]]) -> None:
        """Log the egress IPs that get no slot when they change, not on every pass (the
        gateways' status says it too)."""
        if over == self.state.over_slot_limit:
            return
        if over:
            log.warning("%d egress IPs get no slot, so no traffic is steered to them: at "
                        "most %d are served across all EgressGateways (the gateways "
                        "created first keep theirs): %s", sum(map(len, over.values())),
                        MAX_SLOTS, "; ".join(f"EgressGateway {name}: {', '.join(ips)}"
                                             for name, ips in over.items()))
        else:
            log.info("every egress IP has a slot again")
        self.state.over_slot_limit = over

    def _publish(self, own: NodeInfo) -> None:
        """Publish this node's key and endpoint on its Node (only when they differ)."""
        assert own.internal_ip is not None
        wanted = node_annotations(self.public_key, own.internal_ip, WIREGUARD_PORT)
        obj = self.loop.snapshot(Kind.NODE).get(("", self.config.node_name)) or {}
        current = (obj.get("metadata") or {}).get("annotations") or {}
        if any(current.get(k) != v for k, v in wanted.items()):
            self.store.patch_annotations(Kind.NODE, self.config.node_name, wanted)
            log.info("published public key %s and endpoint %s", self.public_key,
                     wanted["meshgress.io/wireguard-endpoint"])
        self.state.published = True

    # -- failover fast path ------------------------------------------------------------

    def _on_health_change(self) -> None:
        self._health_changed.set()
        self.loop.poke()

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
            steering = self._try_compute_steering(own)
            if steering is None:
                return False
            ok = self.loop.step("nftables", lambda: self.firewall.apply(
                with_steering(self._base_ruleset(), steering)))
            if ok:
                self.state.steering = steering
        log.info("slot health changed: buckets moved in %.0f ms",
                 (time.monotonic() - started) * 1000)
        return ok

    def _before_pass(self) -> None:
        own = self._own_node()
        if self.prober is None and own is not None and own.pod_cidrs:
            self._load_local_pods(own.pod_cidrs[0])
            self.prober = self.ports.prober(str(probe_source(own.pod_cidrs[0])),
                                            self._on_health_change).start()
        if self._health_changed.is_set() and self.state.first_apply_ok:
            self._health_changed.clear()
            self.reconcile_health()

    # -- CNI hooks: run before the pod's ADD answers ------------------------------------

    def on_pod_ready(self, pod: LocalPod) -> None:
        """Program the pod's egress steering before the runtime hears back, so its first
        packet already takes the right path. Raising fails the ADD (the runtime retries)."""
        if not pod.namespace or not pod.name:
            return
        key = (pod.namespace, pod.name)
        try:
            # Fresh from the store: the cache may not have seen the Pod yet.
            labels: dict[str, Any] | None = self.store.get(Kind.POD, pod.name, pod.namespace)
        except NotFound:
            labels = None
        with self._reconcile_lock:
            if labels is None:
                self._hook_labels.pop(key, None)
            else:
                self._hook_labels[key] = labels
            self._local_pods[key] = pod
            own = self._own_node()
            if own is None or not own.pod_cidrs or self.state.mtu is None:
                raise RuntimeError("the agent does not know this node's pod CIDR yet")
            if self.state.steering is None:
                # The pass has not set the node's steering up (its drop rule included):
                # marks set here could lead nowhere.
                raise RuntimeError("this node's egress steering is not computed yet")
            steering = self._compute_steering(own)
            if pod.ip in steering.steered_ips:
                # Selected: program its marks now (the tunnels and tables already exist).
                self.firewall.apply(with_steering(self._base_ruleset(), steering))
                self.state.steering = steering
        self.loop.poke()

    def on_pod_removed(self, pod: LocalPod) -> None:
        if pod.namespace and pod.name:
            key = (pod.namespace, pod.name)
            with self._reconcile_lock:
                self._local_pods.pop(key, None)
                self._hook_labels.pop(key, None)
            self.loop.poke()

    def _load_local_pods(self, pod_cidr: ipaddress.IPv4Network) -> None:
        pods = self.ports.pods.local_pods(pod_cidr)
        with self._reconcile_lock:
            for pod in pods:
                if pod.namespace and pod.name:
                    self._local_pods[(pod.namespace, pod.name)] = pod

    def _start_cni(self, own: NodeInfo) -> None:
        """The guard, the fallback and the mesh are in place: pods may come."""
        assert self.state.mtu is not None
        pod_cidr, mtu = own.pod_cidrs[0], self.state.mtu

        def serve() -> None:
            try:
                self.ports.pods.serve(pod_cidr, mtu, on_ready=self.on_pod_ready,
                                      on_removed=self.on_pod_removed, stop=self.stop,
                                      on_listening=self.cni_ready.set)
            except Exception:
                log.exception("CNI server stopped")
                self.cni_ready.clear()
                self.stop.set()
                self.loop.poke()

        self._cni_thread = threading.Thread(target=serve, name="cni", daemon=True)
        self._cni_thread.start()

    # -- health and metrics --------------------------------------------------------------

    def ready(self) -> bool:
        return (self.loop.synced() and self.state.first_apply_ok and self.state.published
                and self.cni_ready.is_set() and self.state.steering is not None)

    def health(self) -> dict[str, bool]:
        return {"live": self.loop.live(), "ready": self.ready()}

    def render_metrics(self, page: prometheus.Exposition) -> None:
        try:
            counters = self.firewall.counters()
        except Exception as exc:  # a scrape must never fail on the kernel
            log.debug("reading nftables counters: %s", exc)
            counters = {}
        try:
            stats = self.ports.wireguard.stats(WIREGUARD_INTERFACE)
        except Exception as exc:
            log.debug("reading WireGuard stats: %s", exc)
            stats = ()
        steering = self.state.steering
        selected = dict(steering.selected_pods) if steering else {}
        self.metrics.render(page, counters=counters, peer_stats=stats,
                            peer_names=dict(self.state.mesh.peer_names) if self.state.mesh
                            else {},
                            now=time.time(), slots=self._slot_samples(counters),
                            selected_pods=selected,
                            policy_flows={name: counters.get(policy_flows_counter(name),
                                                             (0, 0))[0]
                                          for name in selected})
        self.ports.pods.render_metrics(page)

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
                tunnel = self.ports.wireguard.stats(slot.node_interface)
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

    # -- run ----------------------------------------------------------------------------

    def run(self) -> int:
        if self.config.metrics_address:
            self.loop.serve_metrics(self.config.metrics_address, self.render_metrics,
                                    self.ready)
        try:
            self.loop.run(self.reconcile, before_pass=self._before_pass)
        finally:
            if self._cni_thread is not None:
                self._cni_thread.join(timeout=10)
            if self.prober is not None:
                self.prober.stop()
        return 0
