"""`make bench`: run every benchmark in this directory (`*_bench.py`), one after another.

Benchmarks are runners, not tests: each prints its own table and exits non-zero only if
it could not measure. Each ends with one JSON line of its ratios and figures
({"bench": NAME, ...}); this runner collects those lines into one file (`--out`, default
bench-results.jsonl), which is what the README's tables are written from. Each benchmark
runs with its defaults; run one directly to pass options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def last_json_line(output: str) -> dict[str, object] | None:
    """The benchmark's closing JSON line (the last line that is a JSON object with a
    "bench" key), or None."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if isinstance(found, dict) and "bench" in found:
                return found
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results.jsonl",
                        help="where the benchmarks' JSON lines are collected")
    parser.add_argument("names", nargs="*", help="only these benchmarks (e.g. mesh egress)")
    args = parser.parse_args()
    failed = []
    results = []
    for bench in sorted(Path(__file__).resolve().parent.glob("*_bench.py")):
        if args.names and bench.name.removesuffix("_bench.py") not in args.names:
            continue
        print(f"== {bench.name}", flush=True)
        proc = subprocess.Popen([sys.executable, str(bench)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        found = last_json_line("".join(lines))
        if proc.wait() or found is None:
            failed.append(bench.name)
        else:
            results.append(found)
        print(flush=True)
    Path(args.out).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    print(f"{len(results)} benchmark results in {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
