"""Shared test set-up. Tests make their own small volumes; nothing here downloads anything."""

import os

# Tests never talk to W&B's servers: runs without credentials log offline, and no test may pick up a
# developer's real key from the environment.
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
