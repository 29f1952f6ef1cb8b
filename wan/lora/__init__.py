"""LoRA support: file formats, compatibility checks, conversion and run-time application."""


class LoraError(ValueError):
    """A LoRA of a job cannot be used: the file, name or multiplier (``value``) and what is
    ``allowed``. The engine reports it as a request error on the ``loras`` field."""

    def __init__(self, value, allowed: str):
        self.value, self.allowed = value, allowed
        super().__init__(f"{value!r} is not allowed; {allowed}")
