"""The networks only: no memory policy, no device moves, no process-wide switches (see DESIGN.md)."""
