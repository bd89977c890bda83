"""Kubernetes label selectors: the parsed model and how it matches a set of labels.

EgressPolicy picks namespaces and pods with label selectors, and EgressGateway picks the
nodes its pods may run on. Every component that decides "is this pod steered?" must get the
same answer as Kubernetes itself would, so the semantics live here once: `matchLabels` and
`matchExpressions` are ANDed, `NotIn` matches when the key is absent, and an empty selector
matches everything. Parsing validates keys and values exactly as Kubernetes does and raises
`meshgress.validation.ValidationError` naming the field path.

Purely computational, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from meshgress.validation import (
    ValidationError,
    child,
    dns1123_subdomain_problem,
    entry,
    expect_list,
    expect_mapping,
    expect_str,
    item,
    quote,
    reject_unknown_fields,
)

LABEL_NAME_MAX_LENGTH: Final = 63
MAX_MATCH_LABELS: Final = 64
MAX_MATCH_EXPRESSIONS: Final = 32
MAX_EXPRESSION_VALUES: Final = 64
"""Bounds on a selector's size. Kubernetes' own LabelSelector has none, but meshgress's CRDs
must bound what their validation rules iterate over, and this parser says the same."""
_LABEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_CHARS_RULE: Final = (
    "alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    """One `matchExpressions` entry. `values` is sorted and deduplicated (it is a set)."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A parsed Kubernetes LabelSelector; all parts must hold for a match.

    `match_labels` is `(key, value)` pairs sorted by key, and `match_expressions` is sorted
    too, so two selectors that mean the same compare equal. The empty selector (the
    default) matches every set of labels.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True if the selector selects everything."""
        return not self.match_labels and not self.match_expressions


MATCH_EVERYTHING: Final = LabelSelector()


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Whether an object carrying `labels` is selected by `selector` (Kubernetes semantics)."""
    for key, value in selector.match_labels:
        if labels.get(key) != value:
            return False
    return all(_requirement_matches(req, labels) for req in selector.match_expressions)


def _requirement_matches(req: Requirement, labels: Mapping[str, str]) -> bool:
    match req.operator:
        case Operator.IN:
            return req.key in labels and labels[req.key] in req.values
        case Operator.NOT_IN:
            return req.key not in labels or labels[req.key] not in req.values
        case Operator.EXISTS:
            return req.key in labels
        case Operator.DOES_NOT_EXIST:
            return req.key not in labels


def parse_label_selector(
    doc: object, field: str, *, allow_match_expressions: bool = True
) -> LabelSelector:
    """Turn a Kubernetes LabelSelector (`{matchLabels, matchExpressions}`) into the model.

    `field` is the selector's own path (e.g. `spec.podSelector`), used in error messages.
    `{}` and `null` parse to the empty selector, which selects everything; callers for whom
    "absent" should mean something else must check for absence themselves. With
    `allow_match_expressions=False` only `matchLabels` is accepted, for selectors that end up
    as a plain pod `nodeSelector`.
    """
    if doc is None:
        return MATCH_EVERYTHING
    selector = expect_mapping(doc, field)
    if not allow_match_expressions and selector.get("matchExpressions") is not None:
        raise ValidationError(
            child(field, "matchExpressions"), "not supported here; use matchLabels"
        )
    reject_unknown_fields(selector, ("matchLabels", "matchExpressions"), field)
    return LabelSelector(
        match_labels=_parse_match_labels(selector.get("matchLabels"), child(field, "matchLabels")),
        match_expressions=_parse_match_expressions(
            selector.get("matchExpressions"), child(field, "matchExpressions")
        ),
    )


def _parse_match_labels(doc: object, field: str) -> tuple[tuple[str, str], ...]:
    if doc is None:
        return ()
    labels = expect_mapping(doc, field)
    if len(labels) > MAX_MATCH_LABELS:
        raise ValidationError(field, f"must have at most {MAX_MATCH_LABELS} labels, "
                                     f"got {len(labels)}")
    pairs: list[tuple[str, str]] = []
    for key in sorted(labels):
        problem = label_key_problem(key)
        if problem is not None:
            raise ValidationError(field, f"{quote(key)} is not a valid label key: {problem}")
        value = expect_str(labels[key], entry(field, key))
        _check_label_value(value, entry(field, key))
        pairs.append((key, value))
    return tuple(pairs)


def _parse_match_expressions(doc: object, field: str) -> tuple[Requirement, ...]:
    if doc is None:
        return ()
    raw_requirements = expect_list(doc, field)
    if len(raw_requirements) > MAX_MATCH_EXPRESSIONS:
        raise ValidationError(field, f"must have at most {MAX_MATCH_EXPRESSIONS} requirements, "
                                     f"got {len(raw_requirements)}")
    requirements = [_parse_requirement(raw, item(field, i))
                    for i, raw in enumerate(raw_requirements)]
    return tuple(sorted(set(requirements), key=lambda r: (r.key, r.operator.value, r.values)))


def _parse_requirement(doc: object, field: str) -> Requirement:
    req = expect_mapping(doc, field)
    reject_unknown_fields(req, ("key", "operator", "values"), field)

    key_field = child(field, "key")
    if req.get("key") is None:
        raise ValidationError(key_field, "required")
    key = expect_str(req["key"], key_field)
    problem = label_key_problem(key)
    if problem is not None:
        raise ValidationError(key_field, f"{quote(key)} is not a valid label key: {problem}")

    operator = _parse_operator(req.get("operator"), child(field, "operator"))

    values_field = child(field, "values")
    raw_values = req.get("values")
    values = [] if raw_values is None else list(expect_list(raw_values, values_field))
    if operator in (Operator.IN, Operator.NOT_IN):
        if not values:
            raise ValidationError(
                values_field, f"must be a non-empty list when operator is {operator}"
            )
    elif values:
        raise ValidationError(values_field, f"must be empty when operator is {operator}")
    if len(values) > MAX_EXPRESSION_VALUES:
        raise ValidationError(values_field, f"must have at most {MAX_EXPRESSION_VALUES} values, "
                                            f"got {len(values)}")
    checked: set[str] = set()
    for i, raw in enumerate(values):
        value = expect_str(raw, item(values_field, i))
        _check_label_value(value, item(values_field, i))
        checked.add(value)
    return Requirement(key=key, operator=operator, values=tuple(sorted(checked)))


def _parse_operator(doc: object, field: str) -> Operator:
    if doc is None:
        raise ValidationError(field, "required")
    name = expect_str(doc, field)
    try:
        return Operator(name)
    except ValueError:
        allowed = ", ".join(op.value for op in Operator)
        raise ValidationError(field, f"{quote(name)} is not one of {allowed}") from None


def label_key_problem(key: str) -> str | None:
    """Say why `key` is not a valid Kubernetes label key (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if "/" in prefix:
            return "must be a name with an optional DNS subdomain prefix and '/'"
        prefix_problem = dns1123_subdomain_problem(prefix)
        if prefix_problem is not None:
            return f"prefix part {prefix_problem}"
    if not name:
        return "name part must not be empty"
    if len(name) > LABEL_NAME_MAX_LENGTH:
        return f"name part must be no more than {LABEL_NAME_MAX_LENGTH} characters"
    if not _LABEL_NAME_RE.fullmatch(name):
        return f"name part must consist of {_LABEL_CHARS_RULE}"
    return None


def label_value_problem(value: str) -> str | None:
    """Say why `value` is not a valid Kubernetes label value (may be empty), or None."""
    if len(value) > LABEL_NAME_MAX_LENGTH:
        return f"must be no more than {LABEL_NAME_MAX_LENGTH} characters"
    if value and not _LABEL_NAME_RE.fullmatch(value):
        return f"must be empty or consist of {_LABEL_CHARS_RULE}"
    return None


def _check_label_value(value: str, field: str) -> None:
    problem = label_value_problem(value)
    if problem is not None:
        raise ValidationError(field, f"{quote(value)} is not a valid label value: {problem}")


__all__ = [
    "MATCH_EVERYTHING",
    "LabelSelector",
    "Operator",
    "Requirement",
    "label_key_problem",
    "label_value_problem",
    "matches",
    "parse_label_selector",
]
