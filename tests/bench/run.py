"""`make bench`: run every benchmark in this directory (`*_bench.py`), one after another.

Benchmarks are runners, not tests: each prints its own table and exits non-zero only if
it could not measure. Each runs with its defaults; run one directly to pass options.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    failed = []
    for bench in sorted(Path(__file__).resolve().parent.glob("*_bench.py")):
        print(f"== {bench.name}", flush=True)
        if subprocess.run([sys.executable, str(bench)], check=False).returncode:
            failed.append(bench.name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
