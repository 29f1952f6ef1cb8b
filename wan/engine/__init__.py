"""Request -> video: task recipes, the denoising loop, guidance, expert switching, seeds, cancel.

    from wan.engine import Engine, GenerationRequest
    result = Engine().generate(GenerationRequest(model="wan2.1-t2v-1.3B", prompt="a fox in snow"))

Names are imported on first use, so ``wan.engine.request`` (plain data) does not import torch:
the web app serves its first page before any model code loads.
"""

import importlib

_EXPORTS = {
    "Engine": "engine", "GenerationResult": "engine", "draw_noise": "engine", "request_from_metadata": "engine",
    "Cancelled": "loop", "CancelToken": "loop", "StepInfo": "loop", "PhasePlan": "phases", "expert_plan": "phases",
    "GenerationRequest": "request", "LoraChoice": "request", "RequestError": "request", "resolve_request": "request",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"wan.engine.{_EXPORTS[name]}"), name)
