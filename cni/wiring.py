"""The apply layer of pod wiring: the only CNI code that changes the kernel.

A pod is wired as a routed veth (no bridge, no L2 between pods):

  node namespace                               pod namespace
  mgc<hash>  (no address)  <------ veth ------>  eth0  198.18.0.7/32
    proxy_arp=1, proxy_delay=0                     169.254.1.1 dev eth0 scope link
    rp_filter=1 (strict), forwarding=1             default via 169.254.1.1 dev eth0
  198.18.0.7/32 dev mgc<hash> scope link proto 109

The pod sends everything to the link-local gateway 169.254.1.1; the node answers its ARP
(proxy ARP on the host veth, or directly, when the node owns the gateway address: see
`prepare_node`), so every pod packet enters the node's routing, where meshgress's routes,
rules and nftables decide its path.

Anti-spoofing: strict reverse-path filtering on the host veth. A packet from the pod is
accepted only if the node's route back to its source address leaves through the same
veth, i.e. only the pod's own /32 passes; another pod's address, an unallocated address or
an outside address is dropped before routing (counted in IPReversePathFilter). Chosen over
a per-veth nftables rule because it is per-interface kernel state that is born and dies
with the veth (nothing to garbage-collect, no second owner of the agent's nftables table)
and costs one attribute in the ADD's netlink batch. Its catch: the effective value is
max(conf/all/rp_filter, conf/<veth>/rp_filter), so a node with all=2 (loose) silently
weakens it to loose, which lets any routable source through. `antispoof_problem` detects
that and the service refuses ADD (and reports STATUS not ready) rather than wire pods
without protection.

Entering a pod's namespace: the pod side needs a netlink socket in the pod's namespace (a
socket stays bound to the namespace it was created in). The request thread itself enters
the namespace (setns(2); Python 3.11 has no os.setns, so libc's via ctypes), creates the
socket and returns to the node's namespace at once, before anything else: ~25 us, against
~80 us (more under load) for handing the job to a dedicated thread and waiting for it.
Nothing else a request thread does depends on its namespace (the node-side socket was
made at home; sysctls are set over netlink), and a thread that cannot return raises
`StrandedInPod`, which ends it (see there).

Never harming what is not ours: the service refuses a "pod" namespace that is the node's
own (`is_node_namespace`); routes are created, never replaced (an existing route to the
same destination is accepted only if it is meshgress's through this pod's interface, else
the ADD fails and the route stays); an existing host interface of the veth's name is
reported (`HostLinkExists`) for the service to decide, by `cni.model.HostLinkClaim`,
whether it is this attachment's; and interfaces are deleted by index, after that check.

Behind the `Wiring` protocol so the service's logic is tested with `FakeWiring`, an
in-memory model of the same kernel behaviour.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Protocol

from cni import protocol as p
from cni.model import HostLinkClaim, WiringPlan
from meshgress.kernel import sysctl
from meshgress.kernel.netns import CLONE_NEWNET, setns
from meshgress.kernel.rtnetlink import (
    IPV4_DEVCONF_FORWARDING,
    IPV4_DEVCONF_PROXY_ARP,
    IPV4_DEVCONF_RP_FILTER,
    RT_SCOPE_HOST,
    RT_SCOPE_LINK,
    RT_TABLE_MAIN,
    Link,
    Message,
    Route,
    address_message,
    route_message,
    set_arp_proxy_delay_message,
    set_ipv4_conf_message,
    set_up_message,
)
from meshgress.kernel.rtnl import NetconfWatch, NetlinkError, Rtnl
from meshgress.kernel_ids import POD_GATEWAY_IPV4, POD_HOST_VETH_PREFIX, ROUTE_PROTOCOL

log = logging.getLogger("meshgress.cni")

GATEWAY_LABEL = "lo:meshgress"
"""Label of the node-owned gateway address on the loopback, so it is recognisably ours."""

HOST_VETH_SYSCTLS = (
    ("ipv4/conf", "rp_filter", "1"),
    ("ipv4/conf", "proxy_arp", "1"),
    ("ipv4/conf", "forwarding", "1"),
    ("ipv4/neigh", "proxy_delay", "0"),
)
"""Set on every host veth before it is brought up. proxy_delay=0: the kernel otherwise
delays proxy-ARP replies by up to 0.8 s, which a pod's first packet would pay. Set over
netlink in the host side's batch (`HOST_VETH_IPV4_CONF`, `HOST_VETH_PROXY_DELAY_MS`: the
same kernel state, without four open/write/close of /proc files on the ADD path); CHECK
reads them back from /proc."""
HOST_VETH_IPV4_CONF = {
    IPV4_DEVCONF_RP_FILTER: 1,
    IPV4_DEVCONF_PROXY_ARP: 1,
    IPV4_DEVCONF_FORWARDING: 1,
}
HOST_VETH_PROXY_DELAY_MS = 0


class Wiring(Protocol):
    """What the CNI service needs from the kernel."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def prepare_node(self, own_gateway: bool) -> None: ...
    def antispoof_problem(self) -> str | None: ...
    def is_node_namespace(self, netns_fd: int) -> bool:
        """Whether `netns_fd` refers to the network namespace the node's side lives in."""
        ...
    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None:
        """Create the veth pair, configure both sides, add the routes (create-only).

        Raises HostLinkExists (the node has an interface of the host side's name; nothing
        was created), CniError ERR_IFNAME_IN_USE (the container has one of the pod side's
        name), CniError ERR_WIRING (a route of the plan is taken by someone else's), or
        OSError. On any failure after the veth exists, the veth is left for the caller to
        delete (deleting it removes everything else the plan made).
        """
        ...
    def host_link(self, name: str) -> Link | None: ...
    def delete_host_link(self, link: Link) -> bool:
        """Delete this very interface (by index); False if it is gone already."""
        ...
    def check_pod(
        self, claim: HostLinkClaim, pod_ifname: str, ip: IPv4Address, netns_fd: int
    ) -> list[str]: ...
    def host_links(self) -> list[str]: ...


class HostLinkExists(Exception):
    """The node already has an interface named as the pod's host veth would be."""

    def __init__(self, link: Link) -> None:
        super().__init__(f"host interface {link.name} already exists")
        self.link = link


def _is_own_route(existing: Route, wanted: Route) -> bool:
    """An existing route meshgress may take as the one it wanted: tagged as meshgress's
    and through the same interface."""
    return existing.protocol == ROUTE_PROTOCOL and existing.oif == wanted.oif


def _route_conflict(existing: Route | None, wanted: Route, where: str) -> p.CniError:
    holder = ("" if existing is None else
              f"existing route: protocol {existing.protocol}, interface index {existing.oif}"
              f"{f', via {existing.gateway}' if existing.gateway else ''}")
    return p.CniError(
        p.ERR_WIRING,
        f"a route to {wanted.dst} already exists in {where} and is not this pod's: "
        "meshgress does not replace it",
        holder,
    )


class StrandedInPod(SystemExit):
    """This thread entered a pod's network namespace and could not return to the node's.

    Everything it would do from here could land in the pod, so it must stop: derived from
    SystemExit, it passes every `except Exception` (the request fails, the connection is
    closed, the shim reports "try again later") and ends the thread quietly; the server
    serves on with its other workers. Logged when raised. Never seen in practice: returning
    needs only the capability the thread just used to enter.
    """


class NetlinkWiring:
    """`Wiring` on the real kernel, in the network namespace of the process's threads.

    Each thread gets its own node-side netlink socket, kept open for the thread's life:
    concurrent requests then wait only for the kernel, not for each other (deleting a
    veth blocks its caller for tens of milliseconds of RCU grace periods). Every thread
    that uses this object must be in the node's namespace, as the server's are.
    """

    def __init__(self, proc_sys: Path | str = sysctl.PROC_SYS) -> None:
        self._proc_sys = Path(proc_sys)
        self._local = threading.local()
        # Weak: a thread's socket is closed (garbage) when the thread ends.
        self._sockets: weakref.WeakSet[Rtnl] = weakref.WeakSet()
        self._sockets_lock = threading.Lock()
        self._open = False
        self._home_fd: int | None = None
        self._home_identity: tuple[int, int] | None = None
        self._gateway = IPv4Address(POD_GATEWAY_IPV4)
        self._netconf: NetconfWatch | None = None
        self._antispoof_lock = threading.Lock()
        self._antispoof_ok = False

    @property
    def host(self) -> Rtnl:
        """This thread's netlink socket in the node's namespace."""
        rtnl: Rtnl | None = getattr(self._local, "rtnl", None)
        if rtnl is None:
            if not self._open:
                raise RuntimeError("NetlinkWiring used before open()")
            rtnl = Rtnl()
            with self._sockets_lock:
                self._sockets.add(rtnl)
            self._local.rtnl = rtnl
        return rtnl

    def open(self) -> None:
        """Open in the node's namespace: the calling thread's is taken as the node's."""
        if self._home_fd is None:
            self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            self._home_identity = namespace_identity(self._home_fd)
        self._open = True
        _ = self.host
        try:
            self._netconf = NetconfWatch()
        except OSError:
            self._netconf = None  # then antispoof_problem reads the sysctl every time

    def close(self) -> None:
        self._open = False
        with self._sockets_lock:
            for rtnl in list(self._sockets):
                rtnl.close()
            self._sockets.clear()
        self._local = threading.local()
        if self._home_fd is not None:
            os.close(self._home_fd)
            self._home_fd = None
            self._home_identity = None
        with self._antispoof_lock:
            if self._netconf is not None:
                self._netconf.close()
                self._netconf = None
            self._antispoof_ok = False

    # --- node -------------------------------------------------------------------------

    def prepare_node(self, own_gateway: bool) -> None:
        """Own the pods' gateway address (169.254.1.1/32, scope host, on lo), if asked.

        Then the node itself answers a pod's ARP and ICMP for its gateway (a pod can ping
        it, and traffic to it ends on the node instead of being forwarded out of the
        default route). Scope host keeps it from ever being chosen as a source address.
        Never removed on shutdown: pods keep working while the agent restarts.
        """
        if not own_gateway:
            return
        lo = self.host.get_link("lo")
        if lo is None:
            raise RuntimeError("the node namespace has no loopback interface")
        if not lo.up:
            self.host.set_up(lo.index)
        self.host.add_address(lo.index, self._gateway, 32, scope=RT_SCOPE_HOST, label=GATEWAY_LABEL)

    def antispoof_problem(self) -> str | None:
        """Why pods cannot be protected on this node now, or None.

        Every ADD asks, so a good answer is remembered until the kernel reports a change
        of `net.ipv4.conf.all.*` (netconf notification, read before the answer is reused):
        no sysctl read on the ADD path (~0.13 ms), and no window in which a change to
        loose mode goes unnoticed. A bad answer is never reused.
        """
        with self._antispoof_lock:
            changed = self._netconf is None or self._netconf.all_changed()
            if self._antispoof_ok and not changed:
                return None
            problem = self._read_antispoof_problem()
            self._antispoof_ok = problem is None
            return problem

    def _read_antispoof_problem(self) -> str | None:
        key = "net/ipv4/conf/all/rp_filter"
        value = sysctl.read(key, self._proc_sys)
        if value is None:
            return f"cannot read {self._proc_sys / key}"
        if value == "2":
            return (
                "net.ipv4.conf.all.rp_filter=2 (loose) overrides the strict reverse-path "
                "filter meshgress puts on each pod's host veth (the effective value is "
                "max(all, interface)), so pods could spoof source addresses; set it to 0 or 1"
            )
        return None

    def _read_sysctl(self, section: str, ifname: str, key: str) -> str | None:
        return sysctl.read(sysctl.interface_key(section, ifname, key), self._proc_sys)

    # --- pods -------------------------------------------------------------------------

    def is_node_namespace(self, netns_fd: int) -> bool:
        if self._home_identity is None:
            raise RuntimeError("NetlinkWiring used before open()")
        return namespace_identity(netns_fd) == self._home_identity

    def _pod_rtnl(self, netns_fd: int) -> Rtnl:
        """A netlink socket in the namespace `netns_fd` refers to, made by this thread."""
        home = self._home_fd
        if home is None:
            raise RuntimeError("NetlinkWiring used before open()")
        setns(netns_fd, CLONE_NEWNET)
        try:
            return Rtnl()
        finally:
            try:
                setns(home, CLONE_NEWNET)
            except OSError as exc:
                log.critical("CNI thread %s cannot return to the node's network namespace "
                             "(%s); it stops", threading.current_thread().name, exc)
                raise StrandedInPod(f"cannot return to the node's namespace: {exc}") from exc

    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None:
        host = self.host
        try:
            link = host.create_veth(plan.host_ifname, plan.host_mac, plan.pod_ifname,
                                    plan.pod_mac, netns_fd, mtu=plan.mtu, up=False)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise
            existing = host.get_link(plan.host_ifname)
            if existing is not None:
                raise HostLinkExists(existing) from None
            raise p.CniError(
                p.ERR_IFNAME_IN_USE,
                f"interface {plan.pod_ifname} already exists in the container's network "
                "namespace",
            ) from None
        if link is None:  # a kernel that does not echo new links
            link = host.get_link(plan.host_ifname)
            if link is None:
                raise NetlinkError(errno.ENODEV, f"{plan.host_ifname} vanished after creation")
        # Each side's steps go to the kernel in one write; it applies them in order.
        _apply(host, [
            set_ipv4_conf_message(link.index, HOST_VETH_IPV4_CONF),
            set_arp_proxy_delay_message(link.index, HOST_VETH_PROXY_DELAY_MS),
            set_up_message(link.index),
        ], [_route(plan.ip, 32, oif=link.index, scope=RT_SCOPE_LINK)], "the node's main table")
        with self._pod_rtnl(netns_fd) as pod:
            # The host side's IFLA_LINK is the peer's index in the pod's namespace.
            pod_index = link.peer_index
            if not pod_index:
                pod_link = pod.get_link(plan.pod_ifname)
                if pod_link is None:
                    raise NetlinkError(errno.ENODEV, f"{plan.pod_ifname} missing in the pod")
                pod_index = pod_link.index
            _apply(pod, [
                set_up_message(pod_index),
                address_message(pod_index, plan.ip, 32),
            ], [
                _route(plan.gateway, 32, oif=pod_index, scope=RT_SCOPE_LINK),
                _route(IPv4Address(0), 0, oif=pod_index, gateway=plan.gateway),
            ], "the container's main table")

    def host_link(self, name: str) -> Link | None:
        return self.host.get_link(name)

    def delete_host_link(self, link: Link) -> bool:
        """Delete the host veth by index (its peer and routes through it go with it)."""
        return self.host.delete_link_index(link.index)

    def host_links(self) -> list[str]:
        return sorted(
            link.name for link in self.host.links()
            if link.name.startswith(POD_HOST_VETH_PREFIX) and link.kind == "veth"
        )

    def check_pod(
        self, claim: HostLinkClaim, pod_ifname: str, ip: IPv4Address, netns_fd: int
    ) -> list[str]:
        problems: list[str] = []
        host = self.host
        host_ifname = claim.name
        link = host.get_link(host_ifname)
        if link is None:
            problems.append(f"host interface {host_ifname} is missing")
        elif not claim.owns(link.name, link.mac, link.kind):
            problems.append(f"host interface {host_ifname} is not this attachment's "
                            f"(a {link.kind} with MAC {link.mac})")
        else:
            if not link.up:
                problems.append(f"host interface {host_ifname} is down")
            if not any(
                r.dst == IPv4Network(ip) and r.oif == link.index
                for r in host.routes(table=RT_TABLE_MAIN, protocol=ROUTE_PROTOCOL)
            ):
                problems.append(f"host route {ip}/32 dev {host_ifname} is missing")
            for section, key, value in HOST_VETH_SYSCTLS:
                actual = self._read_sysctl(section, host_ifname, key)
                if actual != value:
                    problems.append(f"{section}/{host_ifname}/{key} is {actual}, expected {value}")
        with self._pod_rtnl(netns_fd) as pod:
            pod_link = pod.get_link(pod_ifname)
            if pod_link is None:
                problems.append(f"interface {pod_ifname} is missing in the container")
                return problems
            if not pod_link.up:
                problems.append(f"interface {pod_ifname} is down in the container")
            if not any(
                a.index == pod_link.index and a.address == ip and a.prefixlen == 32
                for a in pod.addresses()
            ):
                problems.append(f"address {ip}/32 is missing on {pod_ifname} in the container")
            routes = pod.routes(table=RT_TABLE_MAIN, oif=pod_link.index)
            if not any(r.dst == IPv4Network(self._gateway) for r in routes):
                problems.append(
                    f"route {self._gateway} dev {pod_ifname} is missing in the container"
                )
            if not any(r.dst.prefixlen == 0 and r.gateway == self._gateway for r in routes):
                problems.append(f"default route via {self._gateway} is missing in the container")
        return problems


def namespace_identity(fd: int) -> tuple[int, int]:
    """What tells namespaces apart: the device and inode of an fd referring to one (its
    nsfs inode, also through a bind mount such as /run/netns/NAME)."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _apply(rtnl: Rtnl, messages: Sequence[Message], routes: Sequence[Route], where: str) -> None:
    """`messages`, then `routes` created (never replaced), in one write. A route that
    exists already is fine only if it is meshgress's through the same interface."""
    _, errors = rtnl.batch_results(
        [*messages, *(route_message(route, replace=False) for route in routes)])
    for n in sorted(errors):
        error = errors[n]
        if n < len(messages) or error.errno != errno.EEXIST:
            raise error
        wanted = routes[n - len(messages)]
        existing = next((r for r in rtnl.routes(table=wanted.table)
                         if r.dst == wanted.dst and (r.metric or 0) == (wanted.metric or 0)),
                        None)
        if existing is None or not _is_own_route(existing, wanted):
            raise _route_conflict(existing, wanted, where)


def _route(dst: IPv4Address, prefixlen: int, *, oif: int, scope: int = 0,
           gateway: IPv4Address | None = None) -> Route:
    return Route(IPv4Network((dst, prefixlen)), RT_TABLE_MAIN, ROUTE_PROTOCOL, scope=scope,
                 oif=oif, gateway=gateway)


NamespaceId = tuple[int, int]


@dataclass
class FakeNamespace:
    """One network namespace of `FakeWiring`: interfaces by name, main-table routes."""

    links: dict[str, Link] = field(default_factory=dict)
    routes: dict[IPv4Network, Route] = field(default_factory=dict)
    addresses: dict[str, IPv4Address] = field(default_factory=dict)


class FakeWiring:
    """`Wiring` on an in-memory model of the kernel, for tests without root.

    Namespaces are told apart as the kernel's are, by the device and inode of the file an
    fd refers to (`namespace_identity`): the node's is the test process's own, a pod's can
    be any file. What the model reproduces is what the service's decisions depend on: a
    veth is two interfaces created at once (EEXIST if either name is taken, the host side
    checked first), deleting one end deletes the other and every route through either,
    routes are created only (EEXIST when the destination is taken). Tests add foreign
    interfaces and routes with `node.links[...]`/`add_foreign_*` and inject failures with
    `fail_add` (raised once the veth exists, as a failing later step would).
    """

    def __init__(self) -> None:
        self.node_id = namespace_identity_of_path("/proc/self/ns/net")
        self.namespaces: dict[NamespaceId, FakeNamespace] = {self.node_id: FakeNamespace()}
        self.peers: dict[int, tuple[NamespaceId, str]] = {}
        """Host veth index -> (pod namespace, pod interface name)."""
        self.log: list[str] = []
        self.fail_add: BaseException | None = None
        self.antispoof: str | None = None
        self.opened = False
        self.own_gateway: bool | None = None
        self._indexes = itertools.count(100)
        self._lock = threading.Lock()

    @property
    def node(self) -> FakeNamespace:
        return self.namespaces[self.node_id]

    @property
    def links(self) -> dict[str, Link]:
        """The node's interfaces by name."""
        return self.node.links

    def pod(self, netns_fd: int) -> FakeNamespace:
        return self.namespaces.setdefault(namespace_identity(netns_fd), FakeNamespace())

    def is_empty(self) -> bool:
        """Nothing the service had made is left: no veth pair, no route tagged as
        meshgress's, no pod address (foreign interfaces and routes do not count)."""
        return not self.peers and not any(
            ns.addresses or any(r.protocol == ROUTE_PROTOCOL for r in ns.routes.values())
            for ns in self.namespaces.values()
        )

    def add_foreign_link(self, name: str, mac: str = "02:00:5e:00:00:01", kind: str = "veth",
                         netns_fd: int | None = None) -> Link:
        namespace = self.node if netns_fd is None else self.pod(netns_fd)
        link = Link(next(self._indexes), name, mac, True, kind, 1500)
        namespace.links[name] = link
        return link

    def add_foreign_route(self, dst: str, *, protocol: int = 4, oif: int | None = None,
                          netns_fd: int | None = None) -> Route:
        namespace = self.node if netns_fd is None else self.pod(netns_fd)
        route = Route(IPv4Network(dst), RT_TABLE_MAIN, protocol, oif=oif)
        namespace.routes[route.dst] = route
        return route

    # --- Wiring ---------------------------------------------------------------------------

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def prepare_node(self, own_gateway: bool) -> None:
        self.own_gateway = own_gateway

    def antispoof_problem(self) -> str | None:
        return self.antispoof

    def is_node_namespace(self, netns_fd: int) -> bool:
        return namespace_identity(netns_fd) == self.node_id

    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None:
        with self._lock:
            self.log.append(f"add {plan.host_ifname}")
            pod_id = namespace_identity(netns_fd)
            pod = self.namespaces.setdefault(pod_id, FakeNamespace())
            if plan.host_ifname in self.node.links:
                raise HostLinkExists(self.node.links[plan.host_ifname])
            if plan.pod_ifname in pod.links:
                raise p.CniError(p.ERR_IFNAME_IN_USE,
                                 f"interface {plan.pod_ifname} already exists in the "
                                 "container's network namespace")
            host = Link(next(self._indexes), plan.host_ifname, plan.host_mac, True, "veth",
                        plan.mtu or 1500)
            peer = Link(next(self._indexes), plan.pod_ifname, plan.pod_mac, True, "veth",
                        plan.mtu or 1500, peer_index=host.index)
            self.node.links[host.name] = host
            pod.links[peer.name] = peer
            self.peers[host.index] = (pod_id, peer.name)
            if self.fail_add is not None:
                raise self.fail_add
            self._add_routes(self.node, [_route(plan.ip, 32, oif=host.index,
                                                scope=RT_SCOPE_LINK)], "the node's main table")
            pod.addresses[peer.name] = plan.ip
            self._add_routes(pod, [
                _route(plan.gateway, 32, oif=peer.index, scope=RT_SCOPE_LINK),
                _route(IPv4Address(0), 0, oif=peer.index, gateway=plan.gateway),
            ], "the container's main table")

    @staticmethod
    def _add_routes(namespace: FakeNamespace, routes: list[Route], where: str) -> None:
        for route in routes:
            existing = namespace.routes.get(route.dst)
            if existing is not None and not _is_own_route(existing, route):
                raise _route_conflict(existing, route, where)
            namespace.routes[route.dst] = route

    def host_link(self, name: str) -> Link | None:
        return self.node.links.get(name)

    def delete_host_link(self, link: Link) -> bool:
        with self._lock:
            current = self.node.links.get(link.name)
            if current is None or current.index != link.index:
                return False
            self.log.append(f"remove {link.name}")
            del self.node.links[link.name]
            _drop_routes_through(self.node, link.index)
            peer = self.peers.pop(link.index, None)
            if peer is not None:
                pod = self.namespaces[peer[0]]
                pod_link = pod.links.pop(peer[1], None)
                pod.addresses.pop(peer[1], None)
                if pod_link is not None:
                    _drop_routes_through(pod, pod_link.index)
                if not pod.links and not pod.routes:
                    del self.namespaces[peer[0]]
            return True

    def check_pod(
        self, claim: HostLinkClaim, pod_ifname: str, ip: IPv4Address, netns_fd: int
    ) -> list[str]:
        link = self.node.links.get(claim.name)
        if link is None:
            return [f"host interface {claim.name} is missing"]
        if not claim.owns(link.name, link.mac, link.kind):
            return [f"host interface {claim.name} is not this attachment's"]
        problems = []
        route = self.node.routes.get(IPv4Network(ip))
        if route is None or route.oif != link.index:
            problems.append(f"host route {ip}/32 dev {claim.name} is missing")
        pod = self.namespaces.get(namespace_identity(netns_fd), FakeNamespace())
        if pod_ifname not in pod.links:
            problems.append(f"interface {pod_ifname} is missing in the container")
        elif pod.addresses.get(pod_ifname) != ip:
            problems.append(f"address {ip}/32 is missing on {pod_ifname} in the container")
        return problems

    def host_links(self) -> list[str]:
        return sorted(name for name, link in self.node.links.items()
                      if name.startswith(POD_HOST_VETH_PREFIX) and link.kind == "veth")


def namespace_identity_of_path(path: str) -> NamespaceId:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return namespace_identity(fd)
    finally:
        os.close(fd)


def _drop_routes_through(namespace: FakeNamespace, index: int) -> None:
    for dst in [dst for dst, route in namespace.routes.items() if route.oif == index]:
        del namespace.routes[dst]
