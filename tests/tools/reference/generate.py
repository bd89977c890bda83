"""Which reference goes where, reading each one's sources, and the command that rewrites
or checks the generated sections (`python -m tests.tools.reference [--check]`).

`regenerate` and `unified_diff` are purely computational; the `load_*` functions and
`main` read (and `main` writes) the repository's files.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.options import DEFAULT_METRICS_ADDRESS as GATEWAY_METRICS_ADDRESS
from meshgress.cli import build_parser
from nodeagent.options import DEFAULT_METRICS_ADDRESS as AGENT_METRICS_ADDRESS
from tests.tools.metric_catalog import AGENT, GATEWAY, metric_families
from tests.tools.reference.commands import parser_without_environment, render_cli_reference
from tests.tools.reference.crds import render_crd_reference
from tests.tools.reference.markdown import replace_section, section
from tests.tools.reference.metrics import render_metrics_reference
from tests.tools.reference.values import chart_values, render_values_table

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
CHART = ROOT / "charts" / "meshgress"
CHART_README = CHART / "README.md"
COMMAND = ".venv/bin/python -m tests.tools.reference"


def load_crds(chart: Path = CHART) -> list[dict[str, Any]]:
    """The chart's CRDs, in file name order."""
    return [doc for path in sorted((chart / "crds").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def crd_reference() -> str:
    return render_crd_reference(load_crds())


def metrics_reference() -> str:
    families = metric_families()
    return render_metrics_reference([
        ("Node agent", "`meshgress agent` serves these on /metrics, by default at "
         f"{AGENT_METRICS_ADDRESS} (`--metrics-address`).", families[AGENT]),
        ("Egress gateway", "`meshgress gateway` serves these on /metrics, by default at "
         f"{GATEWAY_METRICS_ADDRESS} (`--metrics-address`).", families[GATEWAY]),
    ])


def cli_reference() -> str:
    return render_cli_reference(parser_without_environment(build_parser))


def values_reference(chart: Path = CHART) -> str:
    schema = json.loads((chart / "values.schema.json").read_text())
    return render_values_table(chart_values((chart / "values.yaml").read_text(), schema))


@dataclass(frozen=True)
class Reference:
    name: str
    """Its markers' name: `<!-- generated:NAME begin -->`."""
    document: Path
    render: Callable[[], str]
    """Reads its sources and renders the section's body."""


REFERENCES = (
    Reference("crd-fields", README, crd_reference),
    Reference("metrics", README, metrics_reference),
    Reference("cli", README, cli_reference),
    Reference("chart-values", CHART_README, values_reference),
)


def reference(name: str) -> Reference:
    (found,) = [r for r in REFERENCES if r.name == name]
    return found


def regenerate(text: str, sections: Mapping[str, str]) -> str:
    """`text` with each named section's body replaced."""
    for name, body in sections.items():
        text = replace_section(text, name, body)
    return text


def unified_diff(old: str, new: str, label: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        f"{label} (committed)", f"{label} (generated)"))


def committed(ref: Reference) -> str:
    """The section as it is in the repository."""
    return section(ref.document.read_text(), ref.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tools.reference",
                                     description="Rewrite (or check) the generated references.")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 with a diff if a reference is stale")
    args = parser.parse_args(argv)
    stale = False
    for document in dict.fromkeys(ref.document for ref in REFERENCES):
        current = document.read_text()
        updated = regenerate(current, {ref.name: ref.render() for ref in REFERENCES
                                       if ref.document == document})
        if updated == current:
            continue
        stale = True
        label = str(document.relative_to(ROOT))
        if args.check:
            sys.stdout.write(unified_diff(current, updated, label))
            print(f"stale: {label}; regenerate it with `{COMMAND}` and read the diff")
        else:
            document.write_text(updated)
            print(f"rewrote: {label}")
    return 1 if stale and args.check else 0
