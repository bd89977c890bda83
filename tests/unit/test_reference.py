"""The generated references (tests/tools/reference/): each committed section is exactly what
its source renders now, every source documents everything the reference lists, and the
renderers put a field, a metric, a command and a chart value into the words expected.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from meshgress.cli import build_parser
from tests.tools.metric_catalog import MetricFamily, metric_families
from tests.tools.reference import generate
from tests.tools.reference.commands import (
    command_tree,
    parser_without_environment,
    render_command,
    undocumented,
    usage,
)
from tests.tools.reference.crds import documented_default, fields, render_crd, render_field
from tests.tools.reference.markdown import (
    MarkerError,
    begin_marker,
    end_marker,
    replace_section,
    section,
    wrap,
)
from tests.tools.reference.metrics import render_metric
from tests.tools.reference.values import chart_values, render_values_table

# --- the committed references are the generated ones ----------------------------------------


@pytest.mark.parametrize("name", [ref.name for ref in generate.REFERENCES])
def test_the_committed_reference_is_the_generated_one(name: str) -> None:
    ref = generate.reference(name)
    committed, rendered = generate.committed(ref), ref.render()
    label = f"{ref.document.relative_to(generate.ROOT)} [{name}]"
    assert committed == rendered, (
        f"the {name} reference in {label} is stale; regenerate it with "
        f"`{generate.COMMAND}` and read the diff:\n"
        + generate.unified_diff(committed, rendered, label))


def test_the_check_command_passes_on_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == 0, capsys.readouterr().out


def test_the_references_do_not_depend_on_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHGRESS_DATASTORE", "/somewhere/else")
    monkeypatch.setenv("MESHGRESS_LAB", "other")
    assert generate.cli_reference() == generate.committed(generate.reference("cli"))


# --- the sources document everything ------------------------------------------------------


def test_every_command_and_argument_has_a_help_text() -> None:
    assert undocumented(parser_without_environment(build_parser)) == []


@pytest.mark.parametrize("crd", generate.load_crds(), ids=lambda crd: crd["spec"]["names"]["kind"])
def test_every_crd_field_has_a_description(crd: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    listed = list(fields(version["schema"]["openAPIV3Schema"]))
    # The API server refuses anything but a type for metadata (it is the standard one).
    assert [f.path for f in listed if not f.description] == ["metadata"]


def test_every_chart_value_has_a_description() -> None:
    schema = json.loads((generate.CHART / "values.schema.json").read_text())
    values = chart_values((generate.CHART / "values.yaml").read_text(), schema)
    assert [v.key for v in values if not v.description] == []


def test_every_metric_has_a_help_sentence() -> None:
    for process, families in metric_families().items():
        for family in families:
            assert family.help[:1].isupper() or family.help[:1].isdigit(), (process, family)
            assert family.help.endswith("."), (process, family)


# --- the renderers ---------------------------------------------------------------------------


def test_a_field_with_an_enum_and_a_documented_default() -> None:
    schema = {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object",
        "properties": {
            "mode": {"type": "string", "enum": ["Fast", "Safe"],
                     "description": "How to go. Default: Safe. Fast skips the checks."},
            "hosts": {"type": "array", "maxItems": 4,
                      "items": {"type": "string", "maxLength": 15,
                                "description": "A host name."}},
            "size": {"type": "integer", "minimum": 1, "default": 3,
                     "x-kubernetes-validations": [{"rule": "self < 10"}]},
        }}}}
    listed = {f.path: f for f in fields(schema)}
    assert list(listed) == ["spec", "spec.mode", "spec.hosts", "spec.hosts[]", "spec.size"]
    assert listed["spec"].required and not listed["spec.mode"].required
    assert render_field(listed["spec.mode"]) == [
        "- `spec.mode`: string; optional; default: Safe; one of `Fast`, `Safe`.",
        "  How to go. Fast skips the checks.",
    ]
    assert render_field(listed["spec.hosts[]"]) == [
        "- `spec.hosts[]`: string; at most 15 characters.", "  A host name."]
    assert render_field(listed["spec.size"]) == [
        "- `spec.size`: integer; optional; default: `3`; at least 1; checked by 1 CEL rule."]


def test_a_documented_default_may_contain_dots() -> None:
    assert documented_default("Nodes, by label. Default: nodes labelled a.io/b=true.") == (
        "Nodes, by label.", "nodes labelled a.io/b=true")
    assert documented_default("No default here.") == ("No default here.", None)


def test_a_crd_lists_its_names_and_printer_columns() -> None:
    crd = {"spec": {"group": "example.io", "scope": "Namespaced",
                    "names": {"kind": "Widget", "plural": "widgets", "shortNames": ["wd"]},
                    "versions": [{"name": "v1", "storage": True,
                                  "additionalPrinterColumns": [
                                      {"name": "Size", "type": "integer",
                                       "jsonPath": ".spec.size", "priority": 1}],
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    lines = render_crd(crd)
    assert lines[0] == "#### Widget"
    assert "`example.io/v1`, namespaced; plural `widgets`; short name `wd`." in lines
    assert "| Size | `.spec.size` | integer | with `-o wide` |" in lines


def test_a_metric_with_labels() -> None:
    metric = MetricFamily("meshgress_x_total", "counter", "Things counted.", ("gateway", "slot"))
    assert render_metric(metric) == [
        "- `meshgress_x_total`: counter; labels `gateway`, `slot`. Things counted."]
    histogram = MetricFamily("meshgress_t_seconds", "histogram", "Time.", (), ("0.1", "1"))
    assert render_metric(histogram) == [
        "- `meshgress_t_seconds`: histogram; buckets 0.1, 1. Time."]


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run something")
    run.add_argument("action", choices=("start", "stop"), help="what to do")
    run.add_argument("--speed", choices=("slow", "fast"), default="slow",
                     help="how fast (default %(default)s)")
    run.add_argument("--count", type=int, default=2, help="how many")
    run.add_argument("--node", required=True, help="where")
    run.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- ARGS", help="passed on")
    return parser


def test_a_subcommand_with_choices() -> None:
    root = command_tree(_toy_parser(), ("tool",))
    (run,) = root.subcommands
    assert run.name == "tool run"
    assert usage(run) == ["tool run [--speed {slow,fast}] [--count COUNT] --node NODE "
                          "{start,stop} -- ARGS"]
    assert render_command(run) == [
        "#### tool run", "",
        "Run something.", "",
        "```text",
        "tool run [--speed {slow,fast}] [--count COUNT] --node NODE {start,stop} -- ARGS",
        "```", "",
        "- `{start,stop}`: what to do",
        "- `--speed {slow,fast}`: how fast (default slow)",
        "- `--count COUNT`: how many (default `2`)",
        "- `--node NODE`: where",
        "- `-- ARGS`: passed on",
    ]
    assert render_command(root)[-3:] == ["Commands:", "", "- `run`: run something"]


def test_an_argument_without_help_is_reported() -> None:
    parser = _toy_parser()
    parser.add_argument("--quiet", action="store_true")
    assert undocumented(parser) == ["tool --quiet"]


VALUES = """\
# The file's header, not any key's.

# -- The image.
image:
  # Its name.
  name: tool
  tag: ""

replicas: 2
"""
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["image"],
    "properties": {
        "image": {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"},
                                 "tag": {"type": "string", "description": "Its tag."},
                                 "digest": {"type": "string", "description": "A digest."}}},
        "replicas": {"type": "integer", "minimum": 0, "description": "How many."},
        "mode": {"enum": ["a", "b|c"], "description": "A mode."},
    },
}


def test_a_values_table_from_comments_and_schema() -> None:
    rows = {v.key: v for v in chart_values(VALUES, SCHEMA)}
    assert list(rows) == ["image", "image.name", "image.tag", "image.digest", "replicas",
                          "mode"]
    assert rows["image"].description == "The image."
    assert rows["image.name"].description == "Its name."
    assert rows["image.name"].constraints == ("required", "pattern `^[a-z]+$`")
    assert rows["image.tag"].description == "Its tag."
    assert (rows["image.digest"].default, rows["replicas"].default) == ("", "`2`")
    table = render_values_table(list(rows.values())).splitlines()
    assert table[0] == "| Key | Type | Default | Constraints | Description |"
    assert "| `mode` | string |  | one of `a`, `b\\|c` | A mode. |" in table


def test_a_value_the_schema_refuses_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"values\.yaml sets typo"):
        chart_values("typo: 1\nimage:\n  name: x\n", SCHEMA)


# --- the marked sections --------------------------------------------------------------------


def test_only_the_marked_section_is_rewritten() -> None:
    text = f"intro\n{begin_marker('x')}\nold\n{end_marker('x')}\noutro\n"
    assert replace_section(text, "x", "new\n") == (
        f"intro\n{begin_marker('x')}\n\nnew\n\n{end_marker('x')}\noutro\n")
    assert section(replace_section(text, "x", "new\n"), "x") == "new\n"
    assert generate.regenerate(text, {"x": "new"}) == replace_section(text, "x", "new")


@pytest.mark.parametrize("text", ["no markers", f"{begin_marker('x')} only",
                                  f"{end_marker('x')}\n{begin_marker('x')}",
                                  f"{begin_marker('x')}{end_marker('x')}" * 2])
def test_a_document_without_its_markers_is_refused(text: str) -> None:
    with pytest.raises(MarkerError):
        replace_section(text, "x", "body")


def test_wrapped_lines_never_open_a_markdown_block() -> None:
    text = "word " * 17 + "- not a list item, 1. not a list either"
    for width in range(40, 100):
        lines = wrap(text, first="- ", indent="  ", width=width)
        assert all(not line[2:].startswith(("- ", "1. ")) for line in lines[1:]), lines
        assert " ".join(line[2:] for line in lines).split() == text.split()
