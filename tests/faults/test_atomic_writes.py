"""A process killed in the middle of writing a record leaves the old or the new version, never half.

A child process rewrites a run record (status.json through the RunStore), a final.json and a
table (maps.io.atomic_write_text) in a loop, each version large enough (~1 MB) that a write
takes a while; it is SIGKILLed at seeded random moments. After each kill every file must parse
and be one complete version. The same loop with a plain ``open().write`` is the control: it is
torn by the same kills, which shows the kills land mid-write.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


_WRITER = r"""
import json, sys
from pathlib import Path
from maps.io import atomic_write_json, atomic_write_text
from maps.launch.runstore import RunStore

root, mode = Path(sys.argv[1]), sys.argv[2]
store = RunStore(root / "runs")
run = store.run_dir("faults/atomic", 0)
run.mkdir(parents=True, exist_ok=True)
pad = "x" * 1_000_000
i = 0
print("ready", flush=True)
while True:
    i += 1
    if mode == "atomic":
        store.write_status(run, {"experiment": "faults/atomic", "seed": 0, "state": "running",
                                 "attempt": i, "pad": pad})
        atomic_write_json(run / "final.json", {"iteration": i, "pad": pad})
        atomic_write_text(root / "table.md", f"| version | {i} |\n" + pad + f"\nend {i}\n")
    else:
        (root / "table.md").write_text(f"| version | {i} |\n" + pad + f"\nend {i}\n")
"""


def _check_table(text: str) -> None:
    head, _, rest = text.partition("\n")
    version = head.split("|")[2].strip()
    assert rest.endswith(f"\nend {version}\n") and len(rest) == 1_000_001 + len(f"end {version}\n")


def _kill_loop(tmp_path: Path, mode: str, kills: int, seed: int) -> int:
    """Start the writer, SIGKILL it ``kills`` times; return how many kills left a torn file."""
    rng = random.Random(seed)
    torn = 0
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), mode],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            if mode == "atomic":
                from maps.launch.runstore import RunStore

                store = RunStore(tmp_path / "runs")
                run = store.run_dir("faults/atomic", 0)
                status = store.read_status(run)
                final = json.loads((run / "final.json").read_text())
                if status is not None:
                    assert status["state"] == "running" and len(status["pad"]) == 1_000_000
                assert len(final["pad"]) == 1_000_000
            table = tmp_path / "table.md"
            if table.exists():
                _check_table(table.read_text())
        except (AssertionError, ValueError, IndexError, FileNotFoundError):
            if mode == "atomic":
                raise
            torn += 1
    return torn


def test_sigkilled_writer_leaves_complete_records(tmp_path):
    assert _kill_loop(tmp_path, "atomic", kills=10, seed=8) == 0
    # the kills leave only mkstemp's hidden temporaries beside the records, never a record
    leftovers = [p.name for p in tmp_path.rglob(".*.tmp")]
    assert all(name.startswith((".table.md.", ".final.json.", ".status.json.")) for name in leftovers)


def test_the_same_kills_tear_a_plain_write(tmp_path):
    assert _kill_loop(tmp_path, "plain", kills=10, seed=8) >= 1
