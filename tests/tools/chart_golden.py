"""The chart's rendered output for its value sets, kept as golden files.

`helm template` of charts/meshgress with the default values and with each example value
set (charts/meshgress/examples/*.yaml) is kept under tests/golden/chart/, and
tests/unit/test_chart.py fails when the chart renders anything else. After a deliberate
change to the chart, rewrite them and read the diff before committing:

    .venv/bin/python -m tests.tools.chart_golden            # rewrite the golden files
    .venv/bin/python -m tests.tools.chart_golden --check    # exit 1 if one is stale

Rendering runs the pinned helm (`make binaries`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from meshgress.lab.controlplane import binary_path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "meshgress"
GOLDEN_DIR = ROOT / "tests" / "golden" / "chart"
RELEASE = "meshgress"
NAMESPACE = "meshgress-system"


def value_sets() -> dict[str, Path | None]:
    """Name -> values file (None: the chart's defaults)."""
    sets: dict[str, Path | None] = {"default": None}
    sets.update({path.stem: path for path in sorted((CHART / "examples").glob("*.yaml"))})
    return sets


def helm_template(values: Path | None = None, *extra: str,
                  namespace: str = NAMESPACE) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart (never raises on helm's own failure)."""
    argv = [str(binary_path("helm")), "template", RELEASE, str(CHART), "--namespace", namespace]
    if values is not None:
        argv += ["--values", str(values)]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, check=False,
                          timeout=60)


def render(values: Path | None) -> str:
    proc = helm_template(values)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed: {proc.stderr}")
    return proc.stdout


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tools.chart_golden")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, values in value_sets().items():
        text, path = render(values), golden_path(name)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
