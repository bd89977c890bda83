"""The meshgress API types (EgressGateway, EgressPolicy) and the parsers that validate them.

Users write these objects (group `meshgress.io`, version `v1alpha1`, both cluster-scoped);
everything downstream — steering on the nodes, slot claiming on the gateways, `meshgress
explain` — works from the frozen values defined here, never from the raw documents. Parsing
is the single gate: `parse_egress_gateway` and `parse_egress_policy` accept any object at
all (a dict from the API server, a YAML file, garbage) and either return a fully defaulted,
validated model or raise `ValidationError` whose message names the field path and what is
wrong, ready to become a status condition and an Event. They never raise anything else.

Only what the spec says is modelled here (plus the metadata needed for status
`observedGeneration` and patches); runtime state such as who holds an IP slot belongs to
other types. `status` in an input document is ignored by the two parsers.

A typo never fails open: `parse_egress_gateway_in_effect` and
`parse_egress_policy_in_effect` say what *applies* of an object. That is its current
generation when it is valid; otherwise the last valid generation, which the status writer
(every gateway computes the same status) records in `status.acceptedSpec` next to its
`status.observedGeneration`. Keeping it in the object itself, rather than in any
process's memory, is what makes every process — node agents, gateways, `meshgress
explain`, and any of them restarted while the current spec is invalid — apply the same
generation. An object that was never valid while a status writer ran has nothing to fall
back to, and applies nothing.

Purely computational, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Generic, NamedTuple, TypeVar

from meshgress.config import ClusterConfig, IPNetwork
from meshgress.selectors import MATCH_EVERYTHING, LabelSelector, parse_label_selector
from meshgress.validation import (
    ROOT,
    ValidationError,
    child,
    expect_dns1123_subdomain,
    expect_int,
    expect_list,
    expect_mapping,
    expect_str,
    item,
    quote,
    reject_unknown_fields,
)

API_GROUP: Final = "meshgress.io"
API_VERSION: Final = f"{API_GROUP}/v1alpha1"
EGRESS_GATEWAY_KIND: Final = "EgressGateway"
EGRESS_POLICY_KIND: Final = "EgressPolicy"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

GATEWAY_NODE_LABEL: Final = "meshgress.io/gateway"
DEFAULT_GATEWAY_NODE_SELECTOR: Final = LabelSelector(match_labels=((GATEWAY_NODE_LABEL, "true"),))
"""Where gateway pods run when an EgressGateway names no nodeSelector."""

ALL_DESTINATIONS: Final[tuple[IPNetwork, ...]] = (
    ipaddress.IPv4Network("0.0.0.0/0"),
    ipaddress.IPv6Network("::/0"),
)
DEFAULT_PRIORITY: Final = 1000
MAX_PRIORITY: Final = 65535

HEALTH_INTERVAL_MS_RANGE: Final = (50, 10_000)
FAILURE_THRESHOLD_RANGE: Final = (1, 10)
INTERFACE_NAME_MAX_LENGTH: Final = 15  # IFNAMSIZ (16) minus the terminating NUL
MAX_EGRESS_IPS: Final = 126
"""At most this many egress IPs per gateway: the slot numbering has 126 numbers in all."""
MAX_CIDRS: Final = 256
"""At most this many entries in destinationCIDRs and in excludedCIDRs. The CRD has the same
bounds, which the API server needs to cost its validation rules."""

_ENVELOPE_FIELDS: Final = ("apiVersion", "kind", "metadata", "spec", "status")
_GATEWAY_SPEC_FIELDS: Final = (
    "egressIPs",
    "interface",
    "failurePolicy",
    "healthCheck",
    "nodeSelector",
)
_HEALTH_CHECK_FIELDS: Final = ("intervalMilliseconds", "timeoutMilliseconds", "failureThreshold")
_POLICY_SPEC_FIELDS: Final = (
    "gateway",
    "namespaceSelector",
    "podSelector",
    "destinationCIDRs",
    "excludedCIDRs",
    "priority",
)
_THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
_LIMITED_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


class FailurePolicy(StrEnum):
    """What happens to selected traffic when no slot of its gateway is healthy."""

    FAIL_CLOSED = "FailClosed"
    """Drop it: it never leaves with a source address the partner does not expect."""
    FAIL_OPEN = "FailOpen"
    """Let it leave through its node, as unselected traffic would."""


@dataclass(frozen=True)
class HealthCheck:
    """How nodes probe each gateway slot through its tunnel."""

    interval_ms: int = 100
    timeout_ms: int = 80
    """Always less than `interval_ms`, so probes never overlap."""
    failure_threshold: int = 3
    """Consecutive missed probes after which a slot is taken out of the buckets."""


@dataclass(frozen=True)
class EgressGateway:
    """A set of stable egress IPs and how the gateway pods that hold them behave.

    `egress_ips` keeps the user's order, because an IP's position is its slot number:
    slot leases, per-slot interfaces and routing tables are numbered by it, so reordering
    the list in the spec is a (disruptive) change, while appending is not.
    """

    name: str
    egress_ips: tuple[IPAddress, ...]
    interface: str | None = None
    """External interface on gateway nodes; None means the one holding the default route."""
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSED
    health_check: HealthCheck = HealthCheck()
    node_selector: LabelSelector = DEFAULT_GATEWAY_NODE_SELECTOR
    """Nodes that may host this gateway's pods; the empty selector means every node."""
    generation: int = 1
    resource_version: str | None = None


@dataclass(frozen=True)
class EgressPolicy:
    """Which pods' traffic, to which destinations, leaves through which EgressGateway.

    `destination_cidrs` and `excluded_cidrs` are sorted (IPv4 first, then by address and
    prefix length) so equal policies compare equal and rendered rules never flap.
    """

    name: str
    gateway: str
    """Name of the EgressGateway; it may not exist (yet), which is a status matter."""
    namespace_selector: LabelSelector
    """The empty selector means every namespace."""
    pod_selector: LabelSelector = MATCH_EVERYTHING
    """The empty selector (the default) means every pod in the selected namespaces."""
    destination_cidrs: tuple[IPNetwork, ...] = ALL_DESTINATIONS
    excluded_cidrs: tuple[IPNetwork, ...] = ()
    priority: int = DEFAULT_PRIORITY
    """Lower wins; equal-priority overlaps are a conflict reported in status."""
    generation: int = 1
    resource_version: str | None = None


ACCEPTED_SPEC_FIELD: Final = "acceptedSpec"
"""The status field holding the spec of generation `status.observedGeneration`: the last
generation the parser accepted, applied while the current one is invalid."""

_Model = TypeVar("_Model", EgressGateway, EgressPolicy)


@dataclass(frozen=True)
class InEffect(Generic[_Model]):
    """What applies of one object, and why."""

    value: _Model | None
    """The generation that applies: the current one when valid, else the last valid one
    (its `generation` says which), else None."""
    spec: Mapping[str, object] | None
    """The spec of `value` as written, for `status.acceptedSpec`."""
    rejected: ValidationError | None
    """Why the current generation does not apply; None when it does."""
    generation: int
    """The object's current metadata.generation."""

    @property
    def on_last_valid_generation(self) -> bool:
        return self.value is not None and self.rejected is not None


def parse_egress_gateway_in_effect(doc: object, cluster: ClusterConfig
                                   ) -> InEffect[EgressGateway]:
    """What applies of an EgressGateway document (see the module docstring). Never raises."""
    return _in_effect(doc, EGRESS_GATEWAY_KIND,
                      lambda candidate: parse_egress_gateway(candidate, cluster))


def parse_egress_policy_in_effect(doc: object) -> InEffect[EgressPolicy]:
    """What applies of an EgressPolicy document (see the module docstring). Never raises."""
    return _in_effect(doc, EGRESS_POLICY_KIND, parse_egress_policy)


def _in_effect(doc: object, kind: str, parse: Callable[[object], _Model]) -> InEffect[_Model]:
    obj: Mapping[str, object] = doc if isinstance(doc, Mapping) else {}
    raw_metadata = obj.get("metadata")
    metadata: Mapping[str, object] = raw_metadata if isinstance(raw_metadata, Mapping) else {}
    raw_generation = metadata.get("generation")
    generation = raw_generation if isinstance(raw_generation, int) \
        and not isinstance(raw_generation, bool) else 1
    try:
        value = parse(doc)
    except ValidationError as rejected:
        status = obj.get("status")
        accepted = status.get(ACCEPTED_SPEC_FIELD) if isinstance(status, Mapping) else None
        observed = status.get("observedGeneration") if isinstance(status, Mapping) else None
        if not isinstance(accepted, Mapping) or isinstance(observed, bool) \
                or not isinstance(observed, int) or not 0 < observed <= generation:
            return InEffect(None, None, rejected, generation)
        last_valid = {"apiVersion": API_VERSION, "kind": kind,
                      "metadata": {"name": metadata.get("name"), "generation": observed,
                                   "resourceVersion": metadata.get("resourceVersion")},
                      "spec": accepted}
        try:
            return InEffect(parse(last_valid), accepted, rejected, generation)
        except ValidationError:
            # Recorded under older rules that no longer hold: nothing valid to apply.
            return InEffect(None, None, rejected, generation)
    spec = obj.get("spec")
    return InEffect(value, spec if isinstance(spec, Mapping) else None, None, generation)


class _Metadata(NamedTuple):
    name: str
    generation: int
    resource_version: str | None


def parse_egress_gateway(doc: object, cluster: ClusterConfig) -> EgressGateway:
    """Validate an EgressGateway document and return it with defaults applied.

    `cluster` supplies the pod and service ranges, which no egress IP may fall inside.
    Raises ValidationError, and nothing else, for any invalid input.
    """
    metadata, spec = _parse_envelope(doc, EGRESS_GATEWAY_KIND)
    reject_unknown_fields(spec, _GATEWAY_SPEC_FIELDS, "spec")
    interface = spec.get("interface")
    node_selector = spec.get("nodeSelector")
    return EgressGateway(
        name=metadata.name,
        egress_ips=_parse_egress_ips(spec.get("egressIPs"), "spec.egressIPs", cluster),
        interface=None if interface is None else _parse_interface(interface, "spec.interface"),
        failure_policy=_parse_failure_policy(spec.get("failurePolicy"), "spec.failurePolicy"),
        health_check=_parse_health_check(spec.get("healthCheck"), "spec.healthCheck"),
        node_selector=(
            DEFAULT_GATEWAY_NODE_SELECTOR
            if node_selector is None
            else parse_label_selector(
                node_selector, "spec.nodeSelector", allow_match_expressions=False
            )
        ),
        generation=metadata.generation,
        resource_version=metadata.resource_version,
    )


def parse_egress_policy(doc: object) -> EgressPolicy:
    """Validate an EgressPolicy document and return it with defaults applied.

    `namespaceSelector` is required so that selecting every namespace is a deliberate
    choice: write `namespaceSelector: {}` for it. Raises ValidationError, and nothing
    else, for any invalid input.
    """
    metadata, spec = _parse_envelope(doc, EGRESS_POLICY_KIND)
    reject_unknown_fields(spec, _POLICY_SPEC_FIELDS, "spec")

    if spec.get("gateway") is None:
        raise ValidationError("spec.gateway", "required")
    gateway = expect_dns1123_subdomain(spec["gateway"], "spec.gateway")

    if spec.get("namespaceSelector") is None:
        raise ValidationError(
            "spec.namespaceSelector", "required; use {} to select every namespace"
        )
    namespace_selector = parse_label_selector(spec["namespaceSelector"], "spec.namespaceSelector")
    pod_selector = parse_label_selector(spec.get("podSelector"), "spec.podSelector")

    destinations = spec.get("destinationCIDRs")
    excluded = spec.get("excludedCIDRs")
    priority = spec.get("priority")
    return EgressPolicy(
        name=metadata.name,
        gateway=gateway,
        namespace_selector=namespace_selector,
        pod_selector=pod_selector,
        destination_cidrs=(
            ALL_DESTINATIONS
            if destinations is None
            else _parse_cidrs(destinations, "spec.destinationCIDRs", allow_empty=False)
        ),
        excluded_cidrs=(
            ()
            if excluded is None
            else _parse_cidrs(excluded, "spec.excludedCIDRs", allow_empty=True)
        ),
        priority=(
            DEFAULT_PRIORITY
            if priority is None
            else expect_int(priority, "spec.priority", 0, MAX_PRIORITY)
        ),
        generation=metadata.generation,
        resource_version=metadata.resource_version,
    )


def _parse_envelope(doc: object, kind: str) -> tuple[_Metadata, Mapping[str, object]]:
    """Check apiVersion, kind and metadata; return the metadata and the (unchecked) spec."""
    obj = expect_mapping(doc, ROOT)
    reject_unknown_fields(obj, _ENVELOPE_FIELDS, ROOT)

    if obj.get("apiVersion") is None:
        raise ValidationError("apiVersion", "required")
    api_version = expect_str(obj["apiVersion"], "apiVersion")
    if api_version != API_VERSION:
        raise ValidationError("apiVersion", f"must be {API_VERSION}, got {quote(api_version)}")

    if obj.get("kind") is None:
        raise ValidationError("kind", "required")
    actual_kind = expect_str(obj["kind"], "kind")
    if actual_kind != kind:
        raise ValidationError("kind", f"must be {kind}, got {quote(actual_kind)}")

    metadata = _parse_metadata(obj.get("metadata"), kind)
    if obj.get("spec") is None:
        raise ValidationError("spec", "required")
    return metadata, expect_mapping(obj["spec"], "spec")


def _parse_metadata(doc: object, kind: str) -> _Metadata:
    # Only the fields meshgress uses are checked; the API server adds many more (uid,
    # managedFields, labels, ...) and those are none of this parser's business.
    if doc is None:
        raise ValidationError("metadata", "required")
    metadata = expect_mapping(doc, "metadata")

    if metadata.get("name") is None:
        raise ValidationError("metadata.name", "required")
    name = expect_dns1123_subdomain(metadata["name"], "metadata.name")

    namespace = metadata.get("namespace")
    if namespace is not None and namespace != "":
        raise ValidationError("metadata.namespace", f"must not be set: {kind} is cluster-scoped")

    raw_generation = metadata.get("generation")
    generation = (
        1 if raw_generation is None else expect_int(raw_generation, "metadata.generation", 0)
    )
    raw_version = metadata.get("resourceVersion")
    resource_version = (
        None if raw_version is None else expect_str(raw_version, "metadata.resourceVersion")
    )
    return _Metadata(name, generation, resource_version)


def _parse_egress_ips(doc: object, field: str, cluster: ClusterConfig) -> tuple[IPAddress, ...]:
    if doc is None:
        raise ValidationError(field, "required")
    raw_ips = expect_list(doc, field)
    if not raw_ips:
        raise ValidationError(field, "must list at least one IP address")
    if len(raw_ips) > MAX_EGRESS_IPS:
        raise ValidationError(field, f"must list at most {MAX_EGRESS_IPS} IP addresses, "
                                     f"got {len(raw_ips)}")
    first_index: dict[IPAddress, int] = {}  # insertion-ordered: the user's order
    for i, raw in enumerate(raw_ips):
        ip = _parse_egress_ip(raw, item(field, i), cluster)
        if ip in first_index:
            raise ValidationError(
                item(field, i), f"{ip} is a duplicate of {item(field, first_index[ip])}"
            )
        first_index[ip] = i
    return tuple(first_index)


def _parse_egress_ip(doc: object, field: str, cluster: ClusterConfig) -> IPAddress:
    text = expect_str(doc, field)
    if "/" in text:
        raise ValidationError(field, f"{quote(text)} must be a single IP address, not a CIDR")
    if "%" in text:
        raise ValidationError(field, f"{quote(text)} must not carry a zone index (%...)")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(field, f"{quote(text)} is not an IP address") from None
    reason = _unusable_egress_ip_reason(ip)
    if reason is not None:
        raise ValidationError(field, f"{ip} is {reason}")
    cluster_range = cluster.in_cluster_ranges(ipaddress.ip_network(ip))
    if cluster_range is not None:
        raise ValidationError(field, f"{ip} is inside {cluster_range}")
    return ip


def _unusable_egress_ip_reason(ip: IPAddress) -> str | None:
    """Why `ip` can never be a host's source address on the outside, or None."""
    for attribute, reason in _UNUSABLE_KINDS:
        if getattr(ip, attribute):
            return reason
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _THIS_NETWORK:
            return f'in {_THIS_NETWORK}, which means "this network"'
        if ip == _LIMITED_BROADCAST:
            return "the limited broadcast address"
    # Checked before is_reserved (which covers ::/8) to say what to write instead; a
    # mapped address would also slip past the IPv4 cluster-range check.
    elif ip.ipv4_mapped is not None:
        return f"an IPv4-mapped IPv6 address; write {ip.ipv4_mapped} instead"
    return "in a reserved range" if ip.is_reserved else None


_UNUSABLE_KINDS = (
    ("is_unspecified", "the unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_multicast", "a multicast address"),
    ("is_link_local", "a link-local address"),
)


def _parse_interface(doc: object, field: str) -> str:
    name = expect_str(doc, field)
    problem = interface_name_problem(name)
    if problem is not None:
        raise ValidationError(
            field, f"{quote(name)} is not a valid Linux interface name: {problem}"
        )
    return name


def interface_name_problem(name: str) -> str | None:
    """Say why the kernel would refuse `name` as an interface name, or None.

    Mirrors the kernel's dev_valid_name() (which also forbids ':', the old alias syntax),
    and additionally insists on printable ASCII so the length limit counts bytes honestly
    and the name survives logs and YAML unchanged.
    """
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if any(c.isspace() for c in name):
        return "must not contain whitespace"
    for forbidden in "/:":
        if forbidden in name:
            return f"must not contain '{forbidden}'"
    if not (name.isascii() and name.isprintable()):
        return "must be printable ASCII"
    if len(name) > INTERFACE_NAME_MAX_LENGTH:
        return f"must be at most {INTERFACE_NAME_MAX_LENGTH} characters"
    return None


def _parse_failure_policy(doc: object, field: str) -> FailurePolicy:
    if doc is None:
        return FailurePolicy.FAIL_CLOSED
    value = expect_str(doc, field)
    try:
        return FailurePolicy(value)
    except ValueError:
        allowed = ", ".join(policy.value for policy in FailurePolicy)
        raise ValidationError(field, f"{quote(value)} is not one of {allowed}") from None


def _parse_health_check(doc: object, field: str) -> HealthCheck:
    defaults = HealthCheck()
    if doc is None:
        return defaults
    health = expect_mapping(doc, field)
    reject_unknown_fields(health, _HEALTH_CHECK_FIELDS, field)

    raw_interval = health.get("intervalMilliseconds")
    interval = (
        defaults.interval_ms
        if raw_interval is None
        else expect_int(
            raw_interval, child(field, "intervalMilliseconds"), *HEALTH_INTERVAL_MS_RANGE
        )
    )

    timeout_field = child(field, "timeoutMilliseconds")
    raw_timeout = health.get("timeoutMilliseconds")
    timeout = (
        defaults.timeout_ms if raw_timeout is None else expect_int(raw_timeout, timeout_field, 1)
    )
    if timeout >= interval:
        # Name the default when the user never wrote a timeout, or the message is a riddle.
        shown = f"{timeout} (the default)" if raw_timeout is None else str(timeout)
        raise ValidationError(
            timeout_field, f"{shown} must be less than intervalMilliseconds ({interval})"
        )

    raw_threshold = health.get("failureThreshold")
    threshold = (
        defaults.failure_threshold
        if raw_threshold is None
        else expect_int(raw_threshold, child(field, "failureThreshold"), *FAILURE_THRESHOLD_RANGE)
    )
    return HealthCheck(interval_ms=interval, timeout_ms=timeout, failure_threshold=threshold)


def _parse_cidrs(doc: object, field: str, *, allow_empty: bool) -> tuple[IPNetwork, ...]:
    raw_cidrs = expect_list(doc, field)
    if not raw_cidrs and not allow_empty:
        raise ValidationError(field, "must not be empty; omit the field to mean every destination")
    if len(raw_cidrs) > MAX_CIDRS:
        raise ValidationError(field, f"must list at most {MAX_CIDRS} CIDRs, got {len(raw_cidrs)}")
    first_index: dict[IPNetwork, int] = {}
    for i, raw in enumerate(raw_cidrs):
        net = _parse_cidr(raw, item(field, i))
        if net in first_index:
            raise ValidationError(
                item(field, i), f"{net} is a duplicate of {item(field, first_index[net])}"
            )
        first_index[net] = i
    return tuple(sorted(first_index, key=_network_sort_key))


def _parse_cidr(doc: object, field: str) -> IPNetwork:
    text = expect_str(doc, field)
    if "%" in text:
        raise ValidationError(field, f"{quote(text)} must not carry a zone index (%...)")
    _, slash, prefix = text.partition("/")
    if not slash:
        raise ValidationError(
            field, f"{quote(text)} is not a CIDR: it needs a prefix length, like 10.0.0.0/8"
        )
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValidationError(field, f"{quote(text)} is not a CIDR") from None
    # ipaddress also accepts netmasks ("/255.0.0.0") and leading zeros ("/08").
    if prefix != str(net.prefixlen):
        raise ValidationError(
            field,
            f"{quote(text)} is not a CIDR: write the prefix length as a plain number, "
            f"like /{net.prefixlen}",
        )
    if net.network_address != ipaddress.ip_interface(text).ip:
        raise ValidationError(
            field,
            f"{ipaddress.ip_interface(text)} has host bits set; the canonical form would be {net}",
        )
    return net


def _network_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    # IPv4Network and IPv6Network refuse to compare with each other, hence a key.
    return net.version, int(net.network_address), net.prefixlen


__all__ = [
    "ACCEPTED_SPEC_FIELD",
    "ALL_DESTINATIONS",
    "API_GROUP",
    "API_VERSION",
    "DEFAULT_GATEWAY_NODE_SELECTOR",
    "DEFAULT_PRIORITY",
    "EGRESS_GATEWAY_KIND",
    "EGRESS_POLICY_KIND",
    "GATEWAY_NODE_LABEL",
    "MAX_CIDRS",
    "MAX_EGRESS_IPS",
    "EgressGateway",
    "EgressPolicy",
    "FailurePolicy",
    "HealthCheck",
    "IPAddress",
    "InEffect",
    "ValidationError",
    "interface_name_problem",
    "parse_egress_gateway",
    "parse_egress_gateway_in_effect",
    "parse_egress_policy",
    "parse_egress_policy_in_effect",
]
