"""LoRA support: file formats, compatibility checks, conversion and run-time application."""
