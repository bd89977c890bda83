"""The chart's values table (charts/meshgress/README.md): every value with its key path,
type, default, constraints and description, from values.yaml and values.schema.json.

The structure follows the schema: an object with `properties` is walked into (a list's
items too, as `key[].field`), anything else — a scalar, a list of scalars, a free-form map
such as `podLabels` — is one row. Defaults are values.yaml's. A description is the comment
block right above the key in values.yaml (helm-docs' `# --` prefix is dropped), else the
schema's `description` — the place for keys values.yaml does not set, such as the fields
of a `gateways` item. Types, enums, bounds, patterns and `required` are the schema's.

Purely computational.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from tests.tools.reference.crds import constraints as schema_constraints
from tests.tools.reference.markdown import cell, code, table

_UNSET = object()


@dataclass(frozen=True)
class Value:
    key: str
    type: str
    default: str
    """As JSON in a code span; "" where values.yaml sets none (or the row is a section)."""
    constraints: tuple[str, ...]
    description: str


def key_comments(values_text: str) -> dict[str, str]:
    """Dotted key path -> the comment block right above it in values.yaml (no blank line
    between), for every key reached through mappings."""
    lines = values_text.splitlines()
    root = yaml.compose(values_text)
    out: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            block: list[str] = []
            row = key_node.start_mark.line - 1
            while row >= 0 and lines[row].lstrip().startswith("#"):
                block.insert(0, lines[row].lstrip()[1:].strip())
                row -= 1
            if block:
                text = " ".join(part for part in block if part)
                out[path] = text.removeprefix("-- ").strip()
            walk(value_node, f"{path}.")

    if root is not None:
        walk(root, "")
    return out


def _alternatives(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(schema.get("anyOf", [])) or list(schema.get("oneOf", []))


def type_name(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    if kind == "array":
        return f"list of {type_name(schema.get('items', {}))}"
    if kind == "object" and "properties" not in schema and isinstance(
            schema.get("additionalProperties"), Mapping):
        return f"map of {type_name(schema['additionalProperties'])}"
    if kind is None and "enum" in schema:
        kinds = sorted({type(v).__name__ for v in schema["enum"]})
        return " or ".join({"str": "string", "int": "integer", "bool": "boolean"}.get(k, k)
                           for k in kinds)
    if kind is None and _alternatives(schema):
        names: list[str] = []
        for alternative in _alternatives(schema):
            name = type_name(alternative)
            if name not in names:
                names.append(name)
        return " or ".join(names)
    return str(kind) if kind else "any"


def constraints(schema: Mapping[str, Any], required: bool) -> tuple[str, ...]:
    out = ["required"] if required else []
    own = {key: value for key, value in schema.items() if key != "additionalProperties"}
    out += schema_constraints(own)
    alternatives = _alternatives(schema)
    if alternatives and not schema.get("description"):
        shown = ["; ".join((type_name(a), *schema_constraints(a))) for a in alternatives]
        out.append("either " + " or ".join(f"({s})" for s in shown))
    items = schema.get("items")
    if isinstance(items, Mapping) and "properties" not in items:
        if items.get("description"):
            out.append(f"each: {items['description']}")
        else:
            out += [f"each {c}" for c in constraints(items, False)]
    values = schema.get("additionalProperties")
    if isinstance(values, Mapping):
        out += [f"each value {c}" for c in schema_constraints(values)]
    return tuple(out)


def _default(value: object) -> str:
    if value is _UNSET:
        return ""
    return code(json.dumps(value, separators=(",", ":")))


def _rows(schema: Mapping[str, Any], values: object, comments: Mapping[str, str],
          prefix: str) -> Iterator[Value]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    present = list(values) if isinstance(values, Mapping) else []
    unknown = [key for key in present if key not in properties]
    if unknown and schema.get("additionalProperties") is False:
        raise ValueError(f"values.yaml sets {', '.join(prefix + k for k in unknown)}, "
                         "which values.schema.json does not allow")
    for key in [*present, *(k for k in properties if k not in present)]:
        child = properties.get(key, {})
        path = f"{prefix}{key}"
        value = values[key] if isinstance(values, Mapping) and key in values else _UNSET
        description = comments.get(path) or " ".join(child.get("description", "").split())
        if "properties" in child:
            if description:
                yield Value(path, type_name(child), "", constraints(child, key in required),
                            description)
            yield from _rows(child, value, comments, f"{path}.")
            continue
        yield Value(path, type_name(child), _default(value),
                    constraints(child, key in required), description)
        items = child.get("items", {})
        if child.get("type") == "array" and "properties" in items:
            yield from _rows(items, _UNSET, comments, f"{path}[].")


def chart_values(values_text: str, schema: Mapping[str, Any]) -> list[Value]:
    """Every value of the chart, in values.yaml's order; keys only the schema names follow
    their siblings."""
    return list(_rows(schema, yaml.safe_load(values_text), key_comments(values_text), ""))


def render_values_table(values: Sequence[Value]) -> str:
    rows = [[code(v.key), cell(v.type), v.default.replace("|", "\\|"),
             cell("; ".join(v.constraints)), cell(v.description)] for v in values]
    return "\n".join(table(["Key", "Type", "Default", "Constraints", "Description"], rows)) + "\n"
