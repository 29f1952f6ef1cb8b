"""The errors of a training run that are not bad settings (those are TrainConfigError, DataError, StateError)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run failed for a reason that is not a bad setting (the message says what to do)."""


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory; the message names the flags that lower it."""
