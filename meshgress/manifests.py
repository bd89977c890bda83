"""`meshgress apply`, `get` and `delete`: kubectl's experience on any meshgress datastore.

On Kubernetes a person writes EgressGateways and EgressPolicies with kubectl, and the API
server refuses a bad one before anything changes. On the embedded file datastore there is
no API server, so this module plays its part: it reads manifests as kubectl does (several
YAML documents in one file, `-` for standard input), refuses kinds the store does not
serve, validates every document with the same parsers the components use
(`meshgress.api`), and answers in the API server's and kubectl's words
(`egresspolicy.meshgress.io/payments created`, `The EgressPolicy "x" is invalid: ...`,
`Error from server (NotFound): ...`). A file with one bad document changes nothing: every
document is checked before the first is written.

`parse_*`, `resolve_resource`, `check_manifest` and `format_*` are pure; `apply_manifests`,
`get_objects` and `delete_object` talk to a `Datastore`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from meshgress import kube_yaml
from meshgress.api import (
    parse_egress_gateway,
    parse_egress_policy,
)
from meshgress.config import ClusterConfig
from meshgress.datastore import API_VERSIONS, NAMESPACED, Datastore, Kind, NotFound, Object
from meshgress.validation import ValidationError


class ManifestError(ValueError):
    """A command cannot be carried out; the message is what kubectl would print."""


@dataclass(frozen=True)
class Resource:
    """How a kind is named on the command line and in kubectl's messages."""

    kind: Kind
    plural: str
    singular: str
    short_names: tuple[str, ...]
    group: str

    @property
    def qualified(self) -> str:
        """`egresspolicies.meshgress.io`, `pods` (kubectl's resource.group)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """`egresspolicy.meshgress.io`, `pod` (kubectl's kind.group, lower case)."""
        kind = self.kind.lower()
        return f"{kind}.{self.group}" if self.group else kind

    def object_ref(self, name: str) -> str:
        """`egresspolicy.meshgress.io/payments` (kubectl's kind.group/name)."""
        return f"{self.qualified_kind}/{name}"


RESOURCES: tuple[Resource, ...] = (
    Resource(Kind.EGRESS_GATEWAY, "egressgateways", "egressgateway", ("egw",), "meshgress.io"),
    Resource(Kind.EGRESS_POLICY, "egresspolicies", "egresspolicy", ("egp",), "meshgress.io"),
    Resource(Kind.NODE, "nodes", "node", ("no",), ""),
    Resource(Kind.POD, "pods", "pod", ("po",), ""),
    Resource(Kind.NAMESPACE, "namespaces", "namespace", ("ns",), ""),
    Resource(Kind.LEASE, "leases", "lease", (), "coordination.k8s.io"),
    Resource(Kind.EVENT, "events", "event", ("ev",), "events.k8s.io"),
)
WRITABLE_KINDS = frozenset({Kind.EGRESS_GATEWAY, Kind.EGRESS_POLICY})
"""What a person writes; Nodes, Pods and Namespaces belong to the cluster (on the file
datastore: to the lab or whoever registers nodes), Leases to the gateways."""
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class Manifest:
    """One document of a manifest file, checked and ready to write."""

    resource: Resource
    name: str
    object: Object
    source: str


def resource_for_kind(kind: Kind) -> Resource:
    return next(r for r in RESOURCES if r.kind == kind)


def resolve_resource(text: str) -> Resource:
    """`egresspolicies`, `egresspolicy`, `egp`, `EgressPolicy`, `egresspolicies.meshgress.io`
    ... as kubectl resolves a resource type; raises ManifestError."""
    wanted = text.lower()
    for resource in RESOURCES:
        names = {resource.plural, resource.singular, resource.kind.lower(), *resource.short_names}
        if resource.group:
            names |= {f"{name}.{resource.group}" for name in set(names)}
        if wanted in names:
            return resource
    raise ManifestError(f'error: the server doesn\'t have a resource type "{text}"')


def parse_manifests(text: str, source: str) -> list[Mapping[str, Any]]:
    """Every non-empty YAML document of `text` (a `kind: List` is unpacked, as kubectl
    does); raises ManifestError for YAML that does not parse or documents that are not
    objects."""
    try:
        documents = kube_yaml.load_all(text)
    except kube_yaml.KubeYamlError as exc:
        raise ManifestError(f'error: error parsing {source}: {exc}') from None
    out: list[Mapping[str, Any]] = []
    for doc in documents:
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise ManifestError(f"error: error parsing {source}: a document is "
                                f"{type(doc).__name__}, not an object")
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out += [item for item in doc["items"] if isinstance(item, Mapping)]
        else:
            out.append(doc)
    return out


def check_manifest(doc: Mapping[str, Any], source: str, cluster: ClusterConfig) -> Manifest:
    """The document as it will be written, or ManifestError in the API server's words."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not api_version or not kind:
        missing = "apiVersion" if not api_version else "kind"
        raise ManifestError(f"error: error validating \"{source}\": error validating data: "
                            f"{missing} not set")
    resource = next((r for r in RESOURCES if r.kind == kind
                     and API_VERSIONS[r.kind] == api_version), None)
    if resource is None or resource.kind not in WRITABLE_KINDS:
        hint = ("ensure CRDs are installed first" if resource is None else
                f"{kind} objects belong to the cluster, not to `meshgress apply`: this "
                "command writes EgressGateways and EgressPolicies")
        raise ManifestError(f'error: resource mapping not found for name: "{name or ""}" '
                            f'namespace: "" from "{source}": no matches for kind "{kind}" '
                            f'in version "{api_version}"\n{hint}')
    obj = json.loads(json.dumps(doc))  # a private, JSON-clean copy
    obj.pop("status", None)            # status is the components' to write
    if isinstance(obj.get("metadata"), dict):
        obj["metadata"].pop("namespace", None)  # cluster-scoped: kubectl drops it too
    try:
        if resource.kind == Kind.EGRESS_GATEWAY:
            parse_egress_gateway(obj, cluster)
        else:
            parse_egress_policy(obj)
    except ValidationError as exc:
        raise ManifestError(
            f'Error from server (Invalid): error when applying "{source}": '
            f'The {kind} "{name or ""}" is invalid: {exc}') from None
    return Manifest(resource, str(name), obj, source)


def _user_fields(obj: Mapping[str, Any]) -> Any:
    meta = obj.get("metadata") or {}
    return (obj.get("spec"), meta.get("labels") or {}, meta.get("annotations") or {})


def apply_manifests(store: Datastore, manifests: Sequence[Manifest]) -> list[str]:
    """Write every manifest (create or overwrite), as `kubectl apply`; returns kubectl's
    line for each (`... created`, `configured` or `unchanged`)."""
    lines = []
    for manifest in manifests:
        kind = manifest.resource.kind
        try:
            current: Object | None = store.get(kind, manifest.name)
        except NotFound:
            current = None
        ref = manifest.resource.object_ref(manifest.name)
        if current is not None and _user_fields(current) == _user_fields(manifest.object):
            lines.append(f"{ref} unchanged")
            continue
        store.apply(manifest.object)
        lines.append(f"{ref} {'created' if current is None else 'configured'}")
    return lines


def get_objects(store: Datastore, resource: Resource, name: str | None,
                namespace: str | None) -> list[Object]:
    """One object or all of a kind; `namespace` None means every namespace."""
    if resource.kind not in NAMESPACED:
        namespace = ""
    if name is not None:
        try:
            return [store.get(resource.kind, name, namespace or "")]
        except NotFound:
            raise ManifestError(f'Error from server (NotFound): {resource.qualified} '
                                f'"{name}" not found') from None
    items = store.list(resource.kind, namespace=namespace or None).items
    return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""),
                                        o["metadata"]["name"]))


def delete_object(store: Datastore, resource: Resource, name: str) -> str:
    if resource.kind not in WRITABLE_KINDS:
        raise ManifestError(f"error: {resource.plural} belong to the cluster, not to "
                            "`meshgress delete`: it deletes EgressGateways and EgressPolicies")
    try:
        store.delete(resource.kind, name)
    except NotFound:
        raise ManifestError(f'Error from server (NotFound): {resource.qualified} '
                            f'"{name}" not found') from None
    return f'{resource.qualified_kind} "{name}" deleted'


# --- output -------------------------------------------------------------------------------


def format_age(created: str | None, now: float) -> str:
    """kubectl's AGE: 42s, 5m3s, 3h4m, 2d3h."""
    if not created:
        return "<unknown>"
    try:
        seconds = int(now - datetime.fromisoformat(created).timestamp())
    except ValueError:
        return "<unknown>"
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h{minutes % 60}m" if minutes % 60 and hours < 8 else f"{hours}h"
    return f"{hours // 24}d{hours % 24}h" if hours % 24 and hours < 192 else f"{hours // 24}d"


def _condition(obj: Mapping[str, Any], kind: str, field: str = "status") -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return str(cond.get(field, ""))
    return ""


def _spec(obj: Mapping[str, Any], field: str) -> str:
    value = (obj.get("spec") or {}).get(field)
    if value is None:
        return ""
    # kubectl prints a list column as compact JSON
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)


def _status(obj: Mapping[str, Any], field: str) -> str:
    value = (obj.get("status") or {}).get(field)
    return "" if value is None else str(value)


def _internal_ip(obj: Mapping[str, Any]) -> str:
    return next((str(a.get("address") or "") for a in
                 ((obj.get("status") or {}).get("addresses") or [])
                 if a.get("type") == "InternalIP"), "")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Mapping[str, Any]], str]
    wide: bool = False
    """Shown with -o wide only (a printer column of priority 1)."""


PRINTER_COLUMNS: Mapping[Kind, tuple[Column, ...]] = {
    # The same columns, in the same order, as the CRDs' additionalPrinterColumns.
    Kind.EGRESS_GATEWAY: (
        Column("EGRESS IPS", lambda o: _spec(o, "egressIPs")),
        Column("FAILURE POLICY", lambda o: _spec(o, "failurePolicy"), wide=True),
        Column("READY", lambda o: _condition(o, "Ready")),
        Column("REASON", lambda o: _condition(o, "Ready", "reason"), wide=True)),
    Kind.EGRESS_POLICY: (
        Column("GATEWAY", lambda o: _spec(o, "gateway")),
        Column("PRIORITY", lambda o: _spec(o, "priority")),
        Column("ACCEPTED", lambda o: _condition(o, "Accepted")),
        Column("REASON", lambda o: _condition(o, "Accepted", "reason"), wide=True),
        Column("SELECTED PODS", lambda o: _status(o, "selectedPods"))),
    Kind.NODE: (
        Column("INTERNAL-IP", _internal_ip),
        Column("POD CIDRS", lambda o: ",".join((o.get("spec") or {}).get("podCIDRs") or []))),
    Kind.POD: (
        Column("STATUS", lambda o: _status(o, "phase")),
        Column("IP", lambda o: _status(o, "podIP") or "<none>"),
        Column("NODE", lambda o: _spec(o, "nodeName") or "<none>")),
    Kind.NAMESPACE: (),
    Kind.LEASE: (Column("HOLDER", lambda o: _spec(o, "holderIdentity")),),
}


def format_objects(resource: Resource, objects: Iterable[Mapping[str, Any]], output: str,
                   *, named: bool = False, all_namespaces: bool = False,
                   now: float | None = None) -> str:
    """The objects as kubectl prints them: a table ("table"; "wide" adds the columns
    kubectl shows only with -o wide), yaml, json or name. `named`:
    one object was asked for by name, so yaml and json show it alone, not in a List."""
    items = list(objects)
    if output == "name":
        return "".join(f"{resource.object_ref(o['metadata']['name'])}\n" for o in items)
    if output in ("yaml", "json"):
        doc: Any = items[0] if named and len(items) == 1 else {
            "apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}
        if output == "json":
            return json.dumps(doc, indent=4) + "\n"
        return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    now = time.time() if now is None else now
    columns = [c for c in PRINTER_COLUMNS[resource.kind] if output == "wide" or not c.wide]
    headers = ["NAME", *(c.header for c in columns), "AGE"]
    rows = [[o["metadata"]["name"], *(c.value(o) for c in columns),
             format_age(o["metadata"].get("creationTimestamp"), now)] for o in items]
    if all_namespaces and resource.kind in NAMESPACED:
        headers.insert(0, "NAMESPACE")
        for row, obj in zip(rows, items, strict=True):
            row.insert(0, obj["metadata"].get("namespace", ""))
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows,
                                                                        strict=False)]
    return "".join("   ".join(str(cell).ljust(width) for cell, width in
                              zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in [headers, *rows])
