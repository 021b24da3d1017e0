"""Security hygiene of the package source, and W&B faults of a real training run.

* The source never unpickles what a user did not produce, loads YAML unsafely, or builds a
  shell command: a scan of ``maps/`` (an allow-list entry needs a justification).
* W&B online without a key (no ``wandb login``, no network): the launched task
  (``run_training``) trains, writes final.json and its W&B record, and says so in one warning.
* A W&B API key in the environment never reaches a file of the run directory or its logs.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, SMALL, TINY_CONFIG, maps_env

PACKAGE = REPO / "maps"
# (file relative to the repo, line substring) -> why it is safe
ALLOWED = {
    ("maps/engine/checkpoint.py", "torch.load(f, map_location=torch.device(\"cpu\"), weights_only=True)"):
        "weights_only=True",
    ("maps/memory/encoders.py", "torch.load(path, map_location=\"cpu\", weights_only=True)"): "weights_only=True",
}
FORBIDDEN = [
    (re.compile(r"\byaml\.load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"\byaml\.(unsafe_load|full_load)\("), "unsafe YAML loader"),
    (re.compile(r"shell\s*=\s*True"), "shell=True"),
    (re.compile(r"\bos\.(system|popen)\("), "os.system / os.popen"),
    (re.compile(r"\b(c?pickle|dill|joblib)\.loads?\("), "unpickling"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
]


def scan(root: Path) -> list:
    hits = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in FORBIDDEN:
                if pattern.search(code) and not any(rel == f and s in line for f, s in ALLOWED):
                    hits.append(f"{rel}:{n}: {what}: {line.strip()}")
    return hits


def test_package_source_has_no_unsafe_loads_or_shell_commands():
    assert scan(PACKAGE) == []


def test_the_scan_catches_each_pattern(tmp_path, monkeypatch):
    bad = tmp_path / "maps" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("yaml.load(text)\nsubprocess.run(cmd, shell=True)\nos.system(cmd)\n"
                   "pickle.load(f)\ntorch.load(path)\nnp.load(p, allow_pickle=True)\n"
                   "yaml.load(t, Loader=yaml.SafeLoader)\ntorch.load(p, weights_only=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    hits = scan(tmp_path / "maps")
    assert [h.split(":")[1] for h in hits] == ["1", "2", "3", "4", "5", "6"], hits


_TASK = """
import json, sys
from maps.engine.train import run_training
final = run_training(sys.argv[1], open(sys.argv[2]).read(), seed=0, resume=False)
print("FINAL " + json.dumps(final))
"""


def _run_task(tmp_path: Path, datasets_root: Path, **env: str) -> tuple:
    from maps.modeling.build import load_config

    cfg = load_config(str(TINY_CONFIG), ["SOLVER.MAX_ITER", "2", *SMALL])
    (tmp_path / "config.yaml").write_text(cfg.dump())
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", _TASK, str(run), str(tmp_path / "config.yaml")],
                          env=maps_env(datasets_root, **env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


@pytest.mark.slow
def test_wandb_online_without_key_trains_with_one_warning(tmp_path, datasets_root):
    run, done = _run_task(tmp_path, datasets_root, WANDB_MODE="online", WANDB_SILENT="false",
                          NETRC=str(tmp_path / "no-netrc"), HOME=str(tmp_path))
    final = json.loads((run / "final.json").read_text())
    assert final["iteration"] == 2 and set(final) >= {"PQ", "PQ_th", "PQ_st", "AP", "mIoU"}
    record = json.loads((run / "wandb.json").read_text())
    assert record["mode"] == "offline" and record["id"]
    out = done.stdout + done.stderr
    # every line that mentions W&B: the one warning (stderr; run_training builds the writer
    # before train() configures logging, so it reaches stderr through logging's last resort)
    warnings = [l for l in out.splitlines() if re.search(r"W&B|wandb", l, re.I)]
    assert len(warnings) == 1 and "no API key is configured" in warnings[0], warnings
    assert "Traceback" not in out


@pytest.mark.slow
def test_wandb_key_is_never_written(tmp_path, datasets_root):
    key = "fakekey0123456789abcdef0123456789abcdef01"
    run, done = _run_task(tmp_path, datasets_root, WANDB_MODE="offline", WANDB_API_KEY=key)
    assert (run / "final.json").is_file()
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "log.txt" for p in files) and any("wandb" in p.parts for p in files)
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaks == [] and key not in done.stdout + done.stderr, leaks
