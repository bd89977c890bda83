"""Whether this gateway can still serve slots through its own links, and when to look again.

Why it exists: a gateway whose external interface is set down, loses its carrier or loses
the default route can no longer carry its slots' traffic, yet nothing else makes it let
go of them: its lease keeper renews through the datastore, which may be reachable another
way (the file datastore is a local folder; an API server may sit behind another
interface). Nodes notice the dead tunnel and move their flows to other slots, but a
gateway with a single egress IP would stay dark for as long as the link is down, and its
standby would wait for nothing. So the gateway counts a slot whose uplink is faulty as not
servable: it releases it (the IP goes first, then the lease, so a standby takes the slot at
once) and claims nothing there until the link is back.

What makes an uplink faulty (`compute_uplink_fault`, purely computational):
- the slot's external interface is missing, administratively down, or not operationally up
  (no carrier: a cable pulled, a switch port or a veth peer down);
- no default route of the main table leaves through it: the gateway forwards by the main
  table, so without one SNATed traffic cannot leave on that interface;
- the interface holding this node's InternalIP — where the nodes' tunnels reach the
  gateway, when it is another one — is down or has no carrier.

Kernel notifications, not timers, say when to look (`UplinkWatcher` on the kernel
library's `LinkWatch`): the loop is poked the moment a link changes state or a default
route comes or goes, and the pass that follows reads the links afresh.

Not a signal here, on purpose: nodes' probes going quiet. They also stop while agents
restart (all of them in a one-node cluster), and releasing every slot of every gateway then
would break every flow through them. A gateway cut off beyond its own links loses its slots
through its lease instead, when its renewals can no longer reach the datastore.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("meshgress.gateway")


@dataclass(frozen=True)
class LinkState:
    up: bool
    """Administratively up."""
    running: bool
    """Operationally up: carrier present, not dormant."""


@dataclass(frozen=True)
class UplinkView:
    """The links as the gateway depends on them, read in one go."""

    links: Mapping[str, LinkState] = field(default_factory=dict)
    default_routes: tuple[str, ...] = ()
    """Interfaces of the main table's IPv4 default routes, the preferred one first."""
    addresses: Mapping[ipaddress.IPv4Address, str] = field(default_factory=dict)
    """Local IPv4 addresses and the interface holding each."""

    @property
    def default_interface(self) -> str | None:
        """Where the default route leaves: a slot's external interface unless its gateway
        names one."""
        return self.default_routes[0] if self.default_routes else None


def _link_fault(view: UplinkView, name: str) -> str | None:
    state = view.links.get(name)
    if state is None:
        return f"{name} does not exist"
    if not state.up:
        return f"{name} is down"
    if not state.running:
        return f"{name} has no carrier"
    return None


def compute_uplink_fault(view: UplinkView, external: str | None,
                         internal_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
                         ) -> str | None:
    """Why a slot cannot be served through `external` on this node (None: it can).

    `external`: the slot's external interface (None: its gateway names none and there is
    no default route to find one by). `internal_ip`: this node's InternalIP, the nodes'
    tunnel endpoint. Purely computational."""
    if external is None:
        return "no default route to find the external interface by"
    fault = _link_fault(view, external)
    if fault is not None:
        return fault
    if external not in view.default_routes:
        return f"no default route via {external}"
    endpoint = view.addresses.get(internal_ip) \
        if isinstance(internal_ip, ipaddress.IPv4Address) else None
    if endpoint is not None and endpoint != external:
        fault = _link_fault(view, endpoint)
        if fault is not None:
            return f"tunnel endpoint {internal_ip}: {fault}"
    return None


class ChangeWatch(Protocol):
    """Notifications from the kernel (`meshgress.kernel.rtnl.LinkWatch`, or a fake)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something may have changed (True), or `timeout` passed (None: no
        limit) or `interrupt` was called (False)."""
        ...

    def interrupt(self) -> None:
        """End the wait in progress (or the next one) at once."""
        ...

    def close(self) -> None: ...


class UplinkWatcher:
    """One daemon thread: calls `on_change` (which only pokes the loop) whenever the
    watch reports a change, until closed; it sleeps in the watch's wait with no timeout
    (`close` interrupts it). A failing watch is logged and retried every `poll` seconds,
    and says so (`working`): the caller then reads the links on every pass."""

    def __init__(self, watch: ChangeWatch, on_change: Callable[[], None], *,
                 poll: float = 0.5) -> None:
        self._watch = watch
        self._on_change = on_change
        self._stop = threading.Event()
        self._poll = poll
        self.changes = 0
        self.working = True
        """False while the watch fails: nothing announces changes then."""
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)

    def start(self) -> UplinkWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                changed = self._watch.wait(None)
            except OSError as exc:
                if not failing:
                    log.error("uplink watch failed (links are read on every pass "
                              "meanwhile): %s", exc)
                failing = True
                self.working = False
                self._stop.wait(self._poll)
                continue
            if failing:
                log.info("uplink watch works again")
                failing = False
                self.working = True
                changed = True  # what happened meanwhile was not announced
            if changed:
                self.changes += 1
                self._on_change()

    def close(self) -> None:
        self._stop.set()
        self._watch.interrupt()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._watch.close()
