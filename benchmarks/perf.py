"""The README's speed section: every issue #8 target with its ratio, raw timings, spreads and status.

A thin wrapper over `fsdeploy bench perf` that keeps the report next to the README's figures. Any option of
the command passes through (e.g. --quick, --data GLYPHS, --targets 1,3).

Usage:
    python benchmarks/perf.py --data data/glyphs            # full run (long on 2 cores)
    python benchmarks/perf.py --quick                       # a few minutes

Writes benchmarks/results/perf.json (or perf_quick.json with --quick).
"""
from __future__ import annotations

import sys
from pathlib import Path

from fsdeploy.cli import main

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args and "-o" not in args:
        RESULTS.mkdir(parents=True, exist_ok=True)
        args += ["--out", str(RESULTS / ("perf_quick.json" if "--quick" in args else "perf.json"))]
    if "--workdir" not in args:
        args += ["--workdir", "runs/bench"]
    sys.argv = ["fsdeploy", "bench", "perf", *args]
    main()
