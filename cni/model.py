"""The CNI plugin's pure logic: requests, attachments, results and what GC removes.

Everything the server decides without touching the kernel or the disk lives here as
functions from values to frozen values, so it is tested without root:

- `parse_request` turns the shim's request into a validated `CniRequest`: everything an
  ADD will use is checked here, before anything is allocated or wired;
- `compute_host_ifname` and `compute_host_mac` name a pod's host-side veth and give it
  its MAC address, both derived from the attachment (container id, ifname), and
  `HostLinkClaim` recognises that veth by them: an interface whose name matches but whose
  MAC does not belongs to someone else and is never replaced or deleted;
- `compute_result` builds the spec's Result for the requested cniVersion, appending to a
  `prevResult` when meshgress is not first in a chain;
- `parse_valid_attachments` and `plan_gc` decide which allocations and host interfaces a
  GC removes.

Purely computational, no side effects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cni import protocol as p
from meshgress.kernel_ids import POD_GATEWAY_IPV4, POD_HOST_VETH_PREFIX

HOST_IFNAME_HASH_CHARS = 11
"""15-byte interface names leave 12 characters after the 3-character prefix; 11 hex chars
(44 bits) keep a collision among a node's pods below one in a billion."""


@dataclass(frozen=True, order=True)
class AttachmentKey:
    """What identifies one attachment to the network (CNI spec: container id + ifname)."""

    container_id: str
    ifname: str


@dataclass(frozen=True)
class PodAttachment:
    """A pod wired into the network, as the pod-ready hook and the agent see it."""

    container_id: str
    ifname: str
    netns: str
    namespace: str | None
    name: str | None
    ip: IPv4Address
    host_ifname: str

    @property
    def key(self) -> AttachmentKey:
        return AttachmentKey(self.container_id, self.ifname)


@dataclass(frozen=True)
class CniRequest:
    """A validated request from the shim."""

    command: str
    container_id: str
    ifname: str
    netns: str
    args: Mapping[str, str]
    config: Mapping[str, Any]
    cni_version: str
    cni_path: str = ""

    @property
    def key(self) -> AttachmentKey:
        return AttachmentKey(self.container_id, self.ifname)

    @property
    def pod_namespace(self) -> str | None:
        return self.args.get("K8S_POD_NAMESPACE") or None

    @property
    def pod_name(self) -> str | None:
        return self.args.get("K8S_POD_NAME") or None

    @property
    def prev_result(self) -> Mapping[str, Any] | None:
        prev = self.config.get("prevResult")
        return prev if isinstance(prev, Mapping) else None


@dataclass(frozen=True)
class HostLinkClaim:
    """How one attachment recognises its host veth among the node's interfaces.

    By name and MAC: both are derived from the attachment (`compute_host_ifname`,
    `compute_host_mac`) with independent hashes, so another attachment's veth that got the
    same name (44 bits) almost surely (46 more bits) has another MAC, and so does anything
    else that happens to carry the name. The MAC is set in the same request that creates
    the veth, so there is no moment at which our veth exists without it. `by_name`: the
    name alone suffices; for a veth an earlier meshgress version made (with a random MAC)
    under the name its allocation records.
    """

    name: str
    mac: str
    by_name: bool = False

    def owns(self, name: str, mac: str, kind: str | None) -> bool:
        return (name == self.name and kind == "veth"
                and (self.by_name or mac.lower() == self.mac))


@dataclass(frozen=True)
class WiringPlan:
    """What the apply layer builds for one pod: both veth ends, address, routes."""

    host_ifname: str
    pod_ifname: str
    ip: IPv4Address
    gateway: IPv4Address
    host_mac: str
    pod_mac: str
    mtu: int | None = None
    host_claim_by_name: bool = False
    """The host veth's name is one an earlier version recorded (see HostLinkClaim)."""

    @property
    def host_claim(self) -> HostLinkClaim:
        return HostLinkClaim(self.host_ifname, self.host_mac, self.host_claim_by_name)


@dataclass(frozen=True)
class GcPlan:
    """What a GC removes: allocations (by key) and host interfaces (by name)."""

    release: tuple[AttachmentKey, ...] = ()
    delete_links: tuple[str, ...] = ()


def _attachment_digest(purpose: str, container_id: str, ifname: str) -> bytes:
    """sha256 of an unambiguous encoding of the attachment: each part prefixed with its
    length, so no two (container id, ifname) pairs share an input, whatever they contain
    ('abc' + 'eth0' and 'abce' + 'th0' are different attachments)."""
    text = f"{purpose}:{len(container_id)}:{container_id}:{len(ifname)}:{ifname}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def compute_host_ifname(container_id: str, ifname: str) -> str:
    """`mgc` + 11 hex chars of a hash of the attachment: stable, distinct, <= 15 bytes."""
    digest = _attachment_digest("host-ifname", container_id, ifname)
    return POD_HOST_VETH_PREFIX + digest.hex()[:HOST_IFNAME_HASH_CHARS]


def compute_host_mac(container_id: str, ifname: str) -> str:
    """The host veth's MAC: locally administered unicast, from a hash of the attachment
    independent of the name's (what `HostLinkClaim` recognises the veth by)."""
    return compute_mac(_attachment_digest("host-mac", container_id, ifname))


def compute_host_link_claim(key: AttachmentKey, recorded_ifname: str = "") -> HostLinkClaim:
    """The claim on the veth the attachment uses: the name its allocation records (claimed
    by name alone if it is not this version's hash) or else its hash's."""
    own = HostLinkClaim(compute_host_ifname(key.container_id, key.ifname),
                        compute_host_mac(key.container_id, key.ifname))
    if recorded_ifname and recorded_ifname != own.name:
        return HostLinkClaim(recorded_ifname, own.mac, by_name=True)
    return own


def compute_host_link_claims(key: AttachmentKey, recorded_ifname: str = ""
                             ) -> tuple[HostLinkClaim, ...]:
    """The host veths that may be this attachment's: the one named by its hash and, if its
    allocation records another name (an earlier version's hash), that one by name."""
    own = compute_host_link_claim(key)
    recorded = compute_host_link_claim(key, recorded_ifname)
    return (own,) if recorded == own else (own, recorded)


def compute_mac(seed: bytes) -> str:
    """A locally administered unicast MAC address from 6 (random) bytes."""
    if len(seed) < 6:
        raise ValueError("a MAC address needs 6 bytes")
    first = (seed[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *seed[1:6]))


def parse_request(raw: Mapping[str, Any]) -> CniRequest:
    """Validate the shim's request; raise CniError with the spec's code on bad input."""
    command = raw.get("command")
    if command not in p.COMMANDS or command == "VERSION":
        raise p.CniError(p.ERR_INVALID_ENV, f"unsupported CNI_COMMAND {command!r}")
    stdin = raw.get("stdin")
    if not isinstance(stdin, str):
        raise p.CniError(p.ERR_DECODE, "request has no network configuration")
    config = parse_config(stdin)
    version = p.check_version(command, config.get("cniVersion"))
    fields = {}
    for name in ("containerID", "ifname", "netns", "args", "path"):
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise p.CniError(p.ERR_INVALID_ENV, f"request field {name} is not a string")
        fields[name] = value
    env_names = {"containerID": "CNI_CONTAINERID", "ifname": "CNI_IFNAME", "netns": "CNI_NETNS"}
    for env_name in p.REQUIRED_ENV[command]:
        field_name = next(k for k, v in env_names.items() if v == env_name)
        if not fields[field_name]:
            raise p.CniError(p.ERR_INVALID_ENV, f"{env_name} must be set for {command}")
    # The shim forwards invocations unchecked, so this mirrors its `validate`, in its order.
    p.check_env_sizes({"CNI_COMMAND": command, "CNI_CONTAINERID": fields["containerID"],
                       "CNI_IFNAME": fields["ifname"], "CNI_NETNS": fields["netns"],
                       "CNI_ARGS": fields["args"], "CNI_PATH": fields["path"]})
    if fields["containerID"] or command in ("ADD", "CHECK", "DEL"):
        p.check_container_id(fields["containerID"])
    if fields["ifname"] or command in ("ADD", "CHECK", "DEL"):
        p.check_ifname(fields["ifname"])
    p.check_netns_path(fields["netns"])
    args = p.parse_cni_args(fields["args"])
    p.check_pod_identity(args)
    check_config_fields(config)
    return CniRequest(
        command=command,
        container_id=fields["containerID"],
        ifname=fields["ifname"],
        netns=fields["netns"],
        args=args,
        config=config,
        cni_version=version,
        cni_path=fields["path"],
    )


def parse_config(stdin: str) -> dict[str, Any]:
    """The network configuration as a JSON object, of bounded size and nesting."""
    if len(stdin) > p.MAX_CONFIG:  # characters: at least as many bytes
        raise p.CniError(p.ERR_INVALID_CONFIG,
                         f"network configuration is more than {p.MAX_CONFIG} bytes")
    try:
        config = json.loads(stdin)
    except RecursionError:
        raise p.CniError(p.ERR_DECODE, "failed to decode the network configuration",
                         "JSON nested too deeply to decode") from None
    except ValueError as exc:
        raise p.CniError(
            p.ERR_DECODE, "failed to decode the network configuration", str(exc)
        ) from None
    if not isinstance(config, dict):
        raise p.CniError(p.ERR_INVALID_CONFIG, "network configuration is not a JSON object")
    p.check_json_depth(config)
    return config


def _config_error(message: str) -> p.CniError:
    return p.CniError(p.ERR_INVALID_CONFIG, message)


def _check_string_list(value: object, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _config_error(f"{where} must be a list of strings, not {_brief(value)}")


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_dns(value: object, where: str) -> None:
    """The spec's DNS object: nameservers, search, options (lists of strings), domain."""
    if not isinstance(value, Mapping):
        raise _config_error(f"{where} must be an object, not {_brief(value)}")
    for key in ("nameservers", "search", "options"):
        if key in value:
            _check_string_list(value[key], f"{where}.{key}")
    if "domain" in value and not isinstance(value["domain"], str):
        raise _config_error(f"{where}.domain must be a string, not {_brief(value['domain'])}")


def check_config_fields(config: Mapping[str, Any]) -> None:
    """The configuration keys meshgress uses, checked before anything is done with them:
    mtu, dns, and the prevResult an ADD appends to (lists of objects, a DNS object)."""
    mtu = config.get("mtu")
    if mtu is not None and (
        isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535
    ):
        raise _config_error(f"'mtu' must be an integer in 68..65535, not {_brief(mtu)}")
    if config.get("dns") is not None:
        check_dns(config["dns"], "'dns'")
    if "prevResult" not in config:
        return
    prev = config["prevResult"]
    if not isinstance(prev, Mapping):
        raise _config_error(f"'prevResult' must be an object, not {_brief(prev)}")
    for key in ("interfaces", "ips", "routes"):
        entries = prev.get(key)
        if entries is not None and (
            not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries)
        ):
            raise _config_error(f"prevResult.{key} must be a list of objects, not "
                                f"{_brief(entries)}")
    if prev.get("dns") is not None:
        check_dns(prev["dns"], "prevResult.dns")


def compute_wiring_plan(
    attachment: PodAttachment, pod_mac: str, mtu: int | None = None
) -> WiringPlan:
    """Host MAC derived from the attachment (its claim); a name other than this version's
    hash is one an earlier version recorded, claimed by name."""
    claim = compute_host_link_claim(attachment.key, attachment.host_ifname)
    return WiringPlan(
        host_ifname=claim.name,
        pod_ifname=attachment.ifname,
        ip=attachment.ip,
        gateway=IPv4Address(POD_GATEWAY_IPV4),
        host_mac=claim.mac,
        pod_mac=pod_mac,
        mtu=mtu,
        host_claim_by_name=claim.by_name,
    )


def compute_result(
    cni_version: str,
    plan: WiringPlan,
    sandbox: str,
    prev_result: Mapping[str, Any] | None = None,
    dns: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec's Result for `cni_version`, appended to `prev_result` if there is one.

    interfaces: the host veth (no sandbox) then the pod interface (sandbox = netns path);
    ips: the pod's /32 with the link-local gateway, pointing at the pod interface;
    routes: the default route via that gateway. 0.4.0 results carry ips[].version.
    """
    prev = dict(prev_result) if prev_result else {}
    interfaces = [dict(i) for i in prev.get("interfaces") or [] if isinstance(i, Mapping)]
    host_if: dict[str, Any] = {"name": plan.host_ifname, "mac": plan.host_mac}
    pod_if: dict[str, Any] = {"name": plan.pod_ifname, "mac": plan.pod_mac, "sandbox": sandbox}
    if plan.mtu is not None and (p.parse_version(cni_version) or (0, 0, 0)) >= (1, 1, 0):
        host_if["mtu"] = plan.mtu
        pod_if["mtu"] = plan.mtu
    interfaces += [host_if, pod_if]
    ip_entry: dict[str, Any] = {
        "address": f"{plan.ip}/32",
        "gateway": str(plan.gateway),
        "interface": len(interfaces) - 1,
    }
    if cni_version == "0.4.0":
        ip_entry = {"version": "4", **ip_entry}
    ips = [dict(i) for i in prev.get("ips") or [] if isinstance(i, Mapping)] + [ip_entry]
    routes = [dict(r) for r in prev.get("routes") or [] if isinstance(r, Mapping)]
    routes.append({"dst": "0.0.0.0/0", "gw": str(plan.gateway)})
    result: dict[str, Any] = {
        "cniVersion": cni_version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dict(prev.get("dns") or dns or {}),
    }
    return result


def compute_check_problems(
    request: CniRequest, ip: IPv4Address, host_ifname: str
) -> tuple[str, ...]:
    """Differences between the runtime's prevResult and the allocation, if any."""
    prev = request.prev_result
    if prev is None:
        return ()
    problems = []
    interfaces = prev.get("interfaces") or []
    pod_indexes = [
        n for n, i in enumerate(interfaces)
        if isinstance(i, Mapping) and i.get("name") == request.ifname and i.get("sandbox")
    ]
    if not pod_indexes:
        problems.append(f"prevResult has no interface {request.ifname} in a sandbox")
    if not any(isinstance(i, Mapping) and i.get("name") == host_ifname for i in interfaces):
        problems.append(f"prevResult has no host interface {host_ifname}")
    addresses = {
        str(i.get("address")) for i in prev.get("ips") or [] if isinstance(i, Mapping)
    }
    if f"{ip}/32" not in addresses:
        problems.append(f"prevResult does not list the allocated address {ip}/32")
    return tuple(problems)


def parse_valid_attachments(config: Mapping[str, Any]) -> frozenset[AttachmentKey]:
    """The GC's keep-list: `cni.dev/valid-attachments` (spec 1.1) or `cni.dev/attachments`."""
    raw = config.get("cni.dev/valid-attachments")
    if raw is None:
        raw = config.get("cni.dev/attachments")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise p.CniError(p.ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
    keys = set()
    for entry in raw:
        if not isinstance(entry, Mapping):
            raise p.CniError(p.ERR_INVALID_CONFIG, f"invalid attachment entry {entry!r}")
        container_id, ifname = entry.get("containerID"), entry.get("ifname")
        if not isinstance(container_id, str) or not isinstance(ifname, str):
            raise p.CniError(
                p.ERR_INVALID_CONFIG,
                f"attachment entry {entry!r} needs string containerID and ifname",
            )
        keys.add(AttachmentKey(container_id, ifname))
    return frozenset(keys)


def plan_gc(
    valid: Iterable[AttachmentKey],
    allocated: Iterable[AttachmentKey],
    host_links: Iterable[str],
    recorded_ifnames: Mapping[AttachmentKey, str] | None = None,
) -> GcPlan:
    """Release allocations not in `valid`; delete prefixed host links no valid one owns.

    A valid attachment owns the link named by its hash and the one its allocation records
    (`recorded_ifnames`: an earlier version may have named it differently)."""
    valid_set = set(valid)
    recorded = recorded_ifnames or {}
    keep_links = {claim.name for k in valid_set
                  for claim in compute_host_link_claims(k, recorded.get(k, ""))}
    release = tuple(sorted(k for k in set(allocated) if k not in valid_set))
    delete = tuple(
        sorted(
            name for name in set(host_links)
            if name.startswith(POD_HOST_VETH_PREFIX) and name not in keep_links
        )
    )
    return GcPlan(release=release, delete_links=delete)


def compute_pod_cidr_usable(cidr: IPv4Network) -> tuple[int, int]:
    """First and last usable address (as ints): network/broadcast skipped below /31."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    if cidr.prefixlen <= 30:
        return first + 1, last - 1
    return first, last


def compute_next_free(
    cidr: IPv4Network, taken: Iterable[IPv4Address | int], after: IPv4Address | None = None
) -> IPv4Address | None:
    """The next free usable address after `after` (wrapping), or None if all are taken.

    Starting after the last allocation, as host-local does, delays the reuse of a freed
    address, so a stale conntrack entry or a peer's cache rarely meets a new pod.
    """
    return compute_next_free_in(cidr, {int(a) for a in taken}, after)


def compute_next_free_in(
    cidr: IPv4Network, taken: AbstractSet[int], after: IPv4Address | None = None
) -> IPv4Address | None:
    """`compute_next_free` for a set of ints used as it is (the IPAM's, on every ADD:
    copying it would cost more than the search)."""
    first, last = compute_pod_cidr_usable(cidr)
    size = last - first + 1
    start = first
    if after is not None and first <= int(after) <= last:
        start = int(after) + 1 if int(after) < last else first
    for offset in range(size):
        candidate = first + (start - first + offset) % size
        if candidate not in taken:
            return IPv4Address(candidate)
    return None
