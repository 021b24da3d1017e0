"""Shared by the Slurm tests: they need the cluster of slurm/start.sh to be up."""
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    """Fail (not skip) when the test cluster is not up: these tests were asked for by -m slurm."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        pytest.fail("Slurm is not installed: run `bash slurm/start.sh` (as root) first")
    if out.returncode != 0 or not set(out.stdout.split()) & {"idle", "mixed", "allocated"}:
        pytest.fail(f"the Slurm test cluster is not ready (sinfo: {out.stdout.strip() or out.stderr.strip()}): "
                    "run `bash slurm/start.sh` first")
