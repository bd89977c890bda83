"""`Rtnl`: one NETLINK_ROUTE socket that sends `meshgress.kernel.rtnetlink` messages.

A socket is bound for its whole life to the network namespace it was created in: the
calling thread's, or `netns` (a path or a name under /run/netns), which it enters only
for the moment of creating the socket, or that of a socket made elsewhere and handed over
(`sock`: another process created it inside a namespace this one may not enter). Requests
on one socket are serialised by a lock, so it may be shared between threads; callers that
want concurrency (the CNI server) keep one per thread.

Several requests go to the kernel in one write (`batch`), which applies them in order and
answers each; errors are `NetlinkError`, an OSError carrying the errno and the kernel's
extended-ack message. Callers branch on errno, never on text.

This is the apply layer's transport; the convenience methods below are the few reads and
writes every caller would otherwise spell out again. `NetconfWatch` and `LinkWatch` are
the two notification sockets: they say *that* something changed, and callers read again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from meshgress.kernel import rtnetlink as rt
from meshgress.kernel.netns import in_network_namespace, namespace_identity, socket_namespace
from meshgress.kernel.rtnetlink import Address, Link, Message, Netconf, Route, Rule

_RECV_SIZE = 1 << 16


@dataclass(frozen=True)
class SocketFacts:
    """What the kernel says about a file descriptor another process handed over as an
    rtnetlink socket (`read_socket_facts`), before it is used as one."""

    is_socket: bool
    family: int = 0
    """SO_DOMAIN."""
    protocol: int = 0
    """SO_PROTOCOL."""
    namespace: tuple[int, int] | None = None
    """Device and inode of the socket's network namespace; None if the kernel would not
    say (SIOCGSKNS refused)."""
    namespace_error: str = ""

    @property
    def is_rtnetlink(self) -> bool:
        return (self.is_socket and self.family == socket.AF_NETLINK
                and self.protocol == socket.NETLINK_ROUTE)

    @classmethod
    def of_rtnetlink(cls, namespace: tuple[int, int]) -> SocketFacts:
        """An rtnetlink socket living in `namespace` (for fakes that model one)."""
        return cls(True, socket.AF_NETLINK, socket.NETLINK_ROUTE, namespace)


def read_socket_facts(fd: int) -> SocketFacts:
    """What the kernel says about `fd` as a socket: its family and protocol
    (SO_DOMAIN, SO_PROTOCOL) and the network namespace it lives in (SIOCGSKNS, which
    needs CAP_NET_ADMIN over that namespace)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return SocketFacts(is_socket=False)
    with socket.socket(fileno=os.dup(fd)) as sock:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        protocol = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        try:
            ns_fd = socket_namespace(sock.fileno())
        except OSError as exc:
            return SocketFacts(True, family, protocol, None, str(exc))
    try:
        return SocketFacts(True, family, protocol, namespace_identity(ns_fd))
    finally:
        os.close(ns_fd)


class NetlinkError(OSError):
    """The kernel rejected a request: errno plus the extended-ack message, if any."""


def _error_text(code: int, flags: int, body: bytes) -> str:
    text = os.strerror(code)
    if flags & rt.NLM_F_ACK_TLVS and len(body) >= 4 + rt.NLMSGHDR.size:
        original_length = rt.NLMSGHDR.unpack_from(body, 4)[0]
        offset = 4 + (rt.NLMSGHDR.size if flags & rt.NLM_F_CAPPED else original_length)
        message = rt.text_of(rt.parse_attrs(body, (offset + 3) & ~3).get(rt.NLMSGERR_ATTR_MSG))
        if message:
            text = f"{text}: {message}"
    return text


def _open_socket(strict_dumps: bool, flags: int = 0) -> tuple[socket.socket, bool]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | flags,
                         socket.NETLINK_ROUTE)
    return sock, _configure(sock, strict_dumps, bind=True)


def _configure(sock: socket.socket, strict_dumps: bool, *, bind: bool) -> bool:
    """Extended acknowledgements, strict dumps if asked (whether the kernel took them),
    and a port id of the kernel's choosing."""
    with contextlib.suppress(OSError):  # older kernels: errors come without a message
        sock.setsockopt(rt.SOL_NETLINK, rt.NETLINK_EXT_ACK, 1)
    strict = False
    if strict_dumps:
        with contextlib.suppress(OSError):
            sock.setsockopt(rt.SOL_NETLINK, rt.NETLINK_GET_STRICT_CHK, 1)
            strict = True
    if bind:
        sock.bind((0, 0))
    return strict


class Rtnl:
    """One rtnetlink socket in the calling thread's network namespace, or in `netns`.

    `strict_dumps`: ask the kernel (4.20 and later) to check dump requests strictly and
    to filter by what their header says (a route dump by table and protocol, say); the
    caller must still filter itself, since older kernels ignore the header and dump all.
    `strict_dumps_on` tells whether the kernel accepted.

    `sock`: an rtnetlink socket made elsewhere, taken over (closed with this object); it
    is not bound here (the kernel binds it on the first request, and one another process
    bound already works as it is)."""

    def __init__(self, *, strict_dumps: bool = False, netns: str | None = None,
                 sock: socket.socket | None = None) -> None:
        if sock is not None:
            self._sock, self.strict_dumps_on = sock, _configure(sock, strict_dumps, bind=False)
        elif netns is None:
            self._sock, self.strict_dumps_on = _open_socket(strict_dumps)
        else:
            self._sock, self.strict_dumps_on = in_network_namespace(
                netns, lambda: _open_socket(strict_dumps))
        self._lock = threading.Lock()
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------

    def batch(self, messages: Sequence[Message]) -> list[list[tuple[int, bytes]]]:
        """Send requests in one write; return each one's (type, body) replies, in order.

        The kernel handles them one after another, as if sent separately (a later one
        sees what an earlier one did), and answers each; every request must ask for an
        ACK or be a dump. If any failed, the first failure is raised once all answers
        are read, so the socket stays in step.
        """
        replies, errors = self.batch_results(messages)
        if errors:
            raise errors[min(errors)]
        return replies

    def batch_results(self, messages: Sequence[Message]
                      ) -> tuple[list[list[tuple[int, bytes]]], dict[int, NetlinkError]]:
        """As `batch`, but nothing is raised for a failed request: the failures come back
        by position, for callers to whom some errnos are success (ESRCH on a delete)."""
        if not messages:
            return [], {}  # an empty datagram is an error (ENODATA), not a no-op
        with self._lock:
            seqs, chunks = [], []
            for msg_type, flags, payload in messages:
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                seqs.append(self._seq)
                chunks.append(rt.NLMSGHDR.pack(rt.NLMSGHDR.size + len(payload), msg_type,
                                               flags, self._seq, 0) + payload)
            self._sock.sendto(b"".join(chunks), (0, 0))
            return self._receive(seqs)

    def _receive(self, seqs: list[int]
                 ) -> tuple[list[list[tuple[int, bytes]]], dict[int, NetlinkError]]:
        position = {seq: n for n, seq in enumerate(seqs)}
        replies: list[list[tuple[int, bytes]]] = [[] for _ in seqs]
        errors: dict[int, NetlinkError] = {}
        pending = len(seqs)
        while pending:
            data = self._sock.recv(_RECV_SIZE)
            offset = 0
            while offset + rt.NLMSGHDR.size <= len(data):
                length, kind, mflags, mseq, _pid = rt.NLMSGHDR.unpack_from(data, offset)
                if length < rt.NLMSGHDR.size:
                    raise NetlinkError(errno.EPROTO, "truncated netlink message")
                body = data[offset + rt.NLMSGHDR.size: offset + length]
                offset += (length + 3) & ~3
                n = position.get(mseq)
                if n is None:
                    continue  # a late reply to an earlier, abandoned request
                if kind in (rt.NLMSG_ERROR, rt.NLMSG_DONE):
                    code = -rt.I32.unpack_from(body)[0] if len(body) >= 4 else 0
                    if code > 0:
                        text = (_error_text(code, mflags, body) if kind == rt.NLMSG_ERROR
                                else os.strerror(code))
                        errors[n] = NetlinkError(code, text)
                    pending -= 1
                    continue
                replies[n].append((kind, body))
        return replies, errors

    def request(self, message: Message) -> list[tuple[int, bytes]]:
        """Send one request; return its (type, body) replies; raise NetlinkError."""
        return self.batch([message])[0]

    def try_request(self, message: Message, *, missing: frozenset[int]) -> bool:
        """Send one request; False when it failed with an errno in `missing` (what was
        to be removed is already gone, say), True when it succeeded."""
        try:
            self.request(message)
        except NetlinkError as exc:
            if exc.errno in missing:
                return False
            raise
        return True

    def send_all(self, messages: Sequence[Message], *, ignore: frozenset[int] = frozenset(),
                 what: Sequence[str] | None = None, chunk: int = 64) -> None:
        """Send many requests, `chunk` per write (a write must fit the socket's send
        buffer, and its acknowledgements the receive buffer). All are attempted; then the
        first failure whose errno is not in `ignore` is raised, naming `what[n]` and how
        many more failed."""
        failed: list[tuple[int, NetlinkError]] = []
        for start in range(0, len(messages), chunk):
            _, errors = self.batch_results(messages[start:start + chunk])
            failed += [(start + n, exc) for n, exc in sorted(errors.items())
                       if exc.errno not in ignore]
        if failed:
            n, exc = failed[0]
            label = f"{what[n]}: " if what is not None else ""
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise NetlinkError(exc.errno, f"{label}{exc.strerror}{more}")

    # --- links -------------------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        try:
            replies = self.request(rt.link_get_message(name))
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        links = [rt.decode_link(body) for kind, body in replies if kind == rt.RTM_NEWLINK]
        return links[0] if links else None

    def links(self) -> list[Link]:
        return [rt.decode_link(body) for kind, body in self.request(rt.link_dump_message())
                if kind == rt.RTM_NEWLINK]

    def create_veth(self, name: str, mac: str, peer_name: str, peer_mac: str,
                    peer_netns_fd: int, *, mtu: int | None = None,
                    up: bool = False) -> Link | None:
        """A veth pair whose peer is created directly inside `peer_netns_fd`'s namespace.

        The peer starts down (the kernel cannot open a veth before its pair is linked,
        ENOTCONN); bring it up with `set_up` from a socket in its namespace. Returns the
        new link as the kernel echoes it (kernels >= 6.3), None where it does not echo.
        """
        replies = self.request(rt.veth_create_message(name, mac, peer_name, peer_mac,
                                                      peer_netns_fd, mtu=mtu, up=up))
        links = [rt.decode_link(body) for kind, body in replies if kind == rt.RTM_NEWLINK]
        return next((link for link in links if link.name == name), None)

    def set_up(self, index: int) -> None:
        self.request(rt.set_up_message(index))

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False if there is none (idempotent)."""
        return self.try_request(rt.link_delete_message(name),
                                missing=frozenset({errno.ENODEV}))

    def delete_link_index(self, index: int) -> bool:
        """Delete a link by index; False if there is none (idempotent)."""
        return self.try_request(rt.link_delete_index_message(index),
                                missing=frozenset({errno.ENODEV}))

    # --- addresses ---------------------------------------------------------------------

    def add_address(self, index: int, address: IPv4Address, prefixlen: int, *,
                    scope: int = rt.RT_SCOPE_UNIVERSE, label: str | None = None,
                    lifetime: int | None = None) -> None:
        """Add (or refresh) an IPv4 address; idempotent."""
        self.request(rt.address_message(index, address, prefixlen, scope=scope, label=label,
                                        lifetime=lifetime))

    def addresses(self, family: int = socket.AF_INET) -> list[Address]:
        return [address for kind, body in self.request(rt.address_dump_message(family))
                if kind == rt.RTM_NEWADDR and (address := rt.decode_address(body)) is not None]

    # --- routes and rules --------------------------------------------------------------

    def routes(self, *, table: int = rt.RT_TABLE_UNSPEC, protocol: int = 0,
               type: int = rt.RTN_UNSPEC, oif: int | None = None) -> list[Route]:
        """IPv4 routes, only of `table`/`protocol`/`type`/`oif` where given: asked of the
        kernel on a strict socket and filtered here in any case."""
        found = []
        message = rt.route_dump_message(table=table, protocol=protocol, type=type, oif=oif)
        for kind, body in self.request(message):
            if kind != rt.RTM_NEWROUTE or (route := rt.decode_route(body)) is None:
                continue
            if (table and route.table != table) or (protocol and route.protocol != protocol) \
                    or (type and route.type != type) or (oif is not None and route.oif != oif):
                continue
            found.append(route)
        return found

    def rules(self) -> list[Rule]:
        return [rule for kind, body in self.request(rt.rule_dump_message())
                if kind == rt.RTM_NEWRULE and (rule := rt.decode_rule(body)) is not None]

    # --- IPv4 device settings ----------------------------------------------------------

    def set_ipv4_conf(self, index: int, values: dict[int, int]) -> None:
        self.request(rt.set_ipv4_conf_message(index, values))

    def ipv4_conf(self, index: int) -> Netconf | None:
        """forwarding, rp_filter and proxy_arp of one interface (None: no such one)."""
        try:
            replies = self.request(rt.netconf_get_message(index))
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL):
                return None
            raise
        for kind, body in replies:
            if kind == rt.RTM_NEWNETCONF and (conf := rt.decode_netconf(body)) is not None:
                return conf
        return None


class NetconfWatch:
    """Tells whether the node's `net.ipv4.conf.all.*` settings may have changed.

    A netlink socket subscribed to the kernel's IPv4 netconf notifications, which it sends
    when a sysctl such as rp_filter or forwarding changes value. `all_changed()` drains what
    arrived since the last call (non-blocking) and reports whether any of it was about
    `all` (or was lost to a full buffer); messages about single interfaces are skipped.
    Bound to the namespace of the creating thread.
    """

    def __init__(self) -> None:
        self._sock, _ = _open_socket(False, socket.SOCK_NONBLOCK)
        self._sock.setsockopt(rt.SOL_NETLINK, rt.NETLINK_ADD_MEMBERSHIP,
                              rt.RTNLGRP_IPV4_NETCONF)

    def close(self) -> None:
        self._sock.close()

    def all_changed(self) -> bool:
        changed = False
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return changed
            except OSError:  # ENOBUFS: notifications were dropped
                changed = True
                continue
            offset = 0
            while offset + rt.NLMSGHDR.size <= len(data):
                length, kind = rt.NLMSGHDR.unpack_from(data, offset)[:2]
                if length < rt.NLMSGHDR.size:
                    break
                if kind == rt.RTM_NEWNETCONF:
                    conf = rt.decode_netconf(data[offset + rt.NLMSGHDR.size:offset + length])
                    if conf is None or conf.index == rt.NETCONFA_IFINDEX_ALL:
                        changed = True
                offset += (length + 3) & ~3


class LinkWatch:
    """Tells when the node's links may no longer carry traffic the way they did.

    A netlink socket subscribed to the kernel's link notifications and, with
    `default_routes`, its IPv4 route notifications. What counts as a change: a link
    appears or disappears, or its administrative (`IFF_UP`) or operational
    (`IFF_RUNNING`: carrier, not dormant) state flips; a default route (0.0.0.0/0) of the
    main table is added, replaced or removed; or notifications were lost to a full
    buffer. Everything else the kernel announces (an MTU, a counter, routes of other
    tables or prefixes) is skipped, so a busy node does not wake the caller for nothing.

    It does not say what the state now is: callers read it again (level-triggered), so a
    notification that was lost or merged costs nothing but that read. Bound to the network
    namespace of the creating thread.
    """

    def __init__(self, *, default_routes: bool = True) -> None:
        self._sock, _ = _open_socket(False, socket.SOCK_NONBLOCK)
        groups = [rt.RTNLGRP_LINK] + ([rt.RTNLGRP_IPV4_ROUTE] if default_routes else [])
        for group in groups:
            self._sock.setsockopt(rt.SOL_NETLINK, rt.NETLINK_ADD_MEMBERSHIP, group)
        # Subscribed first, then read: a change in between is seen twice, never missed.
        with Rtnl() as rtnl:
            self._states = {link.index: (link.up, link.running) for link in rtnl.links()}
        self._interrupt_read, self._interrupt_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def close(self) -> None:
        self._sock.close()
        for fd in (self._interrupt_read, self._interrupt_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._interrupt_read = self._interrupt_write = -1

    def interrupt(self) -> None:
        """Make the `wait` in progress (or the next one) return False at once."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._interrupt_write, b"x")

    def __enter__(self) -> LinkWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a change arrives (True), or `timeout` seconds pass (None: no limit)
        or `interrupt` is called (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.changed()
            readable, _, _ = select.select([self._sock.fileno(), self._interrupt_read], [], [],
                                           remaining)
            if self._interrupt_read in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._interrupt_read, 4096)
                return False
            if readable and self.changed():
                return True

    def changed(self) -> bool:
        """Drain what arrived since the last call (non-blocking): whether any of it was a
        change as defined above."""
        changed = False
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return changed
            except OSError:  # ENOBUFS: notifications were dropped
                changed = True
                continue
            offset = 0
            while offset + rt.NLMSGHDR.size <= len(data):
                length, kind = rt.NLMSGHDR.unpack_from(data, offset)[:2]
                if length < rt.NLMSGHDR.size:
                    break
                changed |= self._matters(kind, data[offset + rt.NLMSGHDR.size:offset + length])
                offset += (length + 3) & ~3

    def _matters(self, kind: int, body: bytes) -> bool:
        if kind == rt.RTM_NEWLINK and len(body) >= rt.IFINFOMSG.size:
            link = rt.decode_link(body)
            previous = self._states.get(link.index)
            self._states[link.index] = (link.up, link.running)
            return previous != (link.up, link.running)  # a new link counts too
        if kind == rt.RTM_DELLINK and len(body) >= rt.IFINFOMSG.size:
            index = rt.IFINFOMSG.unpack_from(body)[2]
            return self._states.pop(index, None) is not None
        if kind in (rt.RTM_NEWROUTE, rt.RTM_DELROUTE) and len(body) >= rt.RTMSG.size:
            family, dst_len, _src_len, _tos, table = rt.RTMSG.unpack_from(body)[:5]
            return bool(family == socket.AF_INET and dst_len == 0
                        and table == rt.RT_TABLE_MAIN)
        return False
