"""The model registry: every shipped spec loads, matches the reference numbers, and bad specs fail
with errors that name the file and the key."""

from pathlib import Path

import pytest
import yaml

from wan.registry import (BUILTIN_DIR, TASKS, RegistryError, UnknownModelError, families,
                          get_model, list_models, load_registry)

# Base negative prompt of Wan's shared_config (wan-architecture.md §6.4).
NEG = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
       "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
       "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

# wan-architecture.md §6.4: (steps, shift, guidance low/only, guidance high, boundary, frames, fps)
REFERENCE_DEFAULTS = {
    "wan2.1-t2v-1.3B": (50, 5.0, 5.0, None, None, 81, 16),
    "wan2.1-t2v-14B": (50, 5.0, 5.0, None, None, 81, 16),
    "wan2.1-t2i-14B": (50, 5.0, 5.0, None, None, 1, 16),
    "wan2.1-i2v-14B-480P": (40, 5.0, 5.0, None, None, 81, 16),
    "wan2.1-i2v-14B-720P": (40, 5.0, 5.0, None, None, 81, 16),
    "wan2.1-flf2v-14B-720P": (50, 16.0, 5.0, None, None, 81, 16),
    "wan2.1-vace-1.3B": (50, 16.0, 5.0, None, None, 81, 16),
    "wan2.1-vace-14B": (50, 16.0, 5.0, None, None, 81, 16),
    "wan2.2-t2v-A14B": (40, 12.0, 3.0, 4.0, 0.875, 81, 16),
    "wan2.2-i2v-A14B": (40, 5.0, 3.5, 3.5, 0.9, 81, 16),
    "wan2.2-ti2v-5B": (50, 5.0, 5.0, None, None, 121, 24),
}

# wan-architecture.md §1.1: (dim, ffn, heads, layers, in_dim, out_dim, model_type)
REFERENCE_ARCH = {
    "wan2.1-t2v-1.3B": (1536, 8960, 12, 30, 16, 16, "t2v"),
    "wan2.1-t2v-14B": (5120, 13824, 40, 40, 16, 16, "t2v"),
    "wan2.1-t2i-14B": (5120, 13824, 40, 40, 16, 16, "t2v"),
    "wan2.1-i2v-14B-480P": (5120, 13824, 40, 40, 36, 16, "i2v"),
    "wan2.1-i2v-14B-720P": (5120, 13824, 40, 40, 36, 16, "i2v"),
    "wan2.1-flf2v-14B-720P": (5120, 13824, 40, 40, 36, 16, "flf2v"),
    "wan2.1-vace-1.3B": (1536, 8960, 12, 30, 16, 16, "vace"),
    "wan2.1-vace-14B": (5120, 13824, 40, 40, 16, 16, "vace"),
    "wan2.1-fun-inp-1.3B": (1536, 8960, 12, 30, 36, 16, "i2v"),
    "wan2.1-fun-control-1.3B": (1536, 8960, 12, 30, 48, 16, "i2v"),
    "wan2.2-t2v-A14B": (5120, 13824, 40, 40, 16, 16, "t2v"),
    "wan2.2-i2v-A14B": (5120, 13824, 40, 40, 36, 16, "i2v"),
    "wan2.2-ti2v-5B": (3072, 14336, 24, 30, 48, 48, "ti2v"),
}

SIZES_720_480 = {(1280, 720), (720, 1280), (832, 480), (480, 832)}
SIZES_480 = {(832, 480), (480, 832)}
REFERENCE_SIZES = {
    "wan2.1-t2v-1.3B": SIZES_480, "wan2.1-vace-1.3B": SIZES_480,
    "wan2.1-t2v-14B": SIZES_720_480, "wan2.1-i2v-14B-480P": SIZES_720_480,
    "wan2.1-i2v-14B-720P": SIZES_720_480, "wan2.1-flf2v-14B-720P": SIZES_720_480,
    "wan2.1-vace-14B": SIZES_720_480, "wan2.1-t2i-14B": SIZES_720_480 | {(1024, 1024)},
    "wan2.2-t2v-A14B": SIZES_720_480, "wan2.2-i2v-A14B": SIZES_720_480,
    "wan2.2-ti2v-5B": {(1280, 704), (704, 1280)},
}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_every_spec_file_loads_and_contributes(registry):
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    assert len(files) >= 4
    used = {m.source_file for m in registry.list()}
    model_files = [f for f in files if "models" in yaml.safe_load(f.read_text(encoding="utf-8"))]
    assert {str(f) for f in model_files} <= used
    assert set(REFERENCE_DEFAULTS) | set(REFERENCE_ARCH) <= set(registry.ids())
    for extra in ("wan2.1-fun-inp-14B", "wan2.1-fun-control-14B"):
        assert extra in registry


def test_every_real_model_has_transformer_files_and_defaults(registry):
    real = registry.list(include_test=False)
    assert len(real) >= 17
    for spec in real:
        assert not spec.test_model and "TEST" not in spec.display_name
        for role in spec.transformer_roles:
            component = spec.files[role]
            assert component.variants, spec.id
            for source in component.variants.values():
                assert source.repo and source.files and not source.generated, (spec.id, role)
        assert {"vae", "text_encoder", "tokenizer"} <= set(spec.files)
        assert ("clip" in spec.files) == spec.needs_clip, spec.id
        d = spec.defaults
        assert d.steps > 0 and d.shift > 0 and d.guidance > 0 and d.sampler == "unipc"
        assert set(d.negative_prompt) == set(spec.tasks)
        assert spec.default_size in spec.sizes
        assert set(spec.tasks) <= set(TASKS)


@pytest.mark.parametrize("model_id", sorted(REFERENCE_DEFAULTS))
def test_defaults_equal_the_reference_table(registry, model_id):
    d = registry.get(model_id).defaults
    got = (d.steps, d.shift, d.guidance, d.guidance_high_noise, d.boundary, d.frames, d.fps)
    assert got == REFERENCE_DEFAULTS[model_id]


def test_i2v_shift_is_3_at_480p():
    for model_id in ("wan2.1-i2v-14B-480P", "wan2.1-i2v-14B-720P"):
        d = get_model(model_id).defaults
        assert d.shift_for((832, 480)) == 3.0 and d.shift_for((480, 832)) == 3.0
        assert d.shift_for((1280, 720)) == 5.0
    assert get_model("wan2.1-t2v-14B").defaults.shift_for((832, 480)) == 5.0
    assert get_model("wan2.1-i2v-14B-480P").default_size == (832, 480)


@pytest.mark.parametrize("model_id", sorted(REFERENCE_ARCH))
def test_arch_equals_the_reference_table(registry, model_id):
    a = registry.get(model_id).arch
    assert (a.dim, a.ffn_dim, a.num_heads, a.num_layers, a.in_dim, a.out_dim, a.model_type) \
        == REFERENCE_ARCH[model_id]
    assert a.head_dim == 128 and a.text_dim == 4096 and a.patch_size == (1, 2, 2)


def test_arch_extras_vace_experts_clip_and_vae(registry):
    assert registry.get("wan2.1-vace-1.3B").arch.vace_layers == tuple(range(0, 30, 2))
    assert registry.get("wan2.1-vace-14B").arch.vace_layers == tuple(range(0, 40, 5))
    assert registry.get("wan2.1-vace-14B").arch.vace_in_dim == 96
    for model_id in ("wan2.2-t2v-A14B", "wan2.2-i2v-A14B"):
        spec = registry.get(model_id)
        assert spec.arch.experts == ("high_noise", "low_noise")
        assert spec.transformer_roles == ("transformer_high_noise", "transformer_low_noise")
        assert not spec.needs_clip
    needs_clip = {m.id for m in registry.list(include_test=False) if m.needs_clip}
    assert {"wan2.1-i2v-14B-480P", "wan2.1-i2v-14B-720P", "wan2.1-flf2v-14B-720P"} <= needs_clip
    ti2v = registry.get("wan2.2-ti2v-5B")
    assert (ti2v.vae.version, ti2v.vae.stride, ti2v.vae.z_dim) == ("2.2", (4, 16, 16), 48)
    t2v = registry.get("wan2.1-t2v-1.3B")
    assert (t2v.vae.version, t2v.vae.stride, t2v.vae.z_dim) == ("2.1", (4, 8, 8), 16)


@pytest.mark.parametrize("model_id", sorted(REFERENCE_SIZES))
def test_sizes_equal_the_reference(registry, model_id):
    spec = registry.get(model_id)
    assert set(spec.sizes) == REFERENCE_SIZES[model_id]
    image_conditioned = spec.arch.model_type in ("i2v", "flf2v")
    assert spec.sizes_are_max_area == image_conditioned


def test_negative_prompts_carry_the_reference_prefixes(registry):
    assert registry.get("wan2.1-t2v-14B").defaults.negative_prompt["t2v"] == NEG
    assert registry.get("wan2.1-i2v-14B-480P").defaults.negative_prompt["i2v"] == "镜头晃动，" + NEG
    assert registry.get("wan2.1-flf2v-14B-720P").defaults.negative_prompt["flf2v"] == \
        "镜头切换，镜头晃动，" + NEG
    assert registry.get("wan2.2-i2v-A14B").defaults.negative_prompt["i2v"] == NEG


def test_t2i_reuses_the_t2v_14b_weights(registry):
    t2i, t2v = registry.get("wan2.1-t2i-14B"), registry.get("wan2.1-t2v-14B")
    assert t2i.files["transformer"] is t2v.files["transformer"] or \
        t2i.files["transformer"] == t2v.files["transformer"]
    assert t2i.tasks == ("t2i",) and t2i.defaults.frames == 1


def test_official_and_comfy_file_names(registry):
    t2v = registry.get("wan2.1-t2v-14B").files["transformer"]
    assert t2v.variants["fp32"].files[0] == "diffusion_pytorch_model.safetensors.index.json"
    assert t2v.variants["fp32"].files[-1] == "diffusion_pytorch_model-00006-of-00006.safetensors"
    assert t2v.variants["fp32"].open_path == ""
    assert t2v.variants["fp8_scaled"].repo == "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
    high = registry.get("wan2.2-i2v-A14B").files["transformer_high_noise"].variants["fp32"]
    assert high.open_path == "high_noise_model" and len(high.files) == 7
    assert high.sizes["high_noise_model/diffusion_pytorch_model-00006-of-00006.safetensors"] == 7595559224
    tok = registry.get("wan2.1-t2v-1.3B").files["tokenizer"].variants["any"]
    assert tok.open_path == "google/umt5-xxl" and "google/umt5-xxl/spiece.model" in tok.files


def test_variant_fallback_and_unknown_variant(registry):
    flf2v = registry.get("wan2.1-flf2v-14B-720P").files["transformer"]
    assert flf2v.choose("bf16").variant == "fp16"
    assert flf2v.choose("fp8_scaled").variant == "fp8_e4m3fn"
    assert flf2v.choose(None).variant == flf2v.default
    with pytest.raises(RegistryError, match=r"unknown variant 'int3'.*bf16"):
        flf2v.choose("int3")


def test_test_models_are_tiny_marked_and_generated(registry):
    tests = [m for m in registry.list() if m.test_model]
    assert {m.arch.model_type for m in tests} >= {"t2v", "i2v", "flf2v", "vace", "ti2v"}
    assert any(m.is_two_expert for m in tests)
    assert any(m.needs_clip and m.version == "2.1" and m.arch.model_type == "i2v" for m in tests)
    assert any(m.vae.version == "2.2" for m in tests)
    for spec in tests:
        assert "TEST" in spec.display_name and spec.family == "test"
        assert spec.defaults.steps <= 8 and spec.defaults.frames == 9 and spec.defaults.fps == 16
        assert max(w * h for w, h in spec.sizes) <= 96 * 64
        for component in spec.files.values():
            for source in component.variants.values():
                assert source.repo is None
                assert source.generator == "wan.testing.tiny_family.ensure_tiny_checkpoints"


def test_lookup_is_case_insensitive_and_unknown_id_lists_known_ids():
    assert get_model("WAN2.1-T2V-1.3b").id == "wan2.1-t2v-1.3B"
    with pytest.raises(UnknownModelError) as err:
        get_model("wan2.1-t2v-13B")
    message = str(err.value)
    assert "wan2.1-t2v-13B" in message and "wan2.2-ti2v-5B" in message and "Did you mean" in message
    assert isinstance(err.value, KeyError)
    assert {"wan2.1", "wan2.2", "test"} <= set(families())
    assert all(not m.test_model for m in list_models(include_test=False))


# ----------------------------------------------------------------------------- user specs


def _minimal_spec(**changes) -> dict:
    spec = {
        "display_name": "Mine", "version": "2.1", "tasks": ["t2v"],
        "arch": {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "in_dim": 16,
                 "out_dim": 16, "model_type": "t2v"},
        "vae": {"version": "2.1", "stride": [4, 8, 8], "z_dim": 16},
        "text_encoder": "umt5-xxl", "needs_clip": False,
        "defaults": {"steps": 8, "shift": 5.0, "guidance": 5.0, "fps": 16, "frames": 9,
                     "sampler": "unipc", "negative_prompt": {"t2v": ""}},
        "sizes": ["64x64"],
        "files": {"transformer": {"variants": {"bf16": {"repo": "me/mine", "file": "mine.safetensors"}}},
                  "vae": "wan2.1-vae", "text_encoder": "umt5-xxl", "tokenizer": "umt5-xxl-tokenizer"},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return spec


def _write(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_user_spec_adds_a_model(tmp_path):
    _write(tmp_path, "mine.yaml", {"family": "mine", "models": {"my-model": _minimal_spec()}})
    reg = load_registry([tmp_path])
    assert reg.get("my-model").family == "mine"
    assert reg.get("my-model").files["vae"] == reg.get("wan2.1-t2v-1.3B").files["vae"]
    assert "mine" in reg.families() and "wan2.1-t2v-1.3B" in reg


def test_user_finetune_overrides_a_builtin_by_id(tmp_path):
    finetune = {"inherit": "wan2.1-t2v-1.3B", "display_name": "My 1.3B finetune",
                "files": {"transformer": {"variants": {"bf16": {"repo": "me/ft", "file": "ft.safetensors"}}}},
                "defaults": {"steps": 30}}
    path = _write(tmp_path / "finetunes", "ft.yaml", {"models": {"wan2.1-t2v-1.3B": finetune}})
    reg = load_registry([tmp_path / "finetunes"])
    spec = reg.get("wan2.1-t2v-1.3B")
    assert spec.display_name == "My 1.3B finetune" and spec.source_file == str(path)
    transformer = spec.files["transformer"]
    assert list(transformer.variants) == ["bf16"] and transformer.variants["bf16"].repo == "me/ft"
    assert spec.defaults.steps == 30 and spec.defaults.shift == 5.0  # the rest is inherited
    assert spec.arch.dim == 1536 and spec.family == "wan2.1"
    assert get_model("wan2.1-t2v-1.3B").display_name != "My 1.3B finetune"  # built-ins untouched


def test_user_spec_replaces_a_builtin_without_inherit(tmp_path):
    _write(tmp_path, "x.yaml", {"family": "mine", "models": {"wan2.2-ti2v-5B": _minimal_spec()}})
    assert load_registry([tmp_path]).get("wan2.2-ti2v-5B").display_name == "Mine"


@pytest.mark.parametrize("changes, key, fragment", [
    ({"arch__dimm": 3}, "models.bad.arch.dimm", "unknown key 'dimm'"),
    ({"defaults__steps": "fifty"}, "models.bad.defaults.steps", "'fifty' (str)"),
    ({"defaults__guidance": [3.0, 4.0]}, "models.bad.defaults.guidance", "expected a number"),
    ({"needs_clip": "no"}, "models.bad.needs_clip", "expected true or false"),
    ({"tasks": ["t2v", "dance"]}, "models.bad.tasks", "'dance'"),
    ({"sizes": ["64*64"]}, "models.bad.sizes", "WIDTHxHEIGHT"),
    ({"sizes": ["72x64"]}, "models.bad.sizes", "not a multiple of 16"),
    ({"defaults__frames": 10}, "models.bad.defaults.frames", "4*n+1"),
    ({"vae__z_dim": 48}, "models.bad.vae.z_dim", "16 latent channels"),
    ({"defaults__boundary": 0.9}, "models.bad.defaults.boundary", "two-expert"),
    ({"files__transformer__variants__bf16__file": "../../etc/passwd"},
     "models.bad.files.transformer.variants.bf16.file", "no '..'"),
    ({"files__transformer__variants__int4": {"repo": "a/b", "file": "c"}},
     "models.bad.files.transformer.variants.int4", "'int4'"),
    ({"files__vae": "no-such-vae"}, "models.bad.files.vae", "unknown shared component"),
    ({"files__clip": "xlm-roberta-vit-h-clip"}, "models.bad.files.clip", "unknown key 'clip'"),
    ({"files__transformer__variants__bf16__repo": "not a repo"},
     "models.bad.files.transformer.variants.bf16.repo", "owner/name"),
])
def test_bad_spec_error_names_file_and_key(tmp_path, changes, key, fragment):
    path = _write(tmp_path, "bad.yaml", {"family": "bad", "models": {"bad": _minimal_spec(**changes)}})
    with pytest.raises(RegistryError) as err:
        load_registry([tmp_path])
    message = str(err.value)
    assert str(path) in message and key in message and fragment in message


def test_missing_key_unknown_top_level_key_and_duplicates(tmp_path):
    spec = _minimal_spec()
    del spec["defaults"]
    path = _write(tmp_path / "a", "a.yaml", {"family": "f", "models": {"m": spec}})
    with pytest.raises(RegistryError, match=rf"{path}: models\.m\.defaults: required key is missing"):
        load_registry([tmp_path / "a"])
    path = _write(tmp_path / "b", "b.yaml", {"family": "f", "model": {}})
    with pytest.raises(RegistryError, match=rf"{path}: model: unknown key 'model'"):
        load_registry([tmp_path / "b"])
    dup = tmp_path / "c" / "c.yaml"
    dup.parent.mkdir()
    dup.write_text("family: f\nfamily: g\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=r"c\.yaml: line 1: duplicate key\(s\) family"):
        load_registry([dup.parent])


def test_inherit_errors_name_the_file(tmp_path):
    path = _write(tmp_path, "i.yaml", {"models": {"x": {"inherit": "nope"}}})
    with pytest.raises(RegistryError, match=rf"{path}: models\.x\.inherit: inherits unknown model 'nope'"):
        load_registry([tmp_path])
    _write(tmp_path, "i.yaml", {"models": {"x": {"inherit": "y"}, "y": {"inherit": "x"}}})
    with pytest.raises(RegistryError, match="inheritance cycle"):
        load_registry([tmp_path])
