"""Session-wide test settings: offline W&B, a private datasets root, few threads."""
import os

# Never let a test reach the W&B cloud or prompt for a key.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# No hub downloads (no network here anyway; fail at once instead of retrying).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per test process (and the processes it starts): the suite runs many
# small models side by side on 2 cores, where oversubscribed thread pools are ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
