"""Synthetic tiny checkpoints in the public layouts, for tests and the test model family."""
