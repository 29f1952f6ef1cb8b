"""The networks only: no memory policy, no device moves, no global flags (see DESIGN.md)."""
