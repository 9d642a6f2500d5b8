"""Sharded, crash-safe checkpoints that load into any parallel layout.

`save_checkpoint` / `load_checkpoint` (checkpointing.py), `find_latest_valid` and the
on-disk layout (files.py), logical tensors (state.py), RNG states (rng.py).
"""

from paratron.checkpoint.checkpointing import (layout_of, load_checkpoint, load_rng_states,
                                               save_checkpoint)
from paratron.checkpoint.files import (checkpoint_dir, find_latest_valid, read_latest,
                                       read_metadata, verify_checkpoint)

__all__ = ["checkpoint_dir", "find_latest_valid", "layout_of", "load_checkpoint",
           "load_rng_states", "read_latest", "read_metadata", "save_checkpoint", "verify_checkpoint"]
