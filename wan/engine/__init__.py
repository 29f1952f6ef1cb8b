"""Request -> video: task recipes, the denoising loop, guidance, expert switching, seeds, cancel.

    from wan.engine import Engine, GenerationRequest
    result = Engine().generate(GenerationRequest(model="wan2.1-t2v-1.3B", prompt="a fox in snow"))
"""

from wan.engine.engine import Engine, GenerationResult, draw_noise, request_from_metadata  # noqa: F401
from wan.engine.loop import Cancelled, CancelToken, ExpertPlan, StepInfo  # noqa: F401
from wan.engine.request import GenerationRequest, LoraChoice, RequestError, resolve_request  # noqa: F401
