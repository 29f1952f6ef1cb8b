"""Input videos cost what the job needs, not what the upload holds (issue 11, item 4).

A job decodes only the frames it uses and resizes each as it is decoded, with the same numbers as
resizing the whole clip; ``probe_video`` gives a video's size, length and rate from its header alone,
for the checks made when a request is submitted.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from wan.engine.conditioning import Inputs, resize, resize_cover
from wan.engine.media import load_video, probe_video
from wan.engine.request import RequestError


def write_clip(path, frames: int, width: int, height: int, fmt: str | None = None, codec: str = "libx264",
               noise: bool = True, **options) -> None:
    """A clip of random (noise) or flat frames, 16 fps."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=options) as c:
        s = c.add_stream(codec, rate=16)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
                      else np.full((height, width, 3), 4 * i % 256, np.uint8))
            for p in s.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


class CountingContainer:
    """Wraps a PyAV input container and counts the frames decoded from it."""

    def __init__(self, container, counts: list):
        self.container, self.counts = container, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    @property
    def streams(self):
        return self.container.streams

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.counts[-1] += 1
            yield frame


def test_a_job_decodes_only_the_frames_it_needs(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    write_clip(path, 48, 160, 120, noise=False)
    counts, real_open = [], av.open

    def counting_open(*args, **kwargs):
        counts.append(0)
        return CountingContainer(real_open(*args, **kwargs), counts)
    monkeypatch.setattr(av, "open", counting_open)
    inputs = Inputs(SimpleNamespace(video=str(path)))
    for fit in ("squash", "cover"):
        video = inputs.video("video", 5, 64, 96, fit=fit)
        assert video.shape == (3, 5, 64, 96) and video.dtype == torch.float32 and video.is_contiguous()
    assert counts == [5, 5]  # the former reader decoded all 48 frames, to float32, for each
    with pytest.raises(RequestError, match="at least 49 frames.*it has 48"):
        inputs.video("video", 49, 64, 96)


@pytest.mark.parametrize("fit, height, width", [("squash", 40, 56), ("squash", 100, 150),
                                                  ("cover", 48, 48), ("cover", 70, 60), ("cover", 64, 96)])
def test_frames_resized_as_they_are_decoded_equal_the_clip_resized(tmp_path, fit, height, width):
    """Exactly (torch.equal) what the former reader gave: the whole clip in [-1, 1], then the first
    frames, then the resize of the clip."""
    path = tmp_path / "clip.mp4"
    write_clip(path, 12, 96, 64)
    whole, fps = load_video(path)
    fit_clip = (lambda c: resize_cover(c, height, width)) if fit == "cover" else (lambda c: resize(c, height, width))
    former = fit_clip(whole[:, :7])
    streamed, streamed_fps = load_video(path, max_frames=7, transform=fit_clip)
    assert torch.equal(streamed, former) and streamed_fps == fps == 16.0
    assert torch.equal(Inputs(SimpleNamespace(video=str(path))).video("video", 7, height, width, fit=fit), former)
    # asking for more frames than the file has gives them all, as a plain contiguous tensor
    rest, _ = load_video(path, max_frames=50, transform=fit_clip)
    assert rest.is_contiguous() and torch.equal(rest, fit_clip(whole))
    assert torch.equal(load_video(path, max_frames=50)[0], whole)


def test_probe_reads_the_header_only(tmp_path):
    mp4 = tmp_path / "clip.mp4"
    write_clip(mp4, 30, 160, 120, movflags="faststart")  # the index (moov) before the frames
    assert probe_video(mp4) == (160, 120, 30, 16.0)
    data = mp4.read_bytes()
    cut = tmp_path / "cut.mp4"  # the header and a few frames: enough for the probe, not to decode all
    cut.write_bytes(data[: len(data) // 20])
    assert probe_video(cut) == (160, 120, 30, 16.0)
    with pytest.raises(ValueError, match="cut.mp4"):
        load_video(cut)
    # WebM stores no frame count: duration x rate
    webm = tmp_path / "clip.webm"
    write_clip(webm, 20, 96, 64, fmt="webm", codec="libvpx-vp9", noise=False)
    assert probe_video(webm) == (96, 64, 20, 16.0)


def test_probe_errors_are_value_errors_naming_the_path_and_reason(tmp_path):
    with pytest.raises(ValueError, match="missing.mp4: no such file"):
        probe_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="not a file"):
        probe_video(tmp_path)
    (tmp_path / "junk.mp4").write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match="junk.mp4: cannot read the video"):
        probe_video(tmp_path / "junk.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4: cannot read the video"):
        probe_video(tmp_path / "empty.mp4")
    with av.open(str(tmp_path / "sound.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    with pytest.raises(ValueError, match="sound.m4a: has no video stream"):
        probe_video(tmp_path / "sound.m4a")
