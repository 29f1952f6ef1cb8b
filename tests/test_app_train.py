"""The Train tab without a browser (wan/app/train_*.py): refusals named field by field, the dataset
preview (captions, buckets, frame windows, warnings) and captions written in place, and what Start
queues. Runs that train: tests/test_app_train_restart.py and tests/test_app_browser_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.app_train_harness import write_clip, write_dataset
from wan.app import train_form
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.app.train_dataset import DATASET_TOML, preview, save_toml, write_caption
from wan.app.train_jobs import accept_train_request, interrupted_reason, resume_offer
from wan.app.train_request import TrainRequestError, parse_advanced

CLIP = {"width": 32, "height": 32, "frames": 9, "frame_extraction": "head"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_app")
    checkpoints = base / "ckpt"  # the TEST models are ready without their files (made on first use)
    write_dataset(base / "datasets" / "clips", {"a": "a red square", "b": "a blue square"})
    settings = ServerSettings(output_dir=str(base / "out"), state_dir=str(base / "state"), lora_dir=str(base / "loras"),
                              checkpoint_dir=str(checkpoints), datasets_dir=str(base / "datasets"),
                              max_train_steps=500, max_frames=33, max_pixels=64 * 64)
    return AppState(settings)


def form(**changes) -> dict:
    values = {"dataset": "clips", **CLIP, "frame_stride": 1, "frame_sample": 1, "num_repeats": 1,
              "model": "test-tiny-t2v", "lora_mode": "one", "output_name": "tiny", "trigger_words": "sqr",
              "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-3, "max_train_steps": 20,
              "max_train_epochs": None, "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "seed": 7,
              "memory": "standard", "sample_prompts": "", "sample_every_n_steps": 0, "save_every_n_steps": 5,
              "advanced": ""}
    return {**values, **changes}


def refusal(state, **changes) -> str:
    with pytest.raises(TrainRequestError) as caught:
        train_form.build_requests(state, form(**changes))
    return str(caught.value)


def test_bad_input_is_refused_naming_the_field(state, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    write_clip(tmp_path / "elsewhere" / "x.mp4", 0)
    (Path(state.settings.datasets_dir) / "empty").mkdir(exist_ok=True)
    outside = refusal(state, dataset=str(tmp_path / "elsewhere"))
    assert outside.startswith("Dataset (dataset): ") and "outside the folders training may use" in outside
    assert "outside the folders training may use" in refusal(state, dataset="../..")
    assert refusal(state, dataset="empty").startswith("Dataset (dataset): ") and \
        "an empty dataset, no image or video in it" in refusal(state, dataset="empty")
    assert refusal(state, frames=10).startswith("Frames per clip (frames): 10 is not allowed; 4k+1 frames")
    assert "9 or 13" in refusal(state, frames=10)
    assert refusal(state, frames=37).startswith("Frames per clip (frames): 37 is not allowed")  # over --max_frames 33
    assert refusal(state, network_dim=0).startswith("Rank (network_dim): 0 is not allowed; expected an integer >= 1")
    assert refusal(state, width=40).startswith("Width (width): 40 is not allowed; a multiple of 16")
    assert refusal(state, width=128, height=64).startswith("Height (height): 64 is not allowed; 128x64 is 8192 pixels")
    assert refusal(state, max_train_steps=501).startswith("Steps (max_train_steps): 501 is not allowed; at most 500")
    assert refusal(state, learning_rate=-1).startswith("Learning rate (learning_rate): -1 is not allowed")
    assert refusal(state, output_name="../x").startswith("LoRA name (output_name): ")
    assert refusal(state, model="wan2.1-t2v-14B").startswith("Model (model): ")
    assert refusal(state, advanced="--device cpu").startswith("Advanced flags: --device: is set by the "
                                                              "server: the server picks its device")
    assert refusal(state, advanced="--blocks_to_swap 1").startswith(  # the trainer's own rule, before anything runs
        "Advanced flags: --blocks_to_swap: needs --gradient_checkpointing")
    assert "does not support" in refusal(state, advanced="--flash_attn")
    assert "did you mean" in refusal(state, advanced="--lr_schedulr cosine").lower()
    assert refusal(state, advanced="--lr_warmup_steps 10").startswith("Advanced flags: --lr_warmup_steps: ")
    # the same checks on a script's request name the request's fields
    ok = {"train": {"model": "test-tiny-t2v", "dataset_config": "clips/wan_studio_dataset.toml", "output_name": "api",
                    "max_train_steps": 10}}
    save_toml(preview("clips", CLIP, state.settings))
    for change, field in (({"dit": "/etc/passwd"}, "train.dit"), ({"dataset_config": "/etc/hosts"},
                          "train.dataset_config"), ({"network_dim": 0}, "train.network_dim"),
                          ({"resume": "/tmp"}, "train.resume"), ({"optimizer_type": "os.system"},
                          "train.optimizer_type"), ({"output_dir": "/tmp"}, "train.output_dir")):
        with pytest.raises(TrainRequestError) as caught:
            accept_train_request({"train": {**ok["train"], **change}}, state)
        assert caught.value.field == field, caught.value
    with pytest.raises(TrainRequestError, match="^expert: "):
        accept_train_request({**ok, "expert": "high_noise"}, state)  # a model of one DiT
    assert parse_advanced("--lr_scheduler cosine --gradient_checkpointing --network_args a=1 b=2 --lr_warmup_steps=5") == \
        {"lr_scheduler": "cosine", "gradient_checkpointing": True, "network_args": ["a=1", "b=2"], "lr_warmup_steps": 5}


def test_the_preview_shows_buckets_windows_and_warnings_and_writes_captions_in_place(state):
    root = Path(state.settings.datasets_dir) / "mixed"
    write_dataset(root, {"long": "a clip", "nocap": None})
    write_clip(root / "short.mp4", 3, frames=5)
    (root / "short.txt").write_text("too short")
    (root / "broken.mp4").write_bytes(b"not a video")
    (root / "broken.txt").write_text("broken")
    Image.new("RGB", (64, 16)).save(root / "wide.png")
    (root / "wide.txt").write_text("a wide picture")
    Image.new("RGB", (16, 64)).save(root / "tall.png")
    (root / "tall.txt").write_text("a tall picture")
    result = preview("mixed", CLIP, state.settings)
    text = "\n".join(result.warnings)
    assert "missing captions (1): nocap.mp4" in text and "unreadable files (1): broken.mp4" in text
    assert "too short for target_frames (1): short.mp4: 5 frames" in text and "very different aspect ratios" in text
    long = next(i for i in result.items if i.name == "long.mp4")
    assert long.bucket == (32, 32) and long.windows == ((0, 9),) and long.caption == "a clip"
    assert "[[datasets]]\nvideo_directory" in result.toml_text and "image_directory" in result.toml_text
    assert 'cache_directory = "' + str(root / "cache" / "32x32_9f_head" / "video") + '"' in result.toml_text
    # a caption written in place, atomically, for a listed item only
    path = write_caption(result, str(root / "nocap.mp4"), "  a  late caption ", state.settings)
    assert path == root / "nocap.txt" and path.read_text() == "a late caption\n"
    with pytest.raises(TrainRequestError, match="caption item"):
        write_caption(result, str(root / ".." / "clips" / "a.mp4"), "x", state.settings)
    with pytest.raises(TrainRequestError, match="caption item"):
        write_caption(result, "/etc/hosts", "x", state.settings)
    assert "missing captions" not in "\n".join(preview("mixed", CLIP, state.settings).warnings)
    # the TOML beside the dataset, never over a file someone else wrote
    assert save_toml(result) == root / DATASET_TOML
    (root / DATASET_TOML).write_text("# mine\n")
    assert save_toml(result) is None and (root / DATASET_TOML).read_text() == "# mine\n"


def test_start_queues_a_run_whose_name_is_then_taken(state):
    jobs = train_form.start(state, form(output_name="queued"), "s1")
    assert len(jobs) == 1 and jobs[0].label == "train: queued · test-tiny-t2v · 20 steps"
    request = jobs[0].request
    assert request["train"]["output_dir"] == str(Path(state.settings.output_dir).resolve() / "train" / "queued")
    assert request["train"]["dataset_config"] == request["train"]["output_dir"] + "/dataset.toml"  # a snapshot
    assert request["train"]["save_state"] is True and request["train"]["save_every_n_steps"] == 5
    with pytest.raises(TrainRequestError, match="job .* trains a LoRA of that name already"):
        train_form.start(state, form(output_name="queued"), "s1")
    assert interrupted_reason(jobs[0]).startswith("interrupted")
    assert resume_offer(state, jobs[0]) is None  # waiting: nothing to resume
    state.queue.remove(jobs[0].id)


def test_wan_2_2_a14b_trains_one_shared_lora_or_two_one_per_expert(state):
    one = train_form.build_requests(state, form(model="test-tiny-t2v-a14b", output_name="pair", memory="low"))[1]
    assert [(r["train"]["output_name"], r["expert"]) for r in one] == [("pair", None)]
    assert one[0]["train"]["offload_inactive_dit"] and one[0]["train"]["fp8_base"]  # the low-memory preset
    two = train_form.build_requests(state, form(model="test-tiny-t2v-a14b", output_name="pair", lora_mode="two"))[1]
    assert [(r["train"]["output_name"], r["expert"]) for r in two] == [("pair_high_noise", "high_noise"),
                                                                       ("pair_low_noise", "low_noise")]
    assert "one LoRA or two" in train_form.recommendation("test-tiny-t2v-a14b")
    assert train_form.recommendation("test-tiny-t2v") == ""
    ids = [m for _, m in train_form.model_choices(state)]
    assert "test-tiny-t2v" in ids and "test-tiny-vace" not in ids and "wan2.1-t2v-14B" not in ids  # not ready here

