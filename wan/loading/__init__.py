"""Checkpoint formats, key maps, dtype handling and downloads."""
from wan.loading.files import Checkpoint, CheckpointError, open_checkpoint  # noqa: F401
