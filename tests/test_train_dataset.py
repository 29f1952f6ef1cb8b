"""musubi-tuner's dataset TOML as musubi reads it for Wan (wan/train/dataset_config.py), its bucket
rule (buckets.py), its frame extraction (frames.py) and the items a dataset lists (dataset_items.py).
Expected values are computed by hand from musubi's rules (see each module's docstring)."""

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wan.config import ConfigError
from wan.train.buckets import (BucketSelector, area_bucket, bucket_sizes, control_size, image_bucket_selector,
                               resize_plan, video_bucket_selector)
from wan.train.dataset_config import DatasetConfigError, load_dataset_config
from wan.train.dataset_items import (MUSUBI_CACHE_NAMES, cache_state, dataset_report, expected_cache_files,
                                     list_items)
from wan.train.frames import (frame_windows, kept_frame_indices, loaded_frame_count, normalise_target_frames,
                              round_to_4n1, video_windows)

DATA = Path(__file__).parent / "data" / "musubi_datasets"


def _fields(bp, names):
    return {name: getattr(bp, name) for name in names}


# ----------------------------------------------------------------------------- documented examples

# file -> per dataset, the blueprint fields expected (paths as written; defaults filled in)
EXAMPLES = {
    "image_captions.toml": [dict(
        is_video=False, image_directory=Path("/data/stills"), cache_directory=Path("/data/cache/stills"),
        resolution=(960, 544), caption_extension=".txt", batch_size=1, num_repeats=1, enable_bucket=True,
        bucket_no_upscale=False, control_directory=None, notes=())],
    "image_jsonl.toml": [dict(
        is_video=False, image_jsonl_file=Path("/data/stills.jsonl"), image_directory=None,
        cache_directory=Path("/data/cache/stills_jsonl"), caption_extension=None, enable_bucket=True)],
    "video_captions.toml": [
        dict(is_video=True, video_directory=Path("/data/clips"), cache_directory=Path("/data/cache/clips"),
             target_frames=(1, 25, 45), frame_extraction="head", source_fps=30.0, max_frames=129, notes=()),
        dict(is_video=True, video_directory=Path("/data/clips2"), target_frames=(1,), frame_extraction="full",
             max_frames=45, source_fps=None, notes=())],
    "video_jsonl.toml": [
        dict(is_video=True, video_jsonl_file=Path("/data/clips.jsonl"), cache_directory=Path("/data/cache/clips_head"),
             target_frames=(1, 25, 45), frame_extraction="head", source_fps=30.0),
        # the documented example gives frame_stride without slide: musubi reads it as head
        dict(is_video=True, video_jsonl_file=Path("/data/clips.jsonl"),
             cache_directory=Path("/data/cache/clips_stride"), target_frames=(1,), frame_extraction="head",
             frame_stride=10, notes=("frame_stride is used only by slide extraction",))],
    "frame_extraction.toml": [
        dict(frame_extraction="head", target_frames=(1, 13, 25), notes=()),
        dict(frame_extraction="chunk", target_frames=(13, 25), notes=()),
        dict(frame_extraction="slide", target_frames=(1, 13, 25), frame_stride=10, notes=()),
        dict(frame_extraction="uniform", target_frames=(1, 13, 25), frame_sample=4, notes=()),
        dict(frame_extraction="full", target_frames=(1,), max_frames=31, notes=())],
    "control_images.toml": [
        dict(is_video=False, control_directory=Path("/data/originals"), control_resolution=(1024, 1024),
             no_resize_control=False, resolution=(960, 544), enable_bucket=False, control_count=1),
        dict(is_video=False, image_jsonl_file=Path("/data/edited.jsonl"), no_resize_control=True,
             control_resolution=None)],
    "control_videos.toml": [dict(
        is_video=True, video_directory=Path("/data/moves"), control_directory=Path("/data/poses"),
        target_frames=(1, 25, 45), caption_extension=".txt")],
    "specification.toml": [
        # a dataset's own value wins over [general]; bucket_no_upscale is off without enable_bucket
        dict(is_video=False, caption_extension=".caption", batch_size=4, enable_bucket=False, bucket_no_upscale=False,
             control_directory=Path("/data/image_controls"), cache_directory=Path("/data/cache/images")),
        # one number is a square resolution; [general] fills the rest
        dict(is_video=False, resolution=(512, 512), batch_size=1, enable_bucket=True, caption_extension=".txt"),
        # no cache_directory: the cache goes in the video directory; the documented 79 is not 4N+1: 77
        dict(is_video=True, cache_directory=Path("/data/videos"), target_frames=(1, 25, 77), frame_sample=4,
             control_directory=Path("/data/video_controls")),
        dict(is_video=True, video_jsonl_file=Path("/data/videos.jsonl"), target_frames=(1, 77))],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_documented_examples_give_the_expected_blueprints(name):
    config = load_dataset_config(DATA / name)
    assert config.path == DATA / name
    assert len(config.datasets) == len(EXAMPLES[name])
    for index, (bp, expected) in enumerate(zip(config.datasets, EXAMPLES[name])):
        assert bp.index == index and bp.key == f"datasets[{index}]"
        assert _fields(bp, expected) == expected


def test_every_shipped_example_loads():
    assert sorted(p.name for p in DATA.glob("*.toml")) == sorted(EXAMPLES)


def test_musubi_notes_and_normalisation(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[general]\ncaption_extension = ".txt"\nbucket_no_upscale = true\n'
                    '[[datasets]]\nvideo_directory = "v"\ntarget_frames = [25, 2, 24, 1]\n'
                    'frame_extraction = "uniform"\n'
                    '[[datasets]]\nimage_directory = "i"\nresolution = [500, 300]\n'
                    'qwen_image_edit_control_resolution = [512, 512]\n')
    video, image = load_dataset_config(path, base_dir=tmp_path).datasets
    assert video.target_frames == (1, 21, 25) and video.frame_extraction == "head"
    assert video.video_directory == tmp_path / "v" and video.cache_directory == tmp_path / "v"
    assert not video.bucket_no_upscale
    assert "target_frames [25, 2, 24, 1] are read as [1, 21, 25] (each rounded down to 4N+1)" in video.notes
    assert "frame_extraction uniform with frame_sample 1 is head" in video.notes
    assert any(n.startswith("musubi caches videos with enable_bucket on") for n in video.notes)
    assert image.control_resolution == (512, 512)
    assert "qwen_image_edit_control_resolution is the old name of control_resolution" in image.notes
    assert any("500x300 is used as is" in n for n in image.notes)


# ----------------------------------------------------------------------------- bad files

BAD = [
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\nframe_extraction = "middle"\n',
     "datasets[0].frame_extraction", "'middle' is not allowed; expected one of head, chunk, slide, uniform, full"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\nframe_extracton = "head"\n',
     "datasets[0].frame_extracton", "unknown key (did you mean frame_extraction?); allowed keys here: resolution"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\nbatch_size = "2"\n',
     "datasets[0].batch_size", "'2' is not allowed; expected an integer >= 1"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\nnum_repeats = 0\n',
     "datasets[0].num_repeats", "0 is not allowed; expected an integer >= 1"),
    ('[general]\nenable_bucket = 1\n[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\n',
     "general.enable_bucket", "1 is not allowed; expected true or false"),
    ('[general]\ncache_directory = "c"\n[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\n',
     "general.cache_directory", "goes in each [[datasets]] table (each dataset needs its own), not in [general]"),
    ('[general]\ntarget_frames = [1]\n[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\n',
     "general.target_frames", "goes in each [[datasets]] table, not in [general]"),
    ('[general]\nresolution = [960]\n[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\n',
     "general.resolution", "[960] is not allowed; expected one integer or [width, height], each >= 16"),
    ('[[datasets]]\nimage_directory = "i"\nvideo_directory = "v"\ncaption_extension = ".txt"\n',
     "datasets[0].video_directory", "a dataset holds images or videos, not both; this one also has image_directory"),
    ('[[datasets]]\ncaption_extension = ".txt"\ncache_directory = "c"\n',
     "datasets[0]", "required key is missing: give one of image_directory, image_jsonl_file, video_directory"),
    ('[[datasets]]\nimage_directory = "i"\nimage_jsonl_file = "i.jsonl"\ncache_directory = "c"\n'
     'caption_extension = ".txt"\n',
     "datasets[0].image_jsonl_file", "give image_directory or image_jsonl_file, not both"),
    ('[[datasets]]\nvideo_jsonl_file = "v.jsonl"\n',
     "datasets[0].cache_directory", "required with video_jsonl_file"),
    ('[[datasets]]\nvideo_directory = "v"\n',
     "datasets[0].caption_extension", "required with video_directory (here or in [general])"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = "txt"\n',
     "datasets[0].caption_extension", "'txt' is not allowed; expected a file extension starting with '.'"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\ntarget_frames = [1]\n',
     "datasets[0].target_frames", "is a key of video datasets; this dataset has image_directory"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\nno_resize_control = true\n',
     "datasets[0].no_resize_control", "is a key of image datasets; this dataset has video_directory"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\ntarget_frames = [1, 0]\n',
     "datasets[0].target_frames[1]", "0 is not allowed; expected an integer >= 1"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\ntarget_frames = 17\n',
     "datasets[0].target_frames", "17 is not allowed; expected a list"),
    ('[[datasets]]\nvideo_directory = "v"\ncaption_extension = ".txt"\nsource_fps = "30"\n',
     "datasets[0].source_fps", "'30' is not allowed; expected a number > 0"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\nmultiple_target = true\n',
     "datasets[0].multiple_target", "is for Qwen-Image-Layered training"),
    ('[[datasets]]\nimage_directory = "i"\ncaption_extension = ".txt"\n'
     '[[datasets]]\nimage_directory = "j"\ncache_directory = "i"\ncaption_extension = ".txt"\n',
     "datasets[1].cache_directory", "'i' is the cache directory of datasets[0] too; each dataset needs its own"),
    ('[[datasets]]\nvideo_jsonl_file = "a.jsonl"\ncache_directory = "c"\n'
     '[[datasets]]\nvideo_jsonl_file = "a.jsonl"\ncache_directory = "./c/"\n',
     "datasets[1].cache_directory", "is the cache directory of datasets[0] too"),
    ('[dataset]\nimage_directory = "i"\n', "dataset", "unknown key (did you mean datasets?)"),
    ('[general]\nbatch_size = 1\n', "datasets", "no dataset: add at least one [[datasets]] table"),
    ('[datasets]\nimage_directory = "i"\n', "datasets", "is not allowed; expected a list"),
]


@pytest.mark.parametrize("text, key, words", BAD, ids=[f"{key}:{words[:30]}" for _, key, words in BAD])
def test_bad_files_name_the_file_and_key(tmp_path, text, key, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(DatasetConfigError) as e:
        load_dataset_config(path)
    assert isinstance(e.value, ConfigError)
    assert str(e.value).startswith(f"{path}: {key}: "), str(e.value)
    assert words in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DatasetConfigError, match="file not found"):
        load_dataset_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[[datasets]\n")
    with pytest.raises(DatasetConfigError, match="not valid TOML"):
        load_dataset_config(tmp_path / "bad.toml")


# ----------------------------------------------------------------------------- buckets

# 256x256: area 65536, sqrt 256; widths 128..256 by 16, height = 65536 // w rounded down to 16
BUCKETS_256 = ((128, 512), (144, 448), (160, 400), (176, 368), (192, 336), (208, 304), (224, 288), (240, 272),
               (256, 256), (272, 240), (288, 224), (304, 208), (336, 192), (368, 176), (400, 160), (448, 144),
               (512, 128))


def test_bucket_table():
    assert bucket_sizes((256, 256)) == BUCKETS_256
    sizes = bucket_sizes((960, 544))  # area 522240, sqrt 722: widths 352..736 (736 < 722 + 16)
    assert sizes[0] == (352, 1472) and sizes[-1] == (1472, 352)  # 522240 // 352 = 1483 -> 1472
    assert {(960, 544), (544, 960), (720, 720), (832, 624), (704, 736), (736, 704)} <= set(sizes)
    assert len(sizes) == 47  # 25 widths x 2, less 720x720 and 704/736 found twice


@pytest.mark.parametrize("size, bucket", [
    ((1920, 1080), (960, 544)), ((1080, 1920), (544, 960)), ((1024, 1024), (720, 720)), ((640, 480), (832, 624)),
    ((960, 544), (960, 544)), ((100, 3000), (352, 1472))])
def test_nearest_aspect_bucket(size, bucket):
    assert image_bucket_selector((960, 544), True, False).bucket(size) == bucket


def test_bucket_flags():
    no_upscale = BucketSelector((960, 544), True, True)
    assert no_upscale.bucket((500, 300)) == (496, 288)  # smaller: own size rounded down to 16
    assert no_upscale.bucket((1920, 1080)) == (960, 544)  # larger: the usual bucket
    off = image_bucket_selector((960, 544), False, True)
    assert not off.no_upscale and off.sizes == ((960, 544),)
    assert off.bucket((1080, 1920)) == off.bucket((500, 300)) == (960, 544)
    assert video_bucket_selector((960, 544)).bucket((1080, 1920)) == (544, 960)  # videos always bucketed


def test_control_sizes_and_resize_plan():
    assert area_bucket((1920, 1080), (1024, 1024)) == (1360, 768)
    assert control_size((700, 500), (960, 544), False, None) == (960, 544)
    assert control_size((700, 500), (960, 544), True, None) == (688, 496)
    assert control_size((700, 500), (960, 544), True, (1024, 1024)) == (700, 500)
    assert control_size((1920, 1080), (960, 544), True, (1024, 1024)) == (1360, 768)
    assert control_size((1920, 1080), (960, 544), False, (1024, 1024)) == (1360, 768)
    plan = resize_plan((1920, 1080), (960, 544))  # scale 544/1080: 1920 -> 967, crop 3 px each side
    assert plan.scaled == (967, 544) and plan.crop == (3, 0, 963, 544) and not plan.upscale
    assert resize_plan((100, 50), (208, 112)).upscale


# ----------------------------------------------------------------------------- frames


def test_target_frames_and_rounding():
    assert [round_to_4n1(n) for n in (1, 2, 4, 5, 8, 9, 80)] == [1, 1, 1, 5, 5, 9, 77]
    assert normalise_target_frames([25, 2, 24, 1]) == (1, 21, 25)


# The documented 40-frame examples, each mode
@pytest.mark.parametrize("mode, targets, kwargs, windows", [
    ("head", (1, 13, 25), {}, [(0, 1), (0, 13), (0, 25)]),
    ("chunk", (13, 25), {}, [(0, 13), (13, 13), (26, 13), (0, 25)]),
    ("slide", (1, 13, 25), {"frame_stride": 10},
     [(0, 1), (10, 1), (20, 1), (30, 1), (0, 13), (10, 13), (20, 13), (0, 25), (10, 25)]),
    ("uniform", (1, 13, 25), {"frame_sample": 4},
     [(0, 1), (13, 1), (26, 1), (39, 1), (0, 13), (9, 13), (18, 13), (27, 13), (0, 25), (5, 25), (10, 25), (15, 25)]),
    ("full", (1,), {"max_frames": 31}, [(0, 29)]),  # 31 is not 4N+1: 29 (the docs' diagram says 31)
])
def test_frame_windows_of_40_frames(mode, targets, kwargs, windows):
    assert frame_windows(40, targets, mode, **kwargs) == windows


def test_frame_windows_edges():
    assert frame_windows(20, (1,), "full", max_frames=31) == [(0, 17)]
    assert frame_windows(25, (1,), "full", max_frames=31) == [(0, 25)]
    assert frame_windows(10, (1, 13), "head") == [(0, 1)]
    assert frame_windows(20, (1,), "uniform", frame_sample=4) == [(0, 1), (6, 1), (12, 1), (19, 1)]  # truncated
    assert frame_windows(3, (1,), "uniform", frame_sample=5) == [(0, 1), (0, 1), (1, 1), (1, 1), (2, 1)]
    assert frame_windows(3, (1,), "chunk") == [(0, 1), (1, 1), (2, 1)]
    assert frame_windows(40, (1, 13), "uniform", frame_sample=1) == [(0, 1), (0, 13)]  # head
    assert frame_windows(0, (1,), "head") == []


def test_frame_rate_conversion():
    assert kept_frame_indices(5, None) == [0, 1, 2, 3, 4]
    assert kept_frame_indices(17, 32.0) == list(range(9))  # every other frame
    assert kept_frame_indices(5, 8.0) == [0, 2, 4, 6, 8]  # slower than 16 fps: indices skip
    assert kept_frame_indices(30, 30.0) == list(range(16))  # one second at 30 -> 16 frames
    assert loaded_frame_count(60, 30.0) == 32
    assert loaded_frame_count(17, 8.0, end_frame=17) == 9  # indices 0, 2, ..., 16
    assert loaded_frame_count(100, None, end_frame=45) == 45
    assert video_windows(60, (1, 25, 45), "head", source_fps=30.0) == (32, [(0, 1), (0, 25)])
    assert video_windows(60, (1, 25, 45), "head") == (45, [(0, 1), (0, 25), (0, 45)])


# ----------------------------------------------------------------------------- items and the report


def _video(path: Path, frames: int, size=(32, 32)):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), i * 10, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def _image(path: Path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)


@pytest.fixture
def dataset_dir(tmp_path, monkeypatch):
    """Images (one without caption, one broken), videos (one short, without caption or control)."""
    monkeypatch.chdir(tmp_path)
    for name, size in {"a": (64, 32), "b": (32, 32), "c": (32, 64)}.items():
        _image(tmp_path / "img" / f"{name}.png", size)
    (tmp_path / "img" / "a.txt").write_text(" a red box \n")
    (tmp_path / "img" / "c.txt").write_text("tall")
    (tmp_path / "img" / "d.png").write_bytes(b"")
    (tmp_path / "img" / "d.txt").write_text("broken")
    (tmp_path / "img" / "notes.md").write_text("not an image")
    for folder in ("vid", "ctl", "cache"):
        (tmp_path / folder).mkdir()
    _video(tmp_path / "vid" / "clip.mp4", 17)
    _video(tmp_path / "vid" / "short.mp4", 9)
    _video(tmp_path / "ctl" / "clip.mov", 5)
    (tmp_path / "vid" / "clip.txt").write_text("a clip")
    (tmp_path / "d.toml").write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nenable_bucket = true\n'
        '[[datasets]]\nimage_directory = "img"\ncache_directory = "cache"\n'
        '[[datasets]]\nvideo_directory = "vid"\ncontrol_directory = "ctl"\ntarget_frames = [1, 9, 17]\n')
    return tmp_path


def test_items_of_an_image_directory(dataset_dir):
    listing = list_items(load_dataset_config("d.toml").datasets[0])
    items = {i.name: i for i in listing.items}
    assert sorted(items) == ["a.png", "b.png", "c.png", "d.png"]
    a, b, c, d = (items[n] for n in ("a.png", "b.png", "c.png", "d.png"))
    assert a.key == "img/a.png" and a.caption == "a red box" and a.size == (64, 32) and a.bucket == (32, 32)
    assert c.bucket == (16, 64)  # 32x32 buckets: 16x64, 32x32, 64x16; aspect 0.5 is nearest 0.25
    assert not b.used and b.problems[0].kind == "caption" and "musubi leaves the image out" in b.problems[0].message
    assert d.used and d.size is None and d.problems[0].kind == "unreadable"
    latents, text = expected_cache_files(listing.blueprint, a)
    assert latents == (Path("cache/a_0064x0032_wan.safetensors"),) and text == Path("cache/a_wan_te.safetensors")


def test_items_of_a_video_directory(dataset_dir):
    listing = list_items(load_dataset_config("d.toml").datasets[1])
    clip, short = listing.items
    assert clip.key == "vid/clip.mp4" and clip.caption == "a clip" and clip.controls == ("ctl/clip.mov",)
    assert (clip.size, clip.frame_count, clip.loaded_frames, clip.bucket) == ((32, 32), 17, 17, (32, 32))
    assert clip.windows == ((0, 1), (0, 9), (0, 17)) and clip.problems == ()
    assert short.windows == ((0, 1), (0, 9))
    assert [p.kind for p in short.problems] == ["caption", "control"]
    latents, text = expected_cache_files(listing.blueprint, clip)
    assert [p.name for p in latents] == ["clip_00000-001_0032x0032_wan.safetensors",
                                         "clip_00000-009_0032x0032_wan.safetensors",
                                         "clip_00000-017_0032x0032_wan.safetensors"]
    assert text == Path("vid/clip_wan_te.safetensors")


def test_cache_state(dataset_dir):
    bp = load_dataset_config("d.toml").datasets[0]
    for name in ("a_0064x0032_wan.safetensors", "a_wan_te.safetensors", "gone_0032x0032_wan.safetensors"):
        (dataset_dir / "cache" / name).write_bytes(b"")
    state = cache_state(list_items(bp))
    assert (state.latents, state.texts, state.other_latents) == ((1, 2), (1, 2), 1)

    class Flat:  # another naming, as the cache module may pass
        latent_pattern = "*.lat"

        def latent_name(self, base, size, window):
            return f"{base}.lat"

        def text_name(self, base):
            return f"{base}.txt.te"

    assert cache_state(list_items(bp), Flat()).latents == (0, 2)
    assert MUSUBI_CACHE_NAMES.latent_name("clip", (1920, 1080), (5, 17)) == "clip_00005-017_1920x1080_wan.safetensors"
    assert MUSUBI_CACHE_NAMES.text_name("clip") == "clip_wan_te.safetensors"


def test_report_text(dataset_dir):
    (dataset_dir / "cache" / "a_wan_te.safetensors").write_bytes(b"")
    report = dataset_report(load_dataset_config("d.toml"))
    lines = report.splitlines()
    unreadable = next(i for i, line in enumerate(lines) if line.startswith("    d.png: cannot read the image"))
    lines[unreadable] = "    d.png: cannot read the image"
    assert lines == [
        "d.toml: 2 dataset(s)",
        "",
        "datasets[0]: image dataset, image_directory img",
        "  resolution 32x32, enable_bucket true, bucket_no_upscale false, batch_size 1",
        "  cache_directory cache",
        "  items: 4 found, 3 used; 2 per epoch with num_repeats 1",
        "  buckets: 16x64: 1, 32x32: 1",
        "  missing captions (1):",
        "    b.png: no caption file b.txt; musubi leaves the image out",
        "  unreadable files (1):",
        "    d.png: cannot read the image",
        "  cache: 0 of 2 latent files, 1 of 2 text-encoder files present",
        "",
        "datasets[1]: video dataset, video_directory vid",
        "  resolution 32x32, enable_bucket true, bucket_no_upscale false, batch_size 1, target_frames [1, 9, 17], "
        "frame_extraction head",
        "  control_directory ctl",
        "  cache_directory vid",
        "  items: 2, 5 windows; 5 per epoch with num_repeats 1",
        "  buckets: 32x32x1: 2, 32x32x9: 2, 32x32x17: 1",
        "  frames per item (2):",
        "    clip.mp4: 17 frames -> [0:1] [0:9] [0:17]",
        "    short.mp4: 9 frames -> [0:1] [0:9]",
        "  missing captions (1):",
        "    short.mp4: no caption file short.txt; musubi stops when caching text",
        "  control problems (1):",
        "    short.mp4: no control video or folder short in ctl",
        "  cache: 0 of 5 latent files, 0 of 2 text-encoder files present",
    ]


def test_image_controls_are_matched_as_musubi_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "ab.png", "b.png"):
        _image(tmp_path / "img" / name, (64, 32))
        (tmp_path / "img" / name).with_suffix(".txt").write_text(name)
    _image(tmp_path / "ctl" / "a.jpg", (100, 50))
    _image(tmp_path / "ctl" / "a_0.png", (64, 32))
    _image(tmp_path / "ctl" / "ab.png", (64, 32))
    _image(tmp_path / "ctl" / "b_mask.png", (64, 32))
    (tmp_path / "d.toml").write_text(
        '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\ncontrol_directory = "ctl"\n'
        'resolution = [32, 32]\nno_resize_control = true\ncache_directory = "c1"\n'
        '[[datasets]]\nimage_directory = "img"\ncaption_extension = ".txt"\ncontrol_directory = "ctl"\n'
        'fp_1f_clean_indices = [0, 2]\nfp_1f_target_index = 1\ncache_directory = "c2"\n')
    one, two = (list_items(bp) for bp in load_dataset_config("d.toml").datasets)
    items = {i.name: i for i in one.items}
    assert items["a.png"].controls == ("ctl/a.jpg",)  # the plain name before a_0
    assert items["a.png"].control_sizes == ((96, 48),)  # no_resize_control: own size rounded down to 16
    assert items["ab.png"].controls == ("ctl/ab.png",)  # longer names are matched first
    assert "b_mask.png: musubi stops here" in items["b.png"].problems[0].message
    items = {i.name: i for i in two.items}
    assert items["a.png"].controls == ("ctl/a.jpg", "ctl/a_0.png")  # one per clean index
    assert items["ab.png"].problems[0].message == "1 control image(s), 2 needed"


def test_jsonl_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "s" / "one.png", (32, 32))
    _image(tmp_path / "s" / "one_ctl.png", (48, 32))
    _image(tmp_path / "other" / "one.png", (32, 32))
    for i in range(5):
        _image(tmp_path / "frames" / f"{i:03d}.png", (48, 32))
    (tmp_path / "images.jsonl").write_text(
        '{"image_path": "s/one.png", "caption": "one", "control_path": "s/one_ctl.png"}\n'
        '{"image_path": "other/one.png", "caption": "again"}\n'
        'not json\n')
    (tmp_path / "videos.jsonl").write_text('{"video_path": "frames", "caption": "moving"}\n'
                                           '{"video_path": "missing.mp4"}\n')
    (tmp_path / "d.toml").write_text(
        '[[datasets]]\nimage_jsonl_file = "images.jsonl"\ncache_directory = "c1"\nresolution = 32\n'
        '[[datasets]]\nvideo_jsonl_file = "videos.jsonl"\ncache_directory = "c2"\ntarget_frames = [1, 5]\n'
        'resolution = [48, 32]\nsource_fps = 32.0\nenable_bucket = true\n')
    images, videos = (list_items(bp) for bp in load_dataset_config("d.toml").datasets)
    first, second = images.items
    assert first.controls == ("s/one_ctl.png",) and first.control_sizes == ((32, 32),) and first.caption == "one"
    assert second.problems[0].message == "0 control path(s) in its row, 1 needed"
    kinds = [p.kind for p in images.problems]
    assert kinds == ["source", "cache"]  # the bad line; two items named one.png share cache names
    assert "images.jsonl line 3: not valid JSON" in images.problems[0].message
    frames, missing = videos.items  # 5 frames at 32 fps: 3 at 16 fps, too few for 5
    assert (frames.size, frames.frame_count, frames.loaded_frames, frames.windows) == ((48, 32), 5, 3, ((0, 1),))
    assert [p.kind for p in missing.problems] == ["caption", "unreadable"]
    report = dataset_report(load_dataset_config("d.toml"))
    assert "    frames: 5 frames (3 at 16 fps) -> [0:1]" in report.splitlines()
    assert "    missing.mp4: no caption in videos.jsonl line 2" in report.splitlines()


def test_a_video_cache_is_named_after_its_bucket(tmp_path, monkeypatch):
    """musubi resizes video frames as it reads them, so a video's cache name holds the bucket's size
    (an image's holds its own)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vid").mkdir()
    _video(tmp_path / "vid" / "wide.mp4", 9, size=(64, 32))
    (tmp_path / "vid" / "wide.txt").write_text("wide")
    (tmp_path / "d.toml").write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n'
                                     '[[datasets]]\nvideo_directory = "vid"\ntarget_frames = [9]\n')
    listing = list_items(load_dataset_config("d.toml").datasets[0])
    (item,) = listing.items
    assert item.size == (64, 32) and item.bucket != item.size
    latents, _ = expected_cache_files(listing.blueprint, item)
    w, h = item.bucket
    assert [p.name for p in latents] == [f"wide_00000-009_{w:04d}x{h:04d}_wan.safetensors"]
