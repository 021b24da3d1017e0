"""Benchmark: every table of both suites from 1,000 run records (target: under 2 s).

Generates a run store of N runs (default 1,000) spread over every distinct runnable
experiment of the shipped registry (mostly done, some queued / running / failed, each with a
final.json and a 20-line metrics.json), then times what ``maps tables --table all --no-plots``
does for both suites: read the registry and the run records, build the tables (means, stds,
Welch tests), and render Markdown, LaTeX and CSV. Plots are not timed (matplotlib).

    .venv/bin/python benchmarks/tables.py [--runs 1000] [--repeat 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maps.registry import load_registry  # noqa: E402
from maps.report import build_tables, render  # noqa: E402
from maps.report.sources import RunStoreSource  # noqa: E402
from maps.launch.runstore import RunStore  # noqa: E402


def generate(root: Path, n_runs: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    registry = load_registry(REPO / "experiments", validate=False)
    names = sorted({e.canonical_name for e in registry if e.runnable})
    for i in range(n_runs):
        experiment, run_seed = names[i % len(names)], i // len(names)
        run_dir = root / experiment / f"seed{run_seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        state = rng.choices(["done", "running", "queued", "failed"], [85, 5, 5, 5])[0]
        (run_dir / "status.json").write_text(json.dumps(
            {"experiment": experiment, "seed": run_seed, "state": state, "attempt": 1}))
        pq = 40 + rng.gauss(0, 0.5)
        if state == "done":
            (run_dir / "final.json").write_text(json.dumps(
                {"PQ": pq, "PQ_th": pq + 1, "PQ_st": pq - 1, "AP": pq / 1.5, "mIoU": pq + 6,
                 "iteration": 160000}))
        lines = [json.dumps({"iteration": it, "total_loss": 5.0 - it / 1e5, "lr": 1e-4})
                 for it in range(19, 400, 20)]
        (run_dir / "metrics.json").write_text("\n".join(lines) + "\n")
    return len(names)


def run_once(root: Path) -> float:
    t0 = time.perf_counter()
    registry = load_registry(REPO / "experiments", validate=False)
    source = RunStoreSource(RunStore(root))
    n_tables = 0
    for suite in ("paper", "synthetic"):
        report = build_tables(registry, source, "all", suite)
        for table in report.tables:
            for fmt in ("md", "latex", "csv"):
                render(table, fmt)
            n_tables += 1
    elapsed = time.perf_counter() - t0
    assert n_tables == 14, n_tables
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="generate the store here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="maps-bench-tables-"))
    try:
        n_exp = generate(root, args.runs)
        import scipy.stats  # noqa: F401  (import cost is not the report's)

        times = [run_once(root) for _ in range(args.repeat)]
        print(f"{args.runs} runs over {n_exp} experiments, 14 tables (paper + synthetic), "
              f"md + latex + csv: best {min(times):.3f} s, worst {max(times):.3f} s "
              f"over {args.repeat} repeats (target < 2 s)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
