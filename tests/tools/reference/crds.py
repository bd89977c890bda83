"""The field reference of meshgress's CRDs (EgressGateway, EgressPolicy), rendered from
their OpenAPI schemas in charts/meshgress/crds/: every field path with its type, whether
it is required, its default, the schema's constraints and its description, plus the
`kubectl get` columns and the short names.

The CRDs carry no `default:` (the API server would write defaults into every stored
object; meshgress's parser applies them instead, meshgress/api.py). A field's default is
said in its description as a sentence `Default: ….`, which `kubectl explain` shows too;
`documented_default` reads it back, and tests/unit/test_crd_corpus.py checks it against
the parser's defaults.

Purely computational.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.tools.reference.markdown import code, inline, paragraphs, table, wrap

_DEFAULT_SENTENCE = re.compile(r"(?:^|(?<=[.;]\s))Default: (?P<value>.+?)\.(?=\s|$)")


@dataclass(frozen=True)
class Field:
    """One field of a CRD's schema, as the reference lists it."""

    path: str
    """Dotted, `[]` for a list's items: `spec.egressIPs[]`, `status.conditions[].type`."""
    type: str
    required: bool | None
    """None for a list's items (they are not named fields)."""
    default: str | None
    constraints: tuple[str, ...]
    description: str


def documented_default(description: str) -> tuple[str, str | None]:
    """The description without its `Default: ….` sentence, and that default (None when
    the description states none)."""
    match = _DEFAULT_SENTENCE.search(description)
    if match is None:
        return description, None
    rest = (description[:match.start()] + description[match.end():]).strip()
    return " ".join(rest.split()), match.group("value")


def type_name(schema: Mapping[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {type_name(schema.get('items', {}))}"
    if kind == "object" and "properties" not in schema:
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping):
            return f"map of {type_name(values)}"
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return "object (any fields)"
    return str(kind)


def _range(low: object, high: object, unit: str = "") -> str | None:
    plural = not (high == 1 or (high is None and low == 1))
    suffix = f" {unit if plural else unit.removesuffix('s')}" if unit else ""
    if low is not None and high is not None:
        return f"{low} to {high}{suffix}"
    if low is not None:
        return f"at least {low}{suffix}"
    if high is not None:
        return f"at most {high}{suffix}"
    return None


def constraints(schema: Mapping[str, Any]) -> tuple[str, ...]:
    """What the schema itself allows of a value, in words."""
    out: list[str] = []
    if "enum" in schema:
        out.append("one of " + ", ".join(code(str(v)) for v in schema["enum"]))
    numeric = _range(schema.get("minimum"), schema.get("maximum"))
    if numeric:
        out.append(numeric)
    for keyword, words in (("exclusiveMinimum", "greater than"),
                           ("exclusiveMaximum", "less than")):
        if isinstance(schema.get(keyword), int | float) and not isinstance(
                schema.get(keyword), bool):
            out.append(f"{words} {schema[keyword]}")
    for low, high, unit in (("minLength", "maxLength", "characters"),
                            ("minItems", "maxItems", "items"),
                            ("minProperties", "maxProperties", "entries")):
        bounded = _range(schema.get(low), schema.get(high), unit)
        if bounded:
            out.append(bounded)
    if schema.get("uniqueItems"):
        out.append("no duplicates")
    if "pattern" in schema:
        out.append(f"pattern {code(schema['pattern'])}")
    if "format" in schema:
        out.append(f"format {code(schema['format'])}")
    if schema.get("nullable"):
        out.append("may be null")
    if schema.get("x-kubernetes-list-type") == "map":
        keys = ", ".join(code(k) for k in schema.get("x-kubernetes-list-map-keys", []))
        out.append(f"one entry per {keys}")
    values = schema.get("additionalProperties")
    if isinstance(values, Mapping):
        out += [f"each value {c}" for c in constraints(values)]
    rules = len(schema.get("x-kubernetes-validations", []))
    if rules:
        out.append(f"checked by {rules} CEL rule{'s' if rules > 1 else ''}")
    return tuple(out)


def _field(path: str, schema: Mapping[str, Any], required: bool | None) -> Field:
    description, default = documented_default(" ".join(schema.get("description", "").split()))
    if "default" in schema:
        default = code(json.dumps(schema["default"], separators=(",", ":")))
    return Field(path, type_name(schema), required, default, constraints(schema), description)


def _says_something(schema: Mapping[str, Any]) -> bool:
    """Whether a list's items deserve a line of their own."""
    return bool(schema.get("description") or constraints(schema))


def fields(schema: Mapping[str, Any], prefix: str = "") -> Iterator[Field]:
    """Every field under an object schema, in the schema's order, depth first."""
    required = set(schema.get("required", []))
    for name, child in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield _field(path, child, name in required)
        yield from _below(path, child)


def _below(path: str, schema: Mapping[str, Any]) -> Iterator[Field]:
    if "properties" in schema:
        yield from fields(schema, f"{path}.")
    elif schema.get("type") == "array":
        items = schema.get("items", {})
        if "properties" in items:
            if _says_something(items):
                yield _field(f"{path}[]", items, None)
            yield from fields(items, f"{path}[].")
        elif _says_something(items):
            yield _field(f"{path}[]", items, None)
            yield from _below(f"{path}[]", items)


def render_field(field: Field) -> list[str]:
    facts = [field.type]
    if field.required is not None:
        facts.append("required" if field.required else "optional")
    if field.default is not None:
        facts.append(f"default: {field.default}")
    facts += field.constraints
    lines = wrap(inline("; ".join(facts) + "."), first=f"- {code(field.path)}: ", indent="  ")
    if field.description:
        lines += wrap(inline(field.description), first="  ", indent="  ")
    return lines


def _columns(version: Mapping[str, Any]) -> list[str]:
    rows = [[inline(column["name"]), code(column["jsonPath"]).replace("|", "\\|"),
             column["type"], "always" if not column.get("priority") else "with `-o wide`"]
            for column in version.get("additionalPrinterColumns", [])]
    return table(["Column", "JSONPath", "Type", "Shown"], rows) if rows else []


def render_crd(crd: Mapping[str, Any]) -> list[str]:
    """One CRD's section: its names, its `kubectl get` columns and its fields."""
    spec = crd["spec"]
    names = spec["names"]
    (version,) = [v for v in spec["versions"] if v.get("storage")]
    schema = version["schema"]["openAPIV3Schema"]
    scope = "cluster-scoped" if spec["scope"] == "Cluster" else "namespaced"
    facts = [f"{code(spec['group'] + '/' + version['name'])}, {scope}",
             f"plural {code(names['plural'])}"]
    if names.get("shortNames"):
        facts.append("short name" + ("s " if len(names["shortNames"]) > 1 else " ")
                     + ", ".join(code(n) for n in names["shortNames"]))
    if names.get("categories"):
        facts.append("categories " + ", ".join(code(n) for n in names["categories"]))
    if "status" in version.get("subresources", {}):
        facts.append("status subresource")
    lines = [f"#### {names['kind']}", ""]
    lines += wrap(inline("; ".join(facts) + "."))
    for paragraph in paragraphs(schema.get("description", "")):
        lines += ["", *wrap(inline(paragraph))]
    columns = _columns(version)
    if columns:
        lines += ["", f"`kubectl get {names['plural']}` shows:", "", *columns]
    lines += ["", "Fields:", ""]
    for field in fields(schema):
        lines += render_field(field)
    return lines


def render_crd_reference(crds: Sequence[Mapping[str, Any]]) -> str:
    """The reference of every CRD, in the order given."""
    lines: list[str] = []
    for crd in crds:
        lines += ["", *render_crd(crd)] if lines else render_crd(crd)
    return "\n".join(lines) + "\n"
