"""The agent's side of CNI: what ADD, DEL, CHECK, GC and STATUS mean for meshgress.

`CniService` joins the pieces: it validates a request (`cni.model`), allocates the pod's
address (`cni.ipam`), wires the pod (`cni.wiring`), lets the agent program the pod's
egress steering through `pod_ready_hook` before the runtime hears back, and answers with
the spec's Result or error. The transport (`cni.server`) only moves bytes.

Guarantees:
- ADD either completes (wiring, hook) or undoes everything it did and reports an error;
  it is idempotent per (container id, ifname): the same address, freshly wired. The whole
  request, the answer included, is checked and computed before the kernel is touched.
  When the shim gave up waiting (its timeout passed, the runtime killed it), the ADD is
  undone: the server's `Caller` tells, before each step, whether the shim is still there,
  and at the end whether it acknowledged the answer (see `cni.plugin`'s wire format).
- Nothing that is not this attachment's is harmed: the node's own network namespace is
  refused as a pod's, an existing interface or route is replaced or deleted only when it
  is recognisably this attachment's (`cni.model.HostLinkClaim`, `cni.wiring`).
- DEL never needs the container's namespace (deleting the host veth removes its peer) and
  succeeds for unknown or half-built attachments; it removes the wiring before calling
  `pod_removed_hook` and releasing the address, so no packet of the pod leaves unsteered
  and no address is reused while its old veth still exists.
- GC runs alone (a shared/exclusive lock), so it never removes an ADD in progress.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Protocol

from cni import protocol as p
from cni.ipam import Allocation, Ipam
from cni.model import (
    AttachmentKey,
    CniRequest,
    HostLinkClaim,
    PodAttachment,
    WiringPlan,
    compute_check_problems,
    compute_host_ifname,
    compute_host_link_claim,
    compute_host_link_claims,
    compute_mac,
    compute_result,
    compute_wiring_plan,
    parse_request,
    parse_valid_attachments,
    plan_gc,
)
from cni.wiring import HostLinkExists, NetlinkWiring, Wiring

log = logging.getLogger("meshgress.cni")

PodHook = Callable[[PodAttachment], None]
_KEY_LOCK_STRIPES = 64


class Caller(Protocol):
    """The shim waiting for a request's answer, as the transport sees it."""

    def gave_up(self) -> bool:
        """True once the shim is gone (it hung up: timed out or killed)."""
        ...

    def confirm(self, stdout: str) -> bool:
        """Send the success answer; True once the shim acknowledged it, False if it hung
        up first. Called by ADD while it still holds the attachment, so it can undo."""
        ...


class _GaveUp(p.CniError):
    """The shim stopped waiting: what the ADD did is undone, and nobody hears of it."""

    def __init__(self, step: str) -> None:
        super().__init__(p.ERR_TRY_AGAIN_LATER,
                         f"the plugin stopped waiting for the answer {step}; ADD undone")


class _SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _attachment(allocation: Allocation) -> PodAttachment:
    return PodAttachment(
        container_id=allocation.key.container_id,
        ifname=allocation.key.ifname,
        netns=allocation.netns,
        namespace=allocation.namespace,
        name=allocation.name,
        ip=allocation.ip,
        host_ifname=allocation.host_ifname
        or compute_host_ifname(allocation.key.container_id, allocation.key.ifname),
    )


class CniService:
    """CNI command semantics for one node.

    pod_cidr: the node's pod CIDR (from the datastore); None until it is known, during
        which STATUS reports "not available" (50) and ADD "try again later" (11).
    state_dir: where allocations persist (`<state_dir>/ipam`).
    pod_ready_hook: called with the PodAttachment after the pod is wired and before ADD
        replies; if it raises, ADD fails (code 103) and is undone.
    pod_removed_hook: called after a pod's wiring is removed by DEL or GC (errors logged).
    wiring: the kernel adapter (default: netlink in the calling thread's namespace).
    own_gateway: add the pods' gateway 169.254.1.1/32 to the node's loopback on open().
    mtu: default MTU of pod veths (a network configuration's "mtu" overrides it).
    """

    def __init__(
        self,
        pod_cidr: IPv4Network | None,
        state_dir: Path | str,
        pod_ready_hook: PodHook | None = None,
        *,
        pod_removed_hook: PodHook | None = None,
        wiring: Wiring | None = None,
        own_gateway: bool = True,
        mtu: int | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pod_ready_hook = pod_ready_hook
        self.pod_removed_hook = pod_removed_hook
        self.own_gateway = own_gateway
        self.mtu = mtu
        self._wiring: Wiring = wiring if wiring is not None else NetlinkWiring()
        self._random_bytes = random_bytes
        self._ipam: Ipam | None = None
        self._ipam_dir = self.state_dir / "ipam"
        self._gc_lock = _SharedExclusiveLock()
        self._key_locks = [threading.Lock() for _ in range(_KEY_LOCK_STRIPES)]
        self._open = False
        self._open_lock = threading.Lock()
        self.requests_total: Counter[tuple[str, int]] = Counter()
        """(command, exit code) -> count; code 0 is success."""
        if pod_cidr is not None:
            self.set_pod_cidr(pod_cidr)

    # --- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Open the kernel adapter and prepare the node; idempotent. serve() calls it."""
        with self._open_lock:
            if self._open:
                return
            self._wiring.open()
            self._wiring.prepare_node(self.own_gateway)
            self._open = True

    def close(self) -> None:
        with self._open_lock:
            if self._open:
                self._wiring.close()
                self._open = False
            if self._ipam is not None:
                self._ipam.close()

    def set_pod_cidr(self, pod_cidr: IPv4Network) -> None:
        """Set (or change) the CIDR new pods get addresses from; existing ones stay."""
        old = self._ipam
        self._ipam = Ipam(pod_cidr, self._ipam_dir)
        if old is not None:
            old.close()

    @property
    def pod_cidr(self) -> IPv4Network | None:
        return self._ipam.cidr if self._ipam is not None else None

    # --- dispatch ---------------------------------------------------------------------

    def handle(self, raw: Mapping[str, Any], netns_fd: int | None = None,
               caller: Caller | None = None) -> tuple[int, str]:
        """Answer one shim request: (exit code, stdout text).

        With a `caller`, a successful ADD is answered through `caller.confirm` (and kept
        only if the shim acknowledged it); the transport sends the returned answer only
        if `confirm` was not called. Without one (tests, embedding), the answer is
        returned and the ADD kept.
        """
        command = raw.get("command")
        command = command if command in p.COMMANDS else "invalid"  # a bounded metric label
        version: str | None = None
        try:
            request = parse_request(raw)
            version = request.cni_version
            output = self._dispatch(request, netns_fd, caller)
        except p.CniError as exc:
            self.requests_total[(command, exc.code)] += 1
            log.info("CNI %s %.64s failed: code %d: %s %.512s", command,
                     str(raw.get("containerID", "")), exc.code, exc.msg, exc.details)
            return 1, exc.to_json(version or _requested_version(raw))
        except Exception as exc:
            self.requests_total[(command, p.ERR_INTERNAL)] += 1
            log.exception("CNI %s failed unexpectedly", command)
            error = p.CniError(p.ERR_INTERNAL, f"{command} failed: {exc}")
            return 1, error.to_json(version or _requested_version(raw))
        self.requests_total[(command, 0)] += 1
        return 0, output

    def _dispatch(self, request: CniRequest, netns_fd: int | None,
                  caller: Caller | None = None) -> str:
        if request.command == "ADD":
            return self.add(request, netns_fd, caller)
        if request.command == "DEL":
            self.delete(request)
        elif request.command == "CHECK":
            self.check(request, netns_fd)
        elif request.command == "GC":
            self.gc(request)
        elif request.command == "STATUS":
            self.status()
        return ""

    @contextmanager
    def _attachment_lock(self, key: AttachmentKey) -> Iterator[None]:
        with self._gc_lock.shared(), self._key_locks[hash(key) % _KEY_LOCK_STRIPES]:
            yield

    def _require_ready(self) -> Ipam:
        if not self._open:
            raise p.CniError(p.ERR_TRY_AGAIN_LATER, "the agent's CNI service is starting")
        if self._ipam is None:
            raise p.CniError(p.ERR_TRY_AGAIN_LATER, "this node's pod CIDR is not known yet")
        return self._ipam

    @contextmanager
    def _any_ipam(self) -> Iterator[Ipam | None]:
        """The allocations on disk, even before the pod CIDR is known (for DEL and GC)."""
        if self._ipam is not None or not self._ipam_dir.exists():
            yield self._ipam
            return
        ipam = _ReadOnlyIpam(self._ipam_dir)
        try:
            yield ipam
        finally:
            ipam.close()

    # --- commands ---------------------------------------------------------------------

    def add(self, request: CniRequest, netns_fd: int | None,
            caller: Caller | None = None) -> str:
        """Wire the attachment; return the Result as JSON text (see `handle` for `caller`)."""
        if netns_fd is None:
            raise p.CniError(p.ERR_INVALID_ENV, "ADD needs the container's network namespace")
        ipam = self._require_ready()
        self._refuse_node_namespace(request, netns_fd)
        problem = self._wiring.antispoof_problem()
        if problem:
            raise p.CniError(p.ERR_ANTISPOOF_UNAVAILABLE, "refusing to wire pods", problem)
        with self._attachment_lock(request.key):
            _check_caller(caller, "before the address was allocated")  # e.g. queued too long
            allocation, _created = ipam.allocate(
                request.key, namespace=request.pod_namespace, name=request.pod_name,
                netns=request.netns,
            )
            attachment = _attachment(allocation)
            plan = compute_wiring_plan(attachment, compute_mac(self._random_bytes(6)),
                                       request.config.get("mtu", self.mtu))
            hooked = False
            try:
                output = _encode_result(request, plan)
                _check_caller(caller, "before the pod was wired")
                self._wire(plan, netns_fd)
                _check_caller(caller, "before the pod-ready hook")
                if self.pod_ready_hook is not None:
                    hooked = True
                    self._call_ready_hook(attachment)
                if caller is not None and not caller.confirm(output):
                    raise _GaveUp("before it acknowledged the answer")
            except Exception as exc:
                if hooked:
                    self._call_removed_hook(attachment)
                self._undo_add(attachment, plan)
                if isinstance(exc, _GaveUp):
                    log.warning("CNI ADD %s/%s %s: %s", attachment.namespace, attachment.name,
                                request.container_id[:12], exc.msg)
                if isinstance(exc, OSError):
                    raise p.CniError(
                        p.ERR_WIRING,
                        f"wiring {request.ifname} of container {request.container_id} failed",
                        str(exc),
                    ) from None
                raise
            log.info("CNI ADD %s/%s %s -> %s on %s", attachment.namespace, attachment.name,
                     request.container_id[:12], attachment.ip, attachment.host_ifname)
            return output

    def _refuse_node_namespace(self, request: CniRequest, netns_fd: int) -> None:
        if self._wiring.is_node_namespace(netns_fd):
            raise p.CniError(
                p.ERR_INVALID_ENV,
                f"CNI_NETNS {request.netns} is the node's own network namespace, not a "
                "container's: refusing to wire it",
            )

    def _wire(self, plan: WiringPlan, netns_fd: int) -> None:
        """add_pod; an interface of the host veth's name is replaced only if it is this
        attachment's (left by an earlier ADD of it), never if it is anyone else's."""
        try:
            self._wiring.add_pod(plan, netns_fd)
            return
        except HostLinkExists as exists:
            link = exists.link
            if not plan.host_claim.owns(link.name, link.mac, link.kind):
                raise p.CniError(
                    p.ERR_WIRING,
                    f"host interface {link.name} already exists and is not this "
                    "attachment's: meshgress leaves it alone",
                    f"a {link.kind} with MAC {link.mac}; this attachment's has MAC "
                    f"{plan.host_mac}",
                ) from None
            self._wiring.delete_host_link(link)
        self._wiring.add_pod(plan, netns_fd)

    def _call_ready_hook(self, attachment: PodAttachment) -> None:
        assert self.pod_ready_hook is not None
        try:
            self.pod_ready_hook(attachment)
        except Exception as exc:
            log.warning("pod-ready hook failed for %s: %s", attachment, exc)
            raise p.CniError(
                p.ERR_HOOK_FAILED,
                f"pod-ready hook failed for pod {attachment.namespace}/{attachment.name}",
                str(exc),
            ) from None

    def _undo_add(self, attachment: PodAttachment, plan: WiringPlan) -> None:
        try:
            self._remove_host_link(plan.host_claim)
        except OSError as exc:
            log.error("undoing ADD: cannot delete %s: %s", attachment.host_ifname, exc)
            return  # keep the allocation: the address must not be reused while wired
        if self._ipam is not None:
            self._ipam.release(attachment.key)

    def _remove_host_link(self, claim: HostLinkClaim) -> bool:
        """Delete the interface `claim` names if it is the claimant's; True if deleted."""
        link = self._wiring.host_link(claim.name)
        if link is None:
            return False
        if not claim.owns(link.name, link.mac, link.kind):
            log.warning("CNI: not deleting %s: it is not this attachment's (a %s with MAC "
                        "%s, expected %s)", link.name, link.kind, link.mac, claim.mac)
            return False
        return self._wiring.delete_host_link(link)

    def _call_removed_hook(self, attachment: PodAttachment) -> None:
        if self.pod_removed_hook is None:
            return
        try:
            self.pod_removed_hook(attachment)
        except Exception:
            log.exception("pod-removed hook failed for %s", attachment)

    def delete(self, request: CniRequest) -> None:
        key = request.key
        with self._attachment_lock(key), self._any_ipam() as ipam:
            allocation = ipam.lookup(key) if ipam is not None else None
            claims = compute_host_link_claims(key, allocation.host_ifname if allocation else "")
            if self._open:
                for claim in claims:
                    try:
                        self._remove_host_link(claim)
                    except OSError as exc:
                        raise p.CniError(
                            p.ERR_WIRING, f"cannot delete host interface {claim.name}", str(exc)
                        ) from None
            elif allocation is not None:
                raise p.CniError(p.ERR_TRY_AGAIN_LATER, "the agent's CNI service is starting")
            if allocation is not None:
                self._call_removed_hook(_attachment(allocation))
                if ipam is not None:
                    ipam.release(key)

    def check(self, request: CniRequest, netns_fd: int | None) -> None:
        if netns_fd is None:
            raise p.CniError(p.ERR_INVALID_ENV, "CHECK needs the container's network namespace")
        ipam = self._require_ready()
        self._refuse_node_namespace(request, netns_fd)
        with self._attachment_lock(request.key):
            allocation = ipam.lookup(request.key)
            if allocation is None:
                raise p.CniError(
                    p.ERR_UNKNOWN_CONTAINER,
                    f"no attachment for container {request.container_id} interface "
                    f"{request.ifname}",
                )
            attachment = _attachment(allocation)
            claim = compute_host_link_claim(request.key, allocation.host_ifname)
            problems = list(compute_check_problems(request, attachment.ip, attachment.host_ifname))
            problems += self._wiring.check_pod(claim, request.ifname, attachment.ip, netns_fd)
        if problems:
            raise p.CniError(
                p.ERR_CHECK_FAILED,
                f"container {request.container_id} interface {request.ifname}: {problems[0]}",
                "; ".join(problems),
            )

    def gc(self, request: CniRequest) -> None:
        valid = parse_valid_attachments(request.config)
        if not self._open:
            raise p.CniError(p.ERR_TRY_AGAIN_LATER, "the agent's CNI service is starting")
        with self._gc_lock.exclusive(), self._any_ipam() as ipam:
            allocations = {}
            if ipam is not None:
                ipam.prune()
                allocations = {a.key: a for a in ipam.allocations()}
            recorded = {key: a.host_ifname for key, a in allocations.items()}
            plan = plan_gc(valid, allocations, self._wiring.host_links(), recorded)
            for key in plan.release:
                attachment = _attachment(allocations[key])
                for claim in compute_host_link_claims(key, recorded[key]):
                    self._remove_host_link(claim)
                self._call_removed_hook(attachment)
                if ipam is not None:
                    ipam.release(key)
                log.info("CNI GC released %s (%s/%s)", attachment.ip, key.container_id[:12],
                         key.ifname)
            for name in plan.delete_links:
                link = self._wiring.host_link(name)
                if link is not None and self._wiring.delete_host_link(link):
                    log.info("CNI GC deleted stale host interface %s", name)

    def status(self) -> None:
        if not self._open:
            raise p.CniError(p.ERR_NOT_AVAILABLE, "the agent's CNI service is not initialised")
        if self._ipam is None:
            raise p.CniError(p.ERR_NOT_AVAILABLE, "this node's pod CIDR is not known yet")
        problem = self._wiring.antispoof_problem()
        if problem:
            raise p.CniError(p.ERR_NOT_AVAILABLE, "anti-spoofing unavailable", problem)
        if not os.access(self._ipam_dir, os.W_OK):
            raise p.CniError(p.ERR_NOT_AVAILABLE, f"state directory {self._ipam_dir} not writable")


class _ReadOnlyIpam(Ipam):
    """Allocations on disk when no pod CIDR is known: lookup/release/list, no allocate."""

    def __init__(self, directory: Path) -> None:
        super().__init__(IPv4Network("0.0.0.0/30"), directory)

    def allocate(self, *args: Any, **kwargs: Any) -> tuple[Allocation, bool]:
        raise p.CniError(p.ERR_TRY_AGAIN_LATER, "this node's pod CIDR is not known yet")


def _check_caller(caller: Caller | None, step: str) -> None:
    if caller is not None and caller.gave_up():
        raise _GaveUp(step)


def _encode_result(request: CniRequest, plan: WiringPlan) -> str:
    """The ADD's answer, computed before anything is wired: whatever it could fail on
    fails while there is nothing to undo but the allocation."""
    result = compute_result(request.cni_version, plan, request.netns, request.prev_result,
                            request.config.get("dns"))
    output = json.dumps(result)
    if len(output) > p.MAX_FRAME:
        raise p.CniError(p.ERR_INVALID_CONFIG,
                         f"the result would be {len(output)} bytes, more than the {p.MAX_FRAME} "
                         "the plugin accepts (an oversized prevResult?)")
    return output


def _requested_version(raw: Mapping[str, Any]) -> str:
    """The configuration's cniVersion, for error objects, even if the request is bad."""
    stdin = raw.get("stdin")
    if not isinstance(stdin, str) or len(stdin) > p.MAX_CONFIG:
        return p.LATEST_VERSION
    try:
        config = json.loads(stdin)
    except (ValueError, RecursionError):
        return p.LATEST_VERSION
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if isinstance(version, str) and version else p.LATEST_VERSION
