"""The one config mechanism (wan/config.py): strict YAML reading, typed sections, errors that name
the file, the dotted key, the value and what is allowed; the registry's generator allow-list; both
spellings of the server flags."""

import ast
import importlib
from dataclasses import field
from pathlib import Path

import pytest
import yaml

from wan.config import (Bool, ConfigError, ConfigModel, Name, choice, integer, items, number, read_toml, read_yaml,
                        section, validate)
from wan.flags import FlagParser
from wan.registry import RegistryError, get_model, load_registry
from wan.registry.specs import GENERATORS


class _Inner(ConfigModel):
    mode: choice(("fast", "slow")) = "fast"
    steps: integer(1) = 4
    scale: number(0.0, 1.0) = 0.5
    on: Bool = False


class _Outer(ConfigModel):
    inner: _Inner = _Inner()
    layers: items(integer(0)) = (0,)


@section
class _Settings:
    enabled: Bool = False
    inner: _Inner = field(default_factory=_Inner)


def _error(cls, data, where="my.yaml"):
    with pytest.raises(ConfigError) as e:
        validate(cls, data, where)
    return str(e.value)


# ----------------------------------------------------------------------------- reading files


def test_read_yaml_refuses_duplicate_keys_at_any_depth(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 3: duplicate key\(s\) c$"):
        read_yaml(path)
    path.write_text("x: &X {a: 1}\ny: {<<: *X, a: 2}\n")  # a merge key is no duplicate
    assert read_yaml(path) == {"x": {"a": 1}, "y": {"a": 2}}


def test_read_yaml_errors_name_the_file_and_use_the_given_class(tmp_path):
    class MyError(ConfigError):
        pass
    for text, pattern in [("a: [\n", "not valid YAML"), ("- 1\n", "expected a mapping at the top level, got list")]:
        path = tmp_path / "f.yaml"
        path.write_text(text)
        with pytest.raises(MyError, match=rf"^{path}: {pattern}"):
            read_yaml(path, MyError)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert read_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(MyError, match="absent.yaml: file not found"):
        read_yaml(tmp_path / "absent.yaml", MyError)


class _Dataset(ConfigModel):
    image_directory: Name
    num_repeats: integer(1) = 1


class _Training(ConfigModel):
    datasets: items(_Dataset)


def test_read_toml_into_a_list_of_sections(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[[datasets]]\nimage_directory = "img"\n[[datasets]]\nimage_directory = "b"\nnum_repeats = 2\n')
    config = validate(_Training, read_toml(path), str(path))
    assert [(d.image_directory, d.num_repeats) for d in config.datasets] == [("img", 1), ("b", 2)]
    path.write_text('[[datasets]]\nimage_directory = "img"\n[[datasets]]\nimage_directory = "b"\nrepeats = 2\n')
    with pytest.raises(ConfigError, match=rf"^{path}: datasets\[1\]\.repeats: unknown key \(did you mean "
                                          r"num_repeats\?\); allowed keys here: image_directory, num_repeats"):
        validate(_Training, read_toml(path), str(path))
    path.write_text("a = 1\na = 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML"):
        read_toml(path)


def test_each_kind_of_config_has_its_error_class():
    from wan.app.settings import SettingsError
    from wan.optim.profiles import ProfileError
    assert all(issubclass(c, ConfigError) and issubclass(c, ValueError)
               for c in (ProfileError, RegistryError, SettingsError))


# ----------------------------------------------------------------------------- typed sections


def test_errors_name_file_dotted_key_value_and_allowed():
    assert _error(_Outer, {"inner": {"mode": "warp"}}) == \
        "my.yaml: inner.mode: 'warp' is not allowed; expected one of fast, slow"
    assert _error(_Outer, {"inner": {"scale": 1.5}}) == \
        "my.yaml: inner.scale: 1.5 is not allowed; expected a number >= 0.0 and <= 1.0"
    assert _error(_Outer, {"layers": [0, -1]}) == \
        "my.yaml: layers[1]: -1 is not allowed; expected an integer >= 0"
    assert _error(_Outer, {"inner": 3}) == \
        "my.yaml: inner: 3 is not allowed; expected a mapping with keys mode, steps, scale, on"
    assert _error(_Outer, {"inner": {"stpes": 2}}) == \
        "my.yaml: inner.stpes: unknown key (did you mean steps?); allowed keys here: mode, steps, scale, on"
    assert _error(_Outer, [1]).startswith("my.yaml: (top level): [1] is not allowed; expected a mapping")
    # the same words for a dataclass section, and a long value is cut
    assert _error(_Settings, {"inner": {"on": "x" * 1000}}).startswith("my.yaml: inner.on: 'xxxx")
    assert len(_error(_Settings, {"inner": {"on": "x" * 1000}})) < 300
    assert _error(_Settings, {"enabeld": True}).startswith("my.yaml: enabeld: unknown key (did you mean enabled?)")


@pytest.mark.parametrize("data, expected", [
    ({"on": "yes"}, "true or false"), ({"on": "true"}, "true or false"), ({"on": 1}, "true or false"),
    ({"steps": 2.0}, "an integer >= 1"), ({"steps": "4"}, "an integer >= 1"), ({"steps": True}, "an integer >= 1"),
    ({"scale": True}, "a number"), ({"scale": "0.5"}, "a number"), ({"scale": float("nan")}, "a number"),
    ({"mode": 1}, "one of fast, slow"),
])
def test_no_coercion_truthy_strings_floats_or_booleans(data, expected):
    msg = _error(_Inner, data)
    assert f"{next(iter(data))}: {next(iter(data.values()))!r} is not allowed; expected {expected}" in msg


def test_values_are_stored_in_their_declared_form():
    value = validate(_Outer, {"inner": {"scale": 1, "on": True}, "layers": [3, 1]}, "x")
    assert value.inner.scale == 1.0 and isinstance(value.inner.scale, float) and value.layers == (3, 1)
    assert validate(_Settings, {}, "x") == _Settings()


def test_config_module_is_the_bottom_layer():
    tree = ast.parse((Path(__file__).parents[1] / "wan" / "config.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m == "wan" or m.startswith("wan.")]


# ----------------------------------------------------------------------------- registry generators


def test_a_user_spec_may_not_name_any_function_as_generator(tmp_path):
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    spec = {"inherit": "test-tiny-t2v",
            "files": {"transformer": {"variants": {"fp32": {"source": "generated", "generator": "os.system",
                                                            "file": "tiny/t2v/transformer.safetensors"}}}}}
    path = finetunes / "evil.yaml"
    path.write_text(yaml.safe_dump({"models": {"test-tiny-t2v": spec}}))
    with pytest.raises(RegistryError) as e:
        load_registry([finetunes])
    msg = str(e.value)
    assert msg.startswith(f"{path}: models.test-tiny-t2v.files.transformer.variants.fp32.generator: 'os.system'")
    assert "expected one of wan.testing.tiny_family.ensure_tiny_checkpoints" in msg


def test_every_allowed_generator_is_a_function_of_wan_testing():
    for name in GENERATORS:
        module, _, func = name.rpartition(".")
        assert module.startswith("wan.testing.") and callable(getattr(importlib.import_module(module), func))
    used = {s.generator for c in get_model("test-tiny-t2v").files.values() for s in c.variants.values()}
    assert used <= set(GENERATORS)


# ----------------------------------------------------------------------------- server flags


def _serve_parser():
    from wan.app.settings import add_server_arguments
    return add_server_arguments(FlagParser(prog="wgp.py"))


def test_server_flags_are_declared_with_underscores_and_read_in_both_spellings():
    parser = _serve_parser()
    help_text = parser.format_help()
    assert "--server_port" in help_text and "--max_frames" in help_text and "--no_share" in help_text
    assert "--server-port" not in help_text and "--no-share" not in help_text
    for argv in (["--server_port", "9000", "--max_frames", "81", "--state_dir", "s"],
                 ["--server-port", "9000", "--max-frames=81", "--state-dir", "s"]):
        args = parser.parse_args(argv)
        assert (args.server_port, args.max_frames, args.state_dir) == (9000, 81, "s")
    for flag, key, value in (("--share", "share", True), ("--no_share", "share", False),
                             ("--no-share", "share", False), ("--open-browser", "open_browser", True),
                             ("--no-open-browser", "open_browser", False),
                             ("--no_open_browser", "open_browser", False)):
        assert vars(parser.parse_args([flag])) == {"config": None, key: value}


def test_server_flag_errors_name_the_underscore_flag(capsys):
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["--server-port", "0"])
    err = capsys.readouterr().err
    assert "argument --server_port: 0 is not allowed; expected a whole number from 1 to 65535" in err
