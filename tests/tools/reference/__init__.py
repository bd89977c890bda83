"""References generated from the code, so they cannot drift from it: the CRD field
reference, the metrics reference and the command-line reference (in README.md, section
"Reference") and the chart's values table (charts/meshgress/README.md).

Each is rendered by a pure function from its source — the CRD schemas in
charts/meshgress/crds/, the exporters' own output (tests/tools/metric_catalog.py), the
CLI's argparse parser, values.yaml with values.schema.json — into a section between
`<!-- generated:NAME begin -->` and `<!-- generated:NAME end -->`; nothing outside the
markers is touched. tests/unit/test_reference.py fails when a committed section differs
from what its source renders now. After a change to a source:

    .venv/bin/python -m tests.tools.reference            # rewrite the sections
    .venv/bin/python -m tests.tools.reference --check    # exit 1 with a diff if one is stale
"""
