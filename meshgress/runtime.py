"""The reconcile runtime shared by the node agent and the gateway.

Both processes are the same kind of program, in the shape the best agents of this field
share (Calico Felix, kopf):

1. informers fill caches from the datastore and only *poke* the loop (no kernel I/O in
   event handlers); a lease renewal (same holder, still valid: most writes of an idle
   cluster) updates the cache without a poke, since no pass would compute anything new
   from it. What depends on time (a lease expiring) is the component's to wake for
   (`Pass.wake_in`), or the resync's;
2. a pass computes the desired state from the caches and applies it step by step;
3. bursts of pokes are coalesced into one pass; a pass also runs every resync interval
   without events, and sooner when the component asks (`Pass.wake_in`);
4. every step goes through `ReconcileLoop.step`, which tells errors apart; a failure the
   component catches itself (because it changes what the rest of the pass does) is
   reported with `ReconcileLoop.note_failure` and counts as a temporary one:
   - a *permanent* one (`PermanentError`, or any exception whose `temporary` attribute is
     False, as the wireguard library marks bad key files and missing implementations):
     bad input or configuration that retrying cannot fix. It is reported (logged once per
     message, counted) and the loop does not hurry back: the next pass comes with the next
     change or resync;
   - any other is *temporary* (a kernel or datastore hiccup): logged, counted and retried
     with jittered exponential backoff, from `retry_interval` up to `resync_interval`;
5. `/metrics`, `/healthz` and `/readyz` are served from the loop's metrics and the
   component's own, on the listen addresses the component was given: fixed addresses at
   once, `node-ip` ones as soon as the component reports this node's InternalIP (from
   its Node object) and again whenever that changes; SIGTERM and SIGINT stop the loop
   (the component decides what stopping leaves in place);
6. an object the datastore cannot decode is skipped by its informer (one bad object
   never keeps a process from syncing) and counted in the
   `<prefix>datastore_rejected_objects{kind}` gauge.

Components keep their own state and passes; this module owns only the loop around them.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from types import FrameType
from typing import Any

from meshgress import prometheus
from meshgress.datastore import Datastore, Kind, Object, RejectedObject, is_lease_renewal
from meshgress.datastore.informer import Informer

RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class PermanentError(Exception):
    """Retrying cannot help until something changes (an object, a file, the node's setup).

    The message says what to fix; the loop reports it and waits for a change."""


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PermanentError) or getattr(exc, "temporary", None) is False


@dataclass(frozen=True)
class Pass:
    """What one pass tells the loop beyond its steps' outcomes."""

    ran: bool = True
    """False: the pass could not start (say, this node's Node object is not there yet);
    the loop retries as after a temporary failure."""
    wake_in: float | None = None
    """Seconds until the component wants another pass even without events."""


@dataclass
class LoopMetrics:
    """The loop's own figures, rendered under the component's metric names."""

    prefix: str
    """"meshgress_" for the agent, "meshgress_gateway_" for gateways."""
    errors_metric: str
    reconciles: int = 0
    failures: int = 0
    seconds_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(RECONCILE_BUCKETS))
    errors: dict[str, int] = field(default_factory=dict)
    permanent: dict[str, int] = field(default_factory=dict)
    rejected_objects: Callable[[], Mapping[str, int]] = dict
    """Kind → objects of it the datastore could not decode (read when rendered)."""

    def observe(self, seconds: float, ok: bool) -> None:
        self.reconciles += 1
        self.failures += not ok
        self.seconds_sum += seconds
        for i, bound in enumerate(RECONCILE_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    def count_error(self, op: str, permanent: bool = False) -> None:
        counts = self.permanent if permanent else self.errors
        counts[op] = counts.get(op, 0) + 1

    def render(self, page: prometheus.Exposition) -> None:
        page.metric(f"{self.prefix}reconcile_total", "counter", "Reconcile passes.",
                    [("", self.reconciles)])
        page.metric(f"{self.prefix}reconcile_failures_total", "counter",
                    "Reconcile passes where some step failed.", [("", self.failures)])
        page.histogram(f"{self.prefix}reconcile_duration_seconds", "Time of one reconcile pass.",
                       list(zip(RECONCILE_BUCKETS, self.buckets, strict=True)),
                       self.reconciles, self.seconds_sum)
        page.metric(self.errors_metric, "counter",
                    "Failed steps by operation (transient: retried with backoff).",
                    [(prometheus.labels(op=op), n) for op, n in sorted(self.errors.items())])
        page.metric(f"{self.prefix}permanent_errors_total", "counter",
                    "Steps that failed on input or configuration retrying cannot fix, by "
                    "operation (reported; retried only after a change).",
                    [(prometheus.labels(op=op), n) for op, n in sorted(self.permanent.items())])
        page.metric(f"{self.prefix}datastore_rejected_objects", "gauge",
                    "Objects the datastore could not decode, by kind: skipped (the rest is "
                    "synced) until they are fixed.",
                    [(prometheus.labels(kind=kind), n)
                     for kind, n in sorted(self.rejected_objects().items())])


class ReconcileLoop:
    """Informers, poke and coalesce, steps, health, metrics server and signals."""

    def __init__(self, store: Datastore, kinds: Mapping[Kind, str | None], *,  # noqa: PLR0913
                 log: logging.Logger, metrics: LoopMetrics, resync_interval: float = 10.0,
                 retry_interval: float = 1.0, coalesce: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """`kinds`: each kind to watch, with the node name its objects are limited to
        (`spec.nodeName`, for pods) or None. `wall_clock` tells whether a lease had
        expired (leases carry wall-clock times)."""
        self.log = log
        self.metrics = metrics
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self.coalesce = coalesce
        self.clock = clock
        self.wall_clock = wall_clock
        self.stop = threading.Event()
        self._poke = threading.Event()
        self.informers = {kind: Informer(store, kind, on_change=self._poke.set,
                                         field_node_name=node,
                                         matters=self._not_a_renewal if kind is Kind.LEASE
                                         else None)
                          for kind, node in kinds.items()}
        metrics.rejected_objects = self.rejected_counts
        self.last_loop = clock()
        self._failures_in_pass = 0
        self._backoff = retry_interval
        self._reported: dict[str, str] = {}
        self._collect: Callable[[], str] | None = None
        self._health: prometheus.Health = lambda: {"live": self.live(), "ready": False}
        self._node_ip_ports: tuple[int, ...] = ()
        self._node_ip: str | None = None
        self._node_ip_servers: dict[int, ThreadingHTTPServer] = {}

    def _not_a_renewal(self, before: Object, after: Object) -> bool:
        return not is_lease_renewal(before, after, self.wall_clock())

    # -- caches ---------------------------------------------------------------------

    def snapshot(self, kind: Kind) -> dict[tuple[str, str], Any]:
        return self.informers[kind].snapshot()

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def poke(self) -> None:
        self._poke.set()

    def rejected(self) -> tuple[RejectedObject, ...]:
        """Every object the informers skipped because the datastore could not decode it."""
        return tuple(r for informer in self.informers.values() for r in informer.rejected())

    def rejected_counts(self) -> dict[str, int]:
        """Kind → rejected objects, with a 0 for every watched kind (so the gauge exists
        before anything goes wrong)."""
        return {kind.value: len(informer.rejected())
                for kind, informer in self.informers.items()}

    # -- steps ----------------------------------------------------------------------

    def step(self, op: str, action: Callable[[], Any]) -> bool:
        """Run one step of a pass; False when it failed (and was reported)."""
        try:
            result = action()
        except Exception as exc:
            if is_permanent(exc):
                self.metrics.count_error(op, permanent=True)
                if self._reported.get(op) != str(exc):
                    self.log.error("%s: %s", op, exc)
                self._reported[op] = str(exc)
            else:
                self.note_failure(op)
                self.log.warning("%s failed: %s", op, exc)
                self.log.debug("%s failed", op, exc_info=True)
            return False
        if self._reported.pop(op, None) is not None:
            self.log.info("%s: succeeds again", op)
        describe = getattr(result, "describe", None)
        if callable(describe):
            for line in describe():
                self.log.info("%s: %s", op, line)
        elif isinstance(result, list):
            for line in result:
                self.log.info("%s: %s", op, line)
        return True

    def note_failure(self, op: str) -> None:
        """A temporary failure of this pass that the component caught and logged itself
        (outside `step`, say where the error changes what the pass does next): counted
        under `op`, and the next pass comes after the retry backoff, as after a failed
        step."""
        self.metrics.count_error(op)
        self._failures_in_pass += 1

    # -- the loop -------------------------------------------------------------------

    def _next_wait(self, outcome: Pass) -> float:
        if self._failures_in_pass or not outcome.ran:
            wait = self._backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
            self._backoff = min(self._backoff * 2, self.resync_interval)
        else:
            wait = self.resync_interval
            self._backoff = self.retry_interval
        if outcome.wake_in is not None:
            wait = min(wait, max(outcome.wake_in, 0.0))
        return wait

    def run(self, one_pass: Callable[[], Pass], *,
            before_pass: Callable[[], None] | None = None) -> None:
        """Pass after pass until `stop` is set. `before_pass` runs first on every turn,
        synced or not (the agent's failover fast path); when it fails (a step of it, or
        an exception) the turn counts as failed and is retried with backoff, and the
        pass still runs."""
        for informer in self.informers.values():
            informer.start()
        try:
            while not self.stop.is_set():
                self.last_loop = self.clock()
                self._poke.clear()
                self._poke.wait(self.run_once(one_pass, before_pass))
                if self.coalesce:
                    self.stop.wait(self.coalesce)  # a burst of events becomes one pass
        finally:
            self.stop.set()
            self._poke.set()
            for informer in self.informers.values():
                informer.stop()

    def run_once(self, one_pass: Callable[[], Pass],
                 before_pass: Callable[[], None] | None = None) -> float:
        """`before_pass`, then one pass (once the caches are synced); the seconds until
        the next one unless something pokes the loop. Either raising is logged and counted
        and brings the next pass after the retry backoff."""
        outcome = Pass(ran=False)
        self._failures_in_pass = 0
        if before_pass is not None:
            try:
                before_pass()
            except Exception:
                self.note_failure("before-pass")
                self.log.exception("before-pass failed")
        if self.synced():
            started = self.clock()
            try:
                outcome = one_pass()
            except Exception:
                # A bug, not bad input (that becomes status): log it, retry.
                self.metrics.count_error("reconcile")
                self.log.exception("reconcile failed")
                self._failures_in_pass += 1
                outcome = Pass()
            self.metrics.observe(self.clock() - started,
                                 outcome.ran and not self._failures_in_pass)
        return self._next_wait(outcome)

    def live(self) -> bool:
        return self.clock() - self.last_loop < 3 * self.resync_interval + 5

    # -- serving --------------------------------------------------------------------

    def serve_metrics(self, addresses: str,
                      render: Callable[[prometheus.Exposition], None],
                      ready: Callable[[], bool]) -> None:
        """/metrics (the loop's figures, then the component's), /healthz, /readyz on every
        address of `addresses` ("HOST:PORT,..."; see `prometheus.parse_listen_addresses`).
        Fixed addresses listen now (OSError if one cannot); `node-ip` ones once
        `serve_on_node_ip` names the address. ValueError for a malformed list."""
        listen = prometheus.parse_listen_addresses(addresses)

        def collect() -> str:
            page = prometheus.Exposition()
            self.metrics.render(page)
            render(page)
            return page.render()

        self._collect = collect
        self._health = lambda: {"live": self.live(), "ready": ready()}
        for address in listen:
            if address.host != prometheus.NODE_IP:
                prometheus.serve(str(address), collect, self._health, self.stop)
                self.log.info("serving /metrics, /healthz, /readyz on %s", address)
        self._node_ip_ports = tuple(a.port for a in listen if a.host == prometheus.NODE_IP)

    def serve_on_node_ip(self, node_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
                         ) -> None:
        """This node's InternalIP, as its Node object says now (None: not known yet): the
        `node-ip` listeners move there. Cheap when nothing changed; a listener that could
        not bind is tried again on the next call."""
        if not self._node_ip_ports or node_ip is None or self._collect is None:
            return
        host = str(node_ip)
        if host != self._node_ip:
            for server in self._node_ip_servers.values():
                server.shutdown()
                server.server_close()
            self._node_ip_servers = {}
            self._node_ip = host
        for port in self._node_ip_ports:
            if port in self._node_ip_servers:
                continue
            address = str(prometheus.ListenAddress(host, port))
            try:
                self._node_ip_servers[port] = prometheus.serve(address, self._collect,
                                                               self._health, self.stop)
            except OSError as exc:
                self.metrics.count_error("metrics-listen")
                if self._reported.get("metrics-listen") != str(exc):
                    self.log.error("cannot serve /metrics on the node's address %s: %s",
                                   address, exc)
                self._reported["metrics-listen"] = str(exc)
                continue
            self._reported.pop("metrics-listen", None)
            self.log.info("serving /metrics, /healthz, /readyz on %s (node-ip)", address)

    def stop_on_signals(self, also: Callable[[], None] | None = None) -> None:
        """SIGTERM and SIGINT stop the loop (from the main thread only)."""
        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self.stop.set()
            self._poke.set()
            if also is not None:
                also()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
