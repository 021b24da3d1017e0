"""Session-wide test settings: offline W&B, a private datasets root, few threads."""
import os

# Never let a test reach the W&B cloud or prompt for a key.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# A private, empty weights cache: no test reads or writes the user's ~/.cache/maps
import tempfile  # noqa: E402

os.environ["MAPS_WEIGHTS"] = tempfile.mkdtemp(prefix="maps-test-weights-")
# No hub downloads (no network here anyway; fail at once instead of retrying).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per test process (and the processes it starts): the suite runs many
# small models side by side on 2 cores, where oversubscribed thread pools are ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# The toy tasks of the launcher and sweep tests (tests/helpers) are imported by path inside
# local and Slurm jobs, which inherit this environment; maps runs tasks outside its own
# package only when the operator names their modules (never from a file's `task:` value).
_HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HELPERS, os.environ.get("PYTHONPATH")) if p)
os.environ["MAPS_TASK_MODULES"] = "maps_toy_tasks,maps_toy_objectives"
import sys  # noqa: E402

sys.path.insert(0, _HELPERS)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
