"""Run every benchmark (bench/bench_*.py) in its own process, one after another."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    only = sys.argv[1:]
    for path in sorted(here.glob("bench_*.py")):
        if only and not any(o in path.stem for o in only):
            continue
        print(f"\n##### {path.stem}", flush=True)
        rc = subprocess.call([sys.executable, str(path)])
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
