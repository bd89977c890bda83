"""Checks and normal forms of objects that every datastore backend applies alike.

Both backends must refuse the same malformed input with the same `Invalid` before it reaches
their store (a directory or the Kubernetes API), and must describe objects, lease times and
annotation patches the same way; so those pure pieces live here once. No I/O.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Collection, Mapping
from typing import Any, Final

from meshgress.datastore import API_VERSIONS, NAMESPACED, Invalid, Kind, Object

_NAMESPACE_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def checked_kind(value: object) -> Kind:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return Kind(value)
    raise Invalid(f"unknown kind {value!r}; expected one of "
                  f"{', '.join(k.value for k in Kind)}")


def checked_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise Invalid(f"namespace {namespace!r} is not a valid namespace name "
                      "(a lowercase RFC 1123 label)")
    return namespace


def describe(kind: Kind, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def json_copy(value: Any) -> Any:
    """A deep copy restricted to what JSON can hold."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise Invalid(f"object is not representable as JSON: {e}") from None


def prepare(obj: Object) -> tuple[Object, Kind, str, str]:
    """A checked, normalised copy of a caller's object: apiVersion filled in, keys in the
    usual order. Returns it with its kind, namespace ("" when cluster-scoped) and name.
    Names are checked by each backend (each has its own limits)."""
    if not isinstance(obj, Mapping):
        raise Invalid(f"an object must be a mapping, got {type(obj).__name__}")
    data = json_copy(obj)
    kind = checked_kind(data.get("kind"))
    api_version = data.get("apiVersion") or API_VERSIONS[kind]
    if api_version != API_VERSIONS[kind]:
        raise Invalid(f"{kind} has apiVersion {API_VERSIONS[kind]}, got {api_version!r}")
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        raise Invalid(f"{kind} has no metadata")
    name = meta.get("name")
    if not isinstance(name, str):
        raise Invalid(f"{kind} metadata.name must be a string, got {name!r}")
    namespace = meta.get("namespace") or ""
    if not isinstance(namespace, str):
        raise Invalid(f"{kind} metadata.namespace must be a string, got {namespace!r}")
    if kind in NAMESPACED and not namespace:
        raise Invalid(f"{kind} {name!r} needs metadata.namespace")
    if kind not in NAMESPACED:
        if namespace:
            raise Invalid(f"{kind} is cluster-scoped; metadata.namespace must not be set")
        meta.pop("namespace", None)
    rest = {k: v for k, v in data.items() if k not in ("apiVersion", "kind", "metadata")}
    new: Object = {"apiVersion": api_version, "kind": kind.value, "metadata": meta, **rest}
    return new, kind, namespace, name


def check_annotation_patch(annotations: Mapping[str, str | None]) -> None:
    for key, value in annotations.items():
        if not isinstance(key, str) or not key or not (value is None or isinstance(value, str)):
            raise Invalid(f"annotation {key!r}: {value!r} must map a key to a string or None")


def checked_annotation_keys(keys: Collection[str]) -> frozenset[str]:
    """Annotation keys to remove, checked as `check_annotation_patch` checks a patch."""
    if isinstance(keys, str):
        raise Invalid(f"annotation keys must be a collection of keys, not {keys!r}")
    check_annotation_patch(dict.fromkeys(keys))
    return frozenset(keys)


def released_lease(current: Object, clear_annotations: Collection[str]) -> Object:
    """`current` (a Lease) as its holder's release writes it: no holder, and none of the
    annotations `clear_annotations` names. Pure: returns a new object."""
    new = copy.deepcopy(current)
    new.setdefault("spec", {}).pop("holderIdentity", None)
    meta = new["metadata"]
    kept = {key: value for key, value in (meta.get("annotations") or {}).items()
            if key not in clear_annotations}
    if kept:
        meta["annotations"] = kept
    else:
        meta.pop("annotations", None)
    return new


def check_lease_request(holder: object, duration_seconds: object) -> float:
    """The duration as a float, after checking both arguments of acquire_lease."""
    if not isinstance(holder, str) or not holder:
        raise Invalid(f"lease holder must be a non-empty string, got {holder!r}")
    if isinstance(duration_seconds, bool) or not isinstance(duration_seconds, int | float) \
            or not 0 < duration_seconds < float("inf"):
        raise Invalid(f"lease duration must be a positive number of seconds, "
                      f"got {duration_seconds!r}")
    return float(duration_seconds)
