"""What a generation says when the device (or the machine's RAM) runs out of memory.

A job that runs out of memory fails with :class:`GenerationOutOfMemory`: where it happened (loading
the models, encoding the inputs, which denoising step, decoding), on which device, under which
profile, and the settings that use less at that stage, in the flags and override keys of this
project. The engine unloads its models first (a half-moved model set is not kept), so the next job
starts from a clean device; the message says so.
"""

from __future__ import annotations

# stage -> what uses less memory there (the web app has the same settings in its form)
ADVICE = {
    "loading the models": (
        "a profile that keeps less on the GPU (--profile LowRAM_LowVRAM or VeryLowRAM_LowVRAM: the transformer "
        "streamed block by block), the transformer in fp8 (--set quantize.transformer=fp8: the model's fp8 "
        "file), or --set quantize.text_encoder=int8"),
    "encoding the inputs": (
        "--set quantize.text_encoder=int8, or a profile that keeps the text encoder off the GPU "
        "(LowRAM_LowVRAM, VeryLowRAM_LowVRAM)"),
    "denoising": (
        "fewer frames or a smaller size, sliding windows for a long clip (--sliding_window_size 33), a profile "
        "that streams more of the transformer (--profile LowRAM_LowVRAM or VeryLowRAM_LowVRAM), or --set "
        "memory.blocks_to_swap=N"),
    "decoding": "VAE tiling (--set vae.tiling=on), or a smaller size",
}


class GenerationOutOfMemory(RuntimeError):
    """A generation ran out of memory; the message says where, and what uses less there."""

    plain_message = True  # front-ends show the message without the class name

    def __init__(self, message: str, stage: str, cause: str = ""):
        super().__init__(message)
        self.stage = stage
        self.cause = cause  # the first line of the out-of-memory error itself


def stage_key(stage: str) -> str:
    """The :data:`ADVICE` key of a stage as the engine names it (``"denoising (step 3 of 30)"``)."""
    return next((key for key in ADVICE if stage.startswith(key)), "denoising")


def out_of_memory(exc: BaseException, stage: str, device, profile_label: str | None) -> GenerationOutOfMemory:
    """The error to raise for the out-of-memory ``exc`` raised while ``stage`` ran on ``device``."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    where = "the machine's RAM" if isinstance(exc, MemoryError) else str(device)
    under = f" under profile {profile_label}" if profile_label else ""
    return GenerationOutOfMemory(
        f"out of memory on {where} while {stage}{under} ({first}). Settings that use less: "
        f"{ADVICE[stage_key(stage)]}. The models were unloaded; the next job loads them again.", stage, first)
