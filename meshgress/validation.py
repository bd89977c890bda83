"""The one error type that user-supplied objects are rejected with, and the checks that raise it.

Every meshgress resource is written by a person, and an invalid one must end up as a status
condition and an Event that person can act on, never as a crash or a retry loop. So every
parser in the shared core (`meshgress.api`, `meshgress.selectors`) raises exactly one
exception type, `ValidationError`, whose message starts with the path of the offending field
(`spec.egressIPs[1]: ...`). This module owns that type and the small, shared checks (types,
unknown fields, DNS-1123 names) so the messages read the same everywhere. It sits below
`api` and `selectors` so neither has to import the other to raise.

Purely computational, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Final

ROOT: Final = "<document>"
"""The field path reported when the document itself is wrong (e.g. it is not a mapping)."""

_PLAIN_FIELD_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_SHOWN_CHARS: Final = 80
_MAX_SHOWN_INT_BITS: Final = 128

DNS1123_SUBDOMAIN_MAX_LENGTH: Final = 253
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE: Final = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")


class ValidationError(ValueError):
    """A user-supplied object is invalid; permanent, so report it rather than retry.

    `field` is the path of the offending field (`spec.healthCheck.timeoutMilliseconds`),
    `problem` says what is wrong with it, and `str(error)` is `"<field>: <problem>"`.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def child(field: str, name: str) -> str:
    """The path of field `name` inside the object at path `field`.

    Names that are not plain identifiers (an unknown field can be any string) are quoted
    as `field["..."]`, so the path stays unambiguous and printable.
    """
    if not _PLAIN_FIELD_NAME_RE.fullmatch(name):
        return entry(field, name)
    return name if field == ROOT else f"{field}.{name}"


def item(field: str, index: int) -> str:
    """The path of the `index`-th element of the list at path `field`."""
    return f"{field}[{index}]"


def entry(field: str, key: str) -> str:
    """The path of a map entry, e.g. `matchLabels["app.kubernetes.io/name"]`.

    Label keys contain dots and slashes, so they are quoted rather than joined with '.'.
    """
    return f"{field}[{quote(key)}]"


def quote(text: str) -> str:
    """Show user text in a message: JSON-quoted, escaped to ASCII, shortened if long.

    ASCII escaping keeps messages safe to put in Events and logs whatever the input holds
    (control characters, lone surrogates from a JSON document).
    """
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[:_MAX_SHOWN_CHARS] + "..."
    return json.dumps(text)


def describe(value: object) -> str:
    """Name the JSON type of `value`, with the value itself when it is short and scalar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {show_int(value)}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    # YAML can produce dates, bytes and sets; name the Python type rather than guess.
    return type(value).__name__


def show_int(value: int) -> str:
    """Render an int for a message without tripping Python's int-to-str digit limit."""
    if value.bit_length() > _MAX_SHOWN_INT_BITS:
        return "(a very large number)" if value > 0 else "(a very large negative number)"
    return str(value)


def expect_mapping(value: object, field: str) -> Mapping[str, object]:
    """Return `value` as a mapping with string keys, or reject it naming `field`."""
    if not isinstance(value, Mapping):
        raise ValidationError(field, f"must be an object, got {describe(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ValidationError(field, f"keys must be strings, got {describe(key)}")
    return value


def reject_unknown_fields(doc: Mapping[str, object], allowed: Sequence[str], field: str) -> None:
    """Reject the first (in sorted order, so the message is stable) field not in `allowed`."""
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ValidationError(child(field, unknown[0]), "unknown field")


def expect_list(value: object, field: str) -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise ValidationError(field, f"must be a list, got {describe(value)}")
    return value


def expect_str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {describe(value)}")
    return value


def expect_int(value: object, field: str, minimum: int, maximum: int | None = None) -> int:
    """Return `value` as an int in [minimum, maximum]; bools and floats are rejected."""
    # bool is a subclass of int in Python, but `priority: true` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {describe(value)}")
    if maximum is None:
        if value < minimum:
            raise ValidationError(field, f"must be at least {minimum}, got {show_int(value)}")
    elif not minimum <= value <= maximum:
        raise ValidationError(
            field, f"must be between {minimum} and {maximum}, got {show_int(value)}"
        )
    return value


def dns1123_subdomain_problem(name: str) -> str | None:
    """Say why `name` is not a DNS-1123 subdomain (a Kubernetes object name), or None."""
    if not name:
        return "must not be empty"
    if len(name) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        return f"must be no more than {DNS1123_SUBDOMAIN_MAX_LENGTH} characters"
    if not _DNS1123_SUBDOMAIN_RE.fullmatch(name):
        return (
            "must be a lowercase RFC 1123 subdomain: lowercase alphanumeric characters, "
            "'-' or '.', starting and ending with an alphanumeric character"
        )
    return None


def expect_dns1123_subdomain(value: object, field: str) -> str:
    """Return `value` if it is a valid Kubernetes object name, else reject it."""
    name = expect_str(value, field)
    problem = dns1123_subdomain_problem(name)
    if problem is not None:
        raise ValidationError(field, f"{quote(name)} is not a valid name: {problem}")
    return name
