"""Server settings: precedence defaults < config file < flags, clear errors, save/load, auth, port."""
import argparse
import socket
import sys

import pytest
import yaml

from wan.app.access import find_port, listen_warning, read_auth, share_warning
from wan.app.settings import (DEFAULTS, FIELD_NAMES, ServerSettings, SettingsError, add_server_arguments,
                              load_settings, save_settings, settings_from_dict, settings_to_dict)
from wan.flags import FlagParser


def parse(*argv):
    return add_server_arguments(FlagParser(prog="wgp.py")).parse_args(list(argv))


def write_config(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_every_field_has_a_flag_and_the_field_list_is_as_specified():
    assert FIELD_NAMES == ("listen", "server_name", "server_port", "share", "auth", "auth_file", "profile", "model",
                           "checkpoint_dir", "models_dir", "lora_dir", "output_dir", "attention", "compile",
                           "open_browser", "verbose", "max_frames", "max_pixels", "max_steps", "max_upload_mb", "max_queue",
                           "state_dir", "max_queue_per_session", "uploads_max_age_days", "uploads_max_mb",
                           "datasets_dir", "max_train_steps", "gpus", "gpu_mode")
    assert DEFAULTS.max_pixels == 1280 * 720 and DEFAULTS.server_port == 7860
    args = parse()
    assert vars(args) == {"config": None}, "setting flags must default to SUPPRESS"
    help_text = add_server_arguments(argparse.ArgumentParser()).format_help()
    for name in FIELD_NAMES:
        assert "--" + name in help_text


def test_host_follows_listen():
    assert ServerSettings().host == "127.0.0.1"
    assert ServerSettings(server_name="10.0.0.2").host == "10.0.0.2"
    assert ServerSettings(listen=True, server_name="10.0.0.2").host == "0.0.0.0"


def test_precedence_defaults_file_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings(parse()) == ServerSettings()  # no file in the folder: defaults
    write_config(tmp_path / "wan_studio.yaml", {"server_port": 9000, "share": True, "output_dir": "out_file",
                                                "max_frames": 81, "profile": 4})
    s = load_settings(parse())  # the default config file is read when present
    # profile 4 is kept under its name, the value the profile pickers hold (see check_references)
    assert (s.server_port, s.share, s.output_dir, s.max_frames, s.profile) == (9000, True, "out_file", 81,
                                                                               "LowRAM_LowVRAM")
    assert s.lora_dir == "loras"  # untouched settings keep their defaults
    s = load_settings(parse("--server-port", "9100", "--output-dir", "out_flag", "--no-share"))
    assert (s.server_port, s.output_dir, s.share, s.max_frames) == (9100, "out_flag", False, 81)
    # a flag given with the very value of the default still overrides the file
    s = load_settings(parse("--server-port", "7860", "--max-frames", "161"))
    assert (s.server_port, s.max_frames) == (7860, 161)


def test_explicit_config_path(tmp_path):
    cfg = write_config(tmp_path / "other.yaml", {"listen": True, "attention": "sage"})
    s = load_settings(parse("--config", str(cfg), "--verbose"))
    assert s.listen and s.attention == "sage" and s.verbose and s.host == "0.0.0.0"
    with pytest.raises(SettingsError, match="missing.yaml.*not found"):
        load_settings(parse("--config", str(tmp_path / "missing.yaml")))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_settings(parse("--config", str(empty))) == ServerSettings()


@pytest.mark.parametrize("key, value, allowed", [
    ("server_port", "abc", "1 to 65535"),
    ("server_port", 0, "1 to 65535"),
    ("server_port", 70000, "1 to 65535"),
    ("max_frames", -5, "> 0"),
    ("max_pixels", 0, "> 0"),
    ("max_upload_mb", 1.5, "> 0"),
    ("listen", "yes", "true or false"),
    ("attention", "turbo", "sdpa"),
    ("output_dir", "", "non-empty"),
])
def test_config_errors_name_file_key_value_and_allowed(tmp_path, key, value, allowed):
    cfg = write_config(tmp_path / "bad.yaml", {key: value})
    with pytest.raises(SettingsError) as e:
        load_settings(parse("--config", str(cfg)))
    msg = str(e.value)
    assert str(cfg) in msg and key in msg and repr(value) in msg and allowed in msg


def test_unknown_key_and_malformed_files(tmp_path):
    cfg = write_config(tmp_path / "typo.yaml", {"server-port": 8000})
    with pytest.raises(SettingsError) as e:
        load_settings(parse("--config", str(cfg)))
    assert str(cfg) in str(e.value) and "'server-port'" in str(e.value) and "server_port" in str(e.value)
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("server_port: [1, 2\n")
    with pytest.raises(SettingsError, match="broken.yaml: not valid YAML"):
        load_settings(parse("--config", str(bad_yaml)))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(SettingsError, match="list.yaml: expected a mapping"):
        load_settings(parse("--config", str(listing)))


def test_flag_errors(capsys):
    for argv, expected in ((["--server-port", "abc"], "1 to 65535"), (["--server-port", "0"], "1 to 65535"),
                           (["--max-frames", "-1"], "> 0"), (["--attention", "turbo"], "sdpa")):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        flag = "--" + argv[0][2:].replace("-", "_")  # declared with underscores, typed either way
        assert f"argument {flag}: " in err and argv[1] in err.splitlines()[-1] and expected in err, err
    # a namespace built by hand goes through the same checks
    with pytest.raises(SettingsError, match=r"--max_queue: 0 is not allowed; expected a whole number > 0"):
        load_settings(argparse.Namespace(config=None, max_queue=0))
    with pytest.raises(SettingsError) as e:  # a password is never echoed
        settings_from_dict({"auth": ""}, where="flag")
    assert "value not shown" in str(e.value)


def test_save_load_round_trip_without_auth(tmp_path):
    s = ServerSettings(server_port=8123, share=True, auth="alice:s3cret", auth_file="users.txt",
                       model="wan2.1-t2v-1.3B", max_pixels=832 * 480, compile=True, attention="sdpa")
    path = save_settings(s, tmp_path / "sub" / "wan_studio.yaml")
    text = path.read_text()
    assert "s3cret" not in text and "auth:" not in text and "auth_file" in text  # the comment points to it
    raw = yaml.safe_load(text)
    assert set(raw) == {"server_port", "share", "auth_file", "model", "max_pixels", "compile", "attention"}
    assert [p.name for p in path.parent.iterdir()] == ["wan_studio.yaml"]  # no temp file left
    back = load_settings(parse("--config", str(path)))
    assert back == ServerSettings(**{**settings_to_dict(s), "auth": None})
    # saving the defaults writes no setting at all
    assert yaml.safe_load(save_settings(ServerSettings(), tmp_path / "d.yaml").read_text()) is None


def test_save_keeps_an_auth_the_user_wrote_in_the_file(tmp_path):
    path = write_config(tmp_path / "wan_studio.yaml", {"auth": "bob:pw", "server_port": 9000})
    s = load_settings(parse("--config", str(path)))
    save_settings(s.__class__(**{**settings_to_dict(s, include_auth=True), "server_port": 9001}), path)
    assert yaml.safe_load(path.read_text()) == {"server_port": 9001, "auth": "bob:pw"}


def test_save_refuses_bad_values(tmp_path):
    with pytest.raises(SettingsError, match="server_port: -1"):
        save_settings(ServerSettings(server_port=-1), tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_dict_helpers_for_the_ui():
    s = ServerSettings(auth="a:b", output_dir="o")
    d = settings_to_dict(s)
    assert "auth" not in d and d["output_dir"] == "o" and set(d) == set(FIELD_NAMES) - {"auth"}
    assert settings_to_dict(s, include_auth=True)["auth"] == "a:b"
    changed = settings_from_dict({"max_queue": 5}, base=s, where="UI")
    assert changed.max_queue == 5 and changed.auth == "a:b" and changed.output_dir == "o"
    with pytest.raises(SettingsError, match=r"UI: max_queue: 'many' is not allowed"):
        settings_from_dict({"max_queue": "many"}, base=s, where="UI")
    with pytest.raises(SettingsError, match=r"UI: unknown setting 'colour'"):
        settings_from_dict({"colour": "red"}, where="UI")


def test_read_auth(tmp_path):
    assert read_auth(ServerSettings()) is None
    assert read_auth(ServerSettings(auth="alice:pa:ss")) == [("alice", "pa:ss")]
    users = tmp_path / "users.txt"
    users.write_text("# team\n\nbob:one\n  carol:two  \n")
    assert read_auth(ServerSettings(auth="alice:x", auth_file=str(users))) == [
        ("alice", "x"), ("bob", "one"), ("carol", "two")]
    users.write_text("bob:one\n# ok\nmallory-topsecret\n")
    with pytest.raises(SettingsError) as e:
        read_auth(ServerSettings(auth_file=str(users)))
    assert str(users) in str(e.value) and "line 3" in str(e.value) and "topsecret" not in str(e.value)
    for bad in (":nouser\n", "nopass:\n"):
        users.write_text(bad)
        with pytest.raises(SettingsError, match="line 1"):
            read_auth(ServerSettings(auth_file=str(users)))
    users.write_text("# only comments\n")
    with pytest.raises(SettingsError, match="no USER:PASSWORD line"):
        read_auth(ServerSettings(auth_file=str(users)))
    with pytest.raises(SettingsError) as e:
        read_auth(ServerSettings(auth="justapassword"))
    assert "--auth" in str(e.value) and "justapassword" not in str(e.value)
    with pytest.raises(SettingsError, match="nowhere.txt: auth file not found"):
        read_auth(ServerSettings(auth_file=str(tmp_path / "nowhere.txt")))


def test_share_and_listen_warnings():
    warning = share_warning(ServerSettings(share=True))
    assert warning and "anyone with the link" in warning and "--auth" in warning
    assert share_warning(ServerSettings(share=True, auth="a:b")) is None
    assert share_warning(ServerSettings(share=True, auth_file="users.txt")) is None
    assert share_warning(ServerSettings()) is None
    assert "0.0.0.0" in listen_warning(ServerSettings(listen=True))
    assert listen_warning(ServerSettings()) is None
    assert listen_warning(ServerSettings(listen=True, auth="a:b")) is None


def _held_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sys.platform == "win32":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_find_port_moves_past_a_held_port():
    held = _held_socket()
    try:
        busy = held.getsockname()[1]
        port, note = find_port("127.0.0.1", busy, tries=20)
        assert busy < port <= busy + 20
        assert note == f"port {busy} is in use; using {port}"
        free, note = find_port("127.0.0.1", port)
        assert (free, note) == (port, None)
        with pytest.raises(SettingsError) as e:
            find_port("127.0.0.1", busy, tries=0)
        assert f"tried {busy}," in str(e.value) and "--server_port" in str(e.value)
    finally:
        held.close()


def test_find_port_range_in_message_and_bad_input():
    held = [_held_socket(), _held_socket()]
    try:
        ports = sorted(s.getsockname()[1] for s in held)
        if ports[1] == ports[0] + 1:  # two adjacent held ports: the whole range is busy
            with pytest.raises(SettingsError, match=rf"tried {ports[0]}-{ports[1]}, all in use"):
                find_port("127.0.0.1", ports[0], tries=1)
    finally:
        for s in held:
            s.close()
    with pytest.raises(SettingsError, match="1 to 65535"):
        find_port("127.0.0.1", 0)
    with pytest.raises(SettingsError, match="cannot listen on 203.0.113.7"):  # an address not on this machine
        find_port("203.0.113.7", 7860, tries=0)
