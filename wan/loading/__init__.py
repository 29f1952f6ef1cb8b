"""Checkpoint formats, key maps, dtype handling and downloads.

The package imports nothing itself: ``wan.loading.download`` and ``wan.loading.readiness`` stay free
of torch, so the web page can say which models are ready before any model code loads.
"""
