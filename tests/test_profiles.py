"""Profiles: every shipped file loads; errors name file, key, value and what is allowed; lookup by
name and number; user folders override built-ins; extends chains; per-job overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from wan.optim.profile_files import BUILTIN_DIR, load_profiles
from wan.optim.profiles import Profile, ProfileError, apply_overrides, parse_override, profile_to_dict

NUMBERED = {1: "HighRAM_HighVRAM", 2: "HighRAM_LowVRAM", 3: "LowRAM_HighVRAM", 4: "LowRAM_LowVRAM",
            5: "VeryLowRAM_LowVRAM"}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- shipped profiles


def test_every_shipped_profile_loads_and_says_who_it_is_for():
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    profiles = load_profiles(user_dir=None)
    assert len(profiles) == len(files) >= 9
    for path in files:
        assert path.read_text().startswith("# "), f"{path.name} must start with a comment saying who it is for"
        profile = profiles.get(path.stem)
        assert profile.source == str(path) and profile.description
    for number, name in NUMBERED.items():
        assert profiles.get(number).name == name
    for name in ("auto", "fast_preview", "quality", "default"):
        assert name in profiles


def test_numbered_profiles_follow_wan2gp_memory_semantics():
    p = load_profiles(user_dir=None)
    assert [p.get(n).memory.pin for n in NUMBERED] == ["all", "all", "transformer", "transformer", "none"]
    assert [p.get(n).memory.offload for n in NUMBERED] == ["model", "blocks", "model", "blocks", "blocks"]
    assert [p.get(n).quantize.text_encoder for n in NUMBERED] == ["none", "none", "int8", "int8", "int8"]
    assert [p.get(n).memory.other_budget_mb for n in NUMBERED] == [None, 3000, None, 3000, 1000]
    assert all(p.get(n).memory.transformer_budget_mb == 100 for n in (2, 4, 5))


def test_speed_profiles_change_no_memory_setting():
    p = load_profiles(user_dir=None)
    base = Profile()
    for name in ("fast_preview", "quality"):
        assert p.get(name).memory == base.memory and p.get(name).quantize == base.quantize
    fast = p.get("fast_preview").step_savers
    assert fast.teacache.enabled and fast.teacache.speedup == 2.0 and fast.cfg_skip.mode == "late"
    quality = p.get("quality").step_savers
    assert not (quality.teacache.enabled or quality.magcache.enabled or quality.cfg_zero_star.enabled)
    assert quality.slg.mode == quality.cfg_skip.mode == "none"
    assert "sage" not in p.get("quality").attention and "sage2" not in p.get("quality").attention


def test_number_and_name_resolve_to_the_same_profile():
    p = load_profiles(user_dir=None)
    same = [p.get(4), p.get("4"), p.get(" 4 "), p.get("LowRAM_LowVRAM"), p.get("lowram_lowvram")]
    assert all(x is same[0] for x in same)
    assert p.get("AUTO").is_auto
    with pytest.raises(ProfileError,
                       match=r"unknown profile 'LowRAM_LowVRM'.*Did you mean LowRAM_LowVRAM.*4 LowRAM_LowVRAM"):
        p.get("LowRAM_LowVRM")
    with pytest.raises(ProfileError, match="unknown profile 9"):
        p.get(9)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, key, allowed", [
    ("memory:\n  prefetch: 2\n", "memory.prefetch", "allowed keys here: offload, transformer_budget_mb"),
    ("memroy:\n  pin: all\n", "memroy", "did you mean memory?"),
    ("step_savers:\n  teacache:\n    enabled: maybe\n", "step_savers.teacache.enabled", "expected true or false"),
    ("memory:\n  prefetch_blocks: two\n", "memory.prefetch_blocks", "expected an integer >= 0"),
    ("memory:\n  prefetch_blocks: 1.5\n", "memory.prefetch_blocks", "expected an integer >= 0"),
    ("memory:\n  offload: gpu\n", "memory.offload", "expected one of auto, none, model, blocks"),
    ("quantize:\n  transformer: int4\n", "quantize.transformer", "expected one of none, fp8, fp8_scaled, int8"),
    ("attention: [sage, flash2]\n", "attention", "that contains sdpa"),
    ("attention: [sdpa, cudnn]\n", "attention", "a list of sdpa, sage, sage2, flash2, flash3, xformers"),
    ("step_savers:\n  cfg_skip:\n    ratio: 1.5\n", "step_savers.cfg_skip.ratio", "a number >= 0.0 and <= 1.0"),
    ("number: 7\n", "number", "an integer >= 1 and <= 5 or null"),
    ("memory: 3\n", "memory", "a mapping with keys offload"),
    ("step_savers:\n  slg:\n    start: 0.8\n    end: 0.2\n", "step_savers.slg.start", "<= step_savers.slg.end"),
])
def test_bad_values_name_file_key_value_and_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, "bad", text)
    with pytest.raises(ProfileError) as e:
        load_profiles(user_dir=tmp_path, builtin_dir=None)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}:"), msg
    assert allowed in msg, msg


def test_missing_parent_names_file_value_and_known_profiles(tmp_path):
    path = write(tmp_path, "child", "extends: LowRAM_NoVRAM\n")
    with pytest.raises(ProfileError) as e:
        load_profiles(user_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: extends: 'LowRAM_NoVRAM' names no profile; expected one of:")
    assert "LowRAM_LowVRAM" in msg and "a number 1, 2, 3, 4, 5" in msg
    write(tmp_path, "child", "extends: 8\n")
    with pytest.raises(ProfileError, match=r"child.yaml: extends: '8' names no profile"):
        load_profiles(user_dir=tmp_path)


def test_extends_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path, "a", "extends: b\n")
    write(tmp_path, "b", "extends: c\n")
    c = write(tmp_path, "c", "extends: a\n")
    with pytest.raises(ProfileError) as e:
        load_profiles(user_dir=tmp_path, builtin_dir=None)
    msg = str(e.value)
    assert msg.startswith(f"{c}: extends: 'a' makes a cycle: a (") and " -> b (" in msg and " -> c (" in msg
    write(tmp_path, "a", "extends: a\n")  # itself, with no built-in of that name to stand for
    with pytest.raises(ProfileError, match="makes a cycle"):
        load_profiles(user_dir=tmp_path, builtin_dir=None)


def test_duplicate_number_and_invalid_yaml_and_missing_folder(tmp_path):
    path = write(tmp_path / "u", "mine", "number: 4\n")
    with pytest.raises(ProfileError, match=rf"{path}: number: 4 is already used by .*LowRAM_LowVRAM.yaml"):
        load_profiles(user_dir=tmp_path / "u")
    path = write(tmp_path / "v", "broken", "memory: [\n")
    with pytest.raises(ProfileError, match=rf"{path}: not valid YAML"):
        load_profiles(user_dir=tmp_path / "v")
    with pytest.raises(ProfileError, match="no such folder"):
        load_profiles(user_dir=tmp_path / "absent")


# ----------------------------------------------------------------------------- inheritance, user folder


def test_extends_chain_inherits_settings_but_not_identity(tmp_path):
    write(tmp_path, "base", "number: 2\ndescription: base\nmemory: {pin: none, prefetch_blocks: 3}\n"
                            "step_savers:\n  slg: {mode: uncond, layers: [8, 9]}\n")
    write(tmp_path, "middle", "extends: 2\nstep_savers:\n  teacache: {enabled: true}\n  slg: {layers: [10]}\n")
    write(tmp_path, "top", "extends: middle\nmemory: {prefetch_blocks: 0}\nvae: {tiling: off}\n")
    p = load_profiles(user_dir=tmp_path, builtin_dir=None)
    top = p.get("top")
    assert top.memory.pin == "none" and top.memory.prefetch_blocks == 0
    assert top.step_savers.teacache.enabled and top.step_savers.slg.mode == "uncond"
    assert top.step_savers.slg.layers == (10,)       # lists replace, they do not append
    assert top.vae.tiling == "off"                   # YAML's bare off is read as the choice "off"
    assert top.number is None and top.description == "" and top.extends == "middle"
    assert p.get("base").memory.prefetch_blocks == 3   # the parent is untouched


def test_user_folder_overrides_builtin_by_name(tmp_path):
    # Replacing a built-in while extending it: number and description are kept.
    write(tmp_path, "lowram_lowvram", "name: LowRAM_LowVRAM\nextends: LowRAM_LowVRAM\nmemory: {prefetch_blocks: 3}\n")
    write(tmp_path, "quality", "# mine\ndescription: my quality\nattention: [sdpa]\n")
    write(tmp_path, "mine", "extends: 4\ncompile: true\n")
    builtin, user = load_profiles(user_dir=None), load_profiles(user_dir=tmp_path)
    four = user.get(4)
    assert four is user.get("LowRAM_LowVRAM") and four.source == str(tmp_path / "lowram_lowvram.yaml")
    assert four.memory.prefetch_blocks == 3 and four.memory.pin == "transformer"
    assert four.quantize.text_encoder == "int8" and four.description == builtin.get(4).description
    assert user.get("quality").attention == ("sdpa",) and user.get("quality").description == "my quality"
    mine = user.get("mine")
    assert mine.compile and mine.memory.prefetch_blocks == 3  # extends the user's 4, not the built-in
    assert len(user) == len(builtin) + 1


# ----------------------------------------------------------------------------- overrides


def test_apply_overrides_checks_like_a_file():
    p = load_profiles(user_dir=None).get(4)
    q = apply_overrides(p, {"step_savers.teacache.enabled": True, "step_savers.teacache.speedup": 2,
                            "memory": {"pin": "none"}, "attention": ["sage", "sdpa"]})
    assert q.step_savers.teacache.enabled and q.step_savers.teacache.speedup == 2.0
    assert isinstance(q.step_savers.teacache.speedup, float)
    assert q.memory.pin == "none" and q.memory.transformer_budget_mb == 100 and q.attention == ("sage", "sdpa")
    assert q.name == p.name and q.number == 4 and q.source == p.source
    assert not p.step_savers.teacache.enabled  # the profile itself is unchanged
    for overrides, pattern in [
        ({"step_savers.teacache.enabled": "yes"},
         r"^override: step_savers.teacache.enabled: 'yes' is not allowed; expected true or false"),
        ({"step_savers.teacache.speed": 2},
         r"^override: step_savers.teacache.speed: unknown key \(did you mean speedup\?\)"),
        ({"memory.offload": "disk"}, r"^override: memory.offload: 'disk' .* one of auto, none, model, blocks"),
        ({"number": 3}, r"^override: number: cannot be overridden"),
        ({"step_savers.slg.start": 0.95}, r"^override: step_savers.slg.start: 0.95 .* <= step_savers.slg.end"),
    ]:
        with pytest.raises(ProfileError, match=pattern):
            apply_overrides(p, overrides)


def test_parse_override_reads_yaml_values():
    assert parse_override("step_savers.teacache.enabled=true") == ("step_savers.teacache.enabled", True)
    assert parse_override("step_savers.slg.layers=[8, 9]") == ("step_savers.slg.layers", [8, 9])
    assert parse_override(" memory.blocks_to_swap = null") == ("memory.blocks_to_swap", None)
    with pytest.raises(ProfileError, match="expected KEY=VALUE"):
        parse_override("teacache")


def test_on_and_off_are_words_not_yaml_booleans():
    """YAML 1.1 reads on/off as booleans: vae.tiling=on means the word; a switch wants true/false."""
    base = load_profiles(user_dir=None).get("default")
    assert apply_overrides(base, dict([parse_override("vae.tiling=on")])).vae.tiling == "on"
    assert apply_overrides(base, dict([parse_override("vae.tiling=off")])).vae.tiling == "off"
    with pytest.raises(ProfileError, match="compile: 'on' is not allowed; expected true or false"):
        apply_overrides(base, dict([parse_override("compile=on")]))


def test_profile_round_trips_through_yaml(tmp_path):
    p = load_profiles(user_dir=None).get("fast_preview")
    data = profile_to_dict(p)
    assert data["attention"] == list(p.attention) and "source" not in data
    write(tmp_path, "copy", yaml.safe_dump({**data, "name": "copy"}))
    copy = load_profiles(user_dir=tmp_path, builtin_dir=None).get("copy")
    assert dataclasses.replace(copy, name=p.name) == p
