"""Part 7: the VAE decode of Wan 2.1 and 2.2 at 480p and 720p, 81 frames, whole frames and tiled.

The VAEs are built and called as the engine builds and calls them: ``wan.load_vae`` (float32) from
a checkpoint in the official layout, random weights at the real sizes (2.1: dim 96, z 16; 2.2:
encoder dim 160, decoder dim 256, z 48) drawn once on the device with the rule of
``wan.testing.tiny_vae.random_vae_state_dict`` (convolutions std 1/sqrt(fan-in), so activations keep
their scale) and written into ``ctx.work``; then ``vae.decode(latent, tile=vae_tiling(profile,
size))`` with the engine's ``vae_tiling`` under the default profile with ``vae.tiling`` off or on
(tiles of 256 px overlapping by 64, the profile defaults). The latents are normalised N(0, 1)
noise; each decode runs once (after a small warm-up decode per model), so the times include no
averaging.

Sizes: 832x480 for both; 720p is 1280x720 for 2.1 and 1280x704 for 2.2 (the TI2V-5B size: its
latent height must be even). The 480p cases run first; from their times the 720p cases get the
most frames of 81, 61, 41, 21, 9 that fit the part's time limit (a note says when fewer than 81).
A case that runs out of memory is a row saying so. The tiled-versus-whole difference is the max
relative and the mean absolute difference of the two decoded videos (in [-1, 1]).

Dry run: the tiny test VAEs, a 5-frame 64x64 video, tiles of 32 px overlapping by 16 so that the
tiling path runs.
"""

from __future__ import annotations

import math
import time

import torch

from gpu_parts.common import Ctx, Peak, case_error, free_memory, gib, is_oom, measured, ms, rel_diff, sync

VERSIONS = ("2.1", "2.2")
FULL_CONFIGS = {
    "2.1": dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temporal_downsample=[False, True, True]),
    "2.2": dict(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temporal_downsample=[False, True, True]),
}
SIZES = {"480p": {"2.1": (832, 480), "2.2": (832, 480)}, "720p": {"2.1": (1280, 720), "2.2": (1280, 704)}}
FRAMES = 81
FRAME_CHOICES = (81, 61, 41, 21, 9, 5)
SOFT_LIMIT_S = {False: 135.0, True: 60.0}   # (dry) no case starts that is expected to end after this


def soft_left(ctx: Ctx, data: dict) -> float:
    """Seconds left for cases to end in: the soft limit, or less when the driver gave less time."""
    return min(SOFT_LIMIT_S[ctx.dry] - (time.perf_counter() - data["t_start"]), ctx.time_left() - 15.0)
DRY_TILE = {"vae.tile_px": 32, "vae.overlap_px": 16}


def _config(ctx: Ctx, version: str) -> dict:
    from wan.testing.tiny_vae import TINY_VAE_CONFIGS
    return dict(TINY_VAE_CONFIGS[version] if ctx.dry else FULL_CONFIGS[version])


def random_state(version: str, config: dict, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights in the official layout, drawn on ``device`` by the rule of
    ``wan.testing.tiny_vae.random_vae_state_dict`` (which draws on the CPU: slow at 705M weights)."""
    from wan.testing.tiny_vae import build_vae
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_vae(version, **config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if key.endswith("gamma"):
            t.mul_(0.1).add_(1.0)
        elif key.endswith("bias"):
            t.mul_(0.05)
        else:
            t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
        out[key] = t.cpu()
    return out


def weights_file(ctx: Ctx, version: str):
    """The random checkpoint of ``version`` in ``ctx.work`` (written once)."""
    import os
    from safetensors.torch import save_file
    path = ctx.work / f"vae{version.replace('.', '')}_{'tiny' if ctx.dry else 'full'}_random_fp32.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(random_state(version, _config(ctx, version), ctx.device, ctx.seed), str(tmp))
        os.replace(tmp, path)
        free_memory()
    return path


def latent_shape(ctx: Ctx, version: str, size: tuple[int, int], frames: int) -> tuple[int, int, int, int]:
    w, h = size
    if version == "2.1":
        return ctx.latent_video(h, w, frames)
    return ctx.latent_video(h, w, frames, channels=48, stride=(4, 16))


def tilings(ctx: Ctx, size: tuple[int, int]):
    """(whole frames, tiled): what the engine's ``vae_tiling`` gives under the default profile with
    ``vae.tiling`` off and on."""
    from wan.engine.engine import vae_tiling
    from wan.optim.apply import resolve_profile
    extra = DRY_TILE if ctx.dry else {}
    off = vae_tiling(resolve_profile("default", {"vae.tiling": "off", **extra}), size)
    on = vae_tiling(resolve_profile("default", {"vae.tiling": "on", **extra}), size)
    return off, on


class Runner:
    """Loads one VAE at a time and decodes; keeps the times the 720p planning reads."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.vae = None
        self.version = None
        self.load_s: dict[str, float] = {}

    def load(self, version: str):
        import wan
        if self.version == version:
            return self.vae
        self.vae = None
        free_memory()
        path = weights_file(self.ctx, version)
        t0 = time.perf_counter()
        self.vae = wan.load_vae(path, device=self.ctx.device, dtype=torch.float32)  # as ModelManager._load
        sync(self.ctx.device)
        self.load_s[version] = time.perf_counter() - t0
        self.version = version
        # warm-up: the kernels' first use, at a small shape
        w = torch.randn(1, self.vae.z_dim, 2, 4, 4, device=self.ctx.device)
        self.vae.decode(w)
        sync(self.ctx.device)
        return self.vae

    def decode(self, z: torch.Tensor, tile) -> tuple[torch.Tensor | None, dict]:
        """(the video, or None after an OOM; the measurements)."""
        out: dict = {}
        video = None
        with Peak(self.ctx.device) as peak:
            t0 = time.perf_counter()
            try:
                video = self.vae.decode(z, tile=tile)  # as the engine calls it (no inference_mode there)
                sync(self.ctx.device)
                out["seconds"] = time.perf_counter() - t0
            except Exception as e:
                if not is_oom(e):
                    raise
                out["oom"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                video = None
        out.update(peak_allocated=peak.allocated, peak_reserved=peak.reserved, base_allocated=peak.base)
        return video, out


def run_size(ctx: Ctx, runner: Runner, label: str, frames: int, rows: list, data: dict,
             versions: tuple[str, ...] = VERSIONS) -> None:
    """The whole-frame and the tiled decode of both versions at one size."""
    for version in versions:
        size = SIZES[label][version]
        lat = latent_shape(ctx, version, size, frames)
        video_frames = (lat[1] - 1) * 4 + 1
        stride = 8 if version == "2.1" else 16
        name = f"{version} {label}"
        shown = f"{label} ({lat[3] * stride}x{lat[2] * stride})"
        try:
            runner.load(version)
        except Exception as e:
            if not is_oom(e):
                rows.append([version, shown, video_frames, "both", case_error(e), "–", "–", "–"])
                continue
            rows.append([version, shown, video_frames, "both", f"OOM loading the VAE: {e}".splitlines()[0][:200],
                         "–", "–", "–"])
            continue
        g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 1)
        z = torch.randn(1, *lat, generator=g, device=ctx.device)
        whole_cpu = None
        for tiled, tile in zip((False, True), tilings(ctx, size)):
            key = f"{name} {'tiled' if tiled else 'whole'}"
            how = f"tiles {tile.tile}/{tile.overlap} px" if tile is not None else "whole frames"
            left = soft_left(ctx, data)
            guess = data.get("estimate", {}).get(key)
            if guess is None and tiled and "seconds" in data["cases"].get(f"{name} whole", {}):
                guess = 2.5 * data["cases"][f"{name} whole"]["seconds"]  # tiles overlap: about twice the pixels
            if guess is not None and guess > left:
                rows.append([version, shown, video_frames, how,
                             f"skipped: time (~{guess:.0f} s expected, {left:.0f} s left)", "–", "–", "–"])
                continue
            try:
                video, m = runner.decode(z, tile)
            except Exception as e:
                rows.append([version, shown, video_frames, how, case_error(e), "–", "–", "–"])
                continue
            m.update(latent=list(lat), video_frames=video_frames, size=list(size), tile=None if tile is None else
                     [tile.tile, tile.overlap])
            diff = "–"
            if video is not None and not tiled:
                whole_cpu = video.cpu()
            elif video is not None and whole_cpu is not None:
                whole = whole_cpu.to(video.device)
                m["max_rel_diff"] = rel_diff(video, whole)
                m["mean_abs_diff"] = (video - whole).abs().mean().item()
                diff = f"{m['max_rel_diff']:.1e} / {m['mean_abs_diff']:.1e}"
                del whole
            data["cases"][key] = m
            if m.get("oom"):
                rows.append([version, shown, video_frames, how, f"OOM ({gib(m['peak_reserved'])} reserved at the time)",
                             "–", "–", "–"])
            else:
                rows.append([version, shown, video_frames, how, ms(m["seconds"]), gib(m["peak_allocated"]),
                             gib(m["peak_reserved"]), diff if tiled else "–"])
            del video
            free_memory()
        del z, whole_cpu
        free_memory()


def frames_for_720p(ctx: Ctx, data: dict, full: int) -> tuple[int, dict]:
    """The most frames of FRAME_CHOICES (at most ``full``) whose expected 720p decode times, scaled
    from the 480p ones by pixels and latent frames, fit the time left; and those estimates."""
    left = soft_left(ctx, data) - 2 * sum(data["load_s"].values())
    full_lat = (full - 1) // 4 + 1
    best, best_est = None, {}
    for f in [c for c in FRAME_CHOICES if c <= full]:
        est = {}
        for version in VERSIONS:
            (w4, h4), (w7, h7) = SIZES["480p"][version], SIZES["720p"][version]
            for kind in ("whole", "tiled"):
                t = data["cases"].get(f"{version} 480p {kind}", {}).get("seconds")
                if t is not None:
                    est[f"{version} 720p {kind}"] = t * (w7 * h7) / (w4 * h4) * ((f - 1) // 4 + 1) / full_lat
        best, best_est = f, est
        if sum(est.values()) <= 0.9 * left:
            return f, est
    return best, best_est


def run(ctx: Ctx) -> dict:
    if ctx.dry:  # tiny convolutions: one thread avoids the sync cost of several on a shared CPU
        torch.set_num_threads(1)
    data: dict = {"t_start": time.perf_counter(), "cases": {}}
    runner = Runner(ctx)
    data["load_s"] = runner.load_s
    full = 5 if ctx.dry else FRAMES
    rows: list = []
    notes: list[str] = []
    run_size(ctx, runner, "480p", full, rows, data)
    frames, estimate = frames_for_720p(ctx, data, full)
    data["estimate"] = estimate
    data["frames_720p"] = frames
    if frames < full:
        notes.append(f"720p at {frames} frames, not {full}: the 480p times scaled to 720p at {full} frames would "
                     "pass the part's time limit")
    run_size(ctx, runner, "720p", frames, rows, data, versions=VERSIONS[::-1])  # the loaded one first
    runner.vae = None
    free_memory()
    data.pop("t_start")
    tile_words = "32/16 px (dry run)" if ctx.dry else "256/64 px (the profile defaults)"
    notes += [
        "wan.load_vae float32 and vae.decode(z, tile=...) as the engine calls them; tiles from the engine's vae_tiling "
        f"(default profile, vae.tiling off / on), {tile_words}. One decode per case after a small warm-up decode; "
        "peaks are PyTorch's allocated / reserved, the VAE's weights and the latents included.",
        "VAE load (wan.load_vae to the device): " + ", ".join(f"{v} {ms(s)}" for v, s in runner.load_s.items()) + ".",
        "'tiled vs whole': max |tiled - whole| / max |whole|, then mean |tiled - whole| (video in [-1, 1]); tiling is "
        "not exact (tile borders see zero padding), so a difference is expected, its size is the finding.",
    ]
    if ctx.cuda:
        notes.append(f"cuDNN TF32 for convolutions: {torch.backends.cudnn.allow_tf32} (PyTorch's default; the project "
                     "does not set it for inference)")
    return measured(["VAE", "size", "frames", "decode", "time", "peak allocated", "peak reserved", "tiled vs whole (max rel / mean abs)"],
                    rows, notes=notes, data=data)
