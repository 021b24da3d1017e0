"""Session-wide test settings: offline W&B, a private datasets root, few threads."""
import os

# Never let a test reach the W&B cloud or prompt for a key.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# No hub downloads (no network here anyway; fail at once instead of retrying).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
