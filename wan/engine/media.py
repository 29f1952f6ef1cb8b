"""Media input and output of the engine: one import point.

Writing (``media_out``): ``save_outputs`` turns frames [T, H, W, 3] uint8 into an MP4 (T > 1) or a
PNG (T == 1) under a fresh, never-overwriting name, with the metadata JSON embedded, an optional
sidecar ``.json`` and latents ``.safetensors``, all written atomically; ``read_metadata`` gets the
metadata back; ``to_uint8_frames`` converts a decoded [3, T, H, W] video in [-1, 1].
Reading (``media_in``): ``load_image`` / ``load_video`` give tensors in [-1, 1] (a video decoded only
as far as asked, each frame resized as it comes); ``probe_video`` reads a video's size, length and
rate from its header; ``resize_video``.
"""

from wan.engine.media_in import RESIZE_MODES, load_image, load_video, probe_video, resize_video
from wan.engine.media_out import (
    METADATA_KEY,
    MP4_METADATA_TAG,
    OutputOptions,
    as_frames,
    crf_for_quality,
    encode_latents,
    encode_mp4,
    encode_png,
    metadata_to_json,
    read_metadata,
    remove_stale_temp_files,
    render_name,
    sanitize_name_part,
    save_outputs,
    to_uint8_frames,
    write_image,
    write_latents,
    write_video,
)

__all__ = [
    "METADATA_KEY",
    "MP4_METADATA_TAG",
    "RESIZE_MODES",
    "OutputOptions",
    "as_frames",
    "crf_for_quality",
    "encode_latents",
    "encode_mp4",
    "encode_png",
    "load_image",
    "load_video",
    "metadata_to_json",
    "probe_video",
    "read_metadata",
    "remove_stale_temp_files",
    "render_name",
    "resize_video",
    "sanitize_name_part",
    "save_outputs",
    "to_uint8_frames",
    "write_image",
    "write_latents",
    "write_video",
]
