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

Behind the `Wiring` protocol so the service's logic is tested with a fake.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import weakref
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Protocol

from cni import protocol as p
from cni.model import WiringPlan
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
    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None: ...
    def remove_pod(self, host_ifname: str) -> bool: ...
    def check_pod(
        self, host_ifname: str, pod_ifname: str, ip: IPv4Address, netns_fd: int
    ) -> list[str]: ...
    def host_links(self) -> list[str]: ...


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

    def _create_veth(self, plan: WiringPlan, netns_fd: int) -> Link | None:
        return self.host.create_veth(
            plan.host_ifname, plan.host_mac, plan.pod_ifname, plan.pod_mac, netns_fd,
            mtu=plan.mtu, up=False,
        )

    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None:
        host = self.host
        try:
            link = self._create_veth(plan, netns_fd)
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # Either a pair left by an earlier ADD of this attachment (replace it) or the
            # pod already has an interface of that name (not ours to touch).
            if not host.delete_link(plan.host_ifname):
                raise p.CniError(
                    p.ERR_IFNAME_IN_USE,
                    f"interface {plan.pod_ifname} already exists in the container's network "
                    "namespace",
                ) from None
            try:
                link = self._create_veth(plan, netns_fd)
            except NetlinkError as again:
                if again.errno == errno.EEXIST:
                    raise p.CniError(
                        p.ERR_IFNAME_IN_USE,
                        f"interface {plan.pod_ifname} already exists in the container's "
                        "network namespace",
                    ) from None
                raise
        if link is None:  # a kernel that does not echo new links
            link = host.get_link(plan.host_ifname)
            if link is None:
                raise NetlinkError(errno.ENODEV, f"{plan.host_ifname} vanished after creation")
        # Each side's steps go to the kernel in one write; it applies them in order.
        host.batch([
            set_ipv4_conf_message(link.index, HOST_VETH_IPV4_CONF),
            set_arp_proxy_delay_message(link.index, HOST_VETH_PROXY_DELAY_MS),
            set_up_message(link.index),
            route_message(_route(plan.ip, 32, oif=link.index, scope=RT_SCOPE_LINK)),
        ])
        with self._pod_rtnl(netns_fd) as pod:
            # The host side's IFLA_LINK is the peer's index in the pod's namespace.
            pod_index = link.peer_index
            if not pod_index:
                pod_link = pod.get_link(plan.pod_ifname)
                if pod_link is None:
                    raise NetlinkError(errno.ENODEV, f"{plan.pod_ifname} missing in the pod")
                pod_index = pod_link.index
            pod.batch([
                set_up_message(pod_index),
                address_message(pod_index, plan.ip, 32),
                route_message(_route(plan.gateway, 32, oif=pod_index, scope=RT_SCOPE_LINK)),
                route_message(_route(IPv4Address(0), 0, oif=pod_index, gateway=plan.gateway)),
            ])

    def remove_pod(self, host_ifname: str) -> bool:
        """Delete the host veth (its peer and routes through it go with it)."""
        return self.host.delete_link(host_ifname)

    def host_links(self) -> list[str]:
        return sorted(
            link.name for link in self.host.links()
            if link.name.startswith(POD_HOST_VETH_PREFIX) and link.kind == "veth"
        )

    def check_pod(
        self, host_ifname: str, pod_ifname: str, ip: IPv4Address, netns_fd: int
    ) -> list[str]:
        problems: list[str] = []
        host = self.host
        link = host.get_link(host_ifname)
        if link is None:
            problems.append(f"host interface {host_ifname} is missing")
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


def _route(dst: IPv4Address, prefixlen: int, *, oif: int, scope: int = 0,
           gateway: IPv4Address | None = None) -> Route:
    return Route(IPv4Network((dst, prefixlen)), RT_TABLE_MAIN, ROUTE_PROTOCOL, scope=scope,
                 oif=oif, gateway=gateway)
