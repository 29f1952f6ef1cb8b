"""The training settings (wan.train.config, wan.cli_train) and their optimizers and schedules
(wan.train.optimizers): musubi-tuner's flag names and TOML, errors that name the flag, the value and what
is allowed, refused musubi flags, and each LR schedule against its formula and transformers' definition."""

import math

import pytest
import torch

from wan.cli_train import add_arguments, config_from_args, run
from wan.flags import FlagParser
from wan.train.config import (FLAG_NAMES, UNSUPPORTED_FLAGS, TrainConfig, TrainConfigError, check_for_training,
                              parse_key_values)
from wan.train.optimizers import OptimizerError, build_optimizer, build_scheduler, lr_lambda, warmup_steps


def parser() -> FlagParser:
    p = FlagParser(prog="wgp.py train")
    add_arguments(p)
    return p


def parse(*argv: str) -> TrainConfig:
    return config_from_args(parser().parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------
# Flags and the TOML file


def test_flags_parse_into_the_typed_config_with_musubi_names():
    cfg = parse("--dataset_config", "data.toml", "--dit", "wan.safetensors", "--network_dim", "16",
                "--network_alpha", "8", "--learning-rate", "1e-4", "--optimizer_args", "weight_decay=0.1",
                "betas=0.9,0.99", "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "10%",
                "--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--min_timestep", "100",
                "--gradient_checkpointing", "--mixed_precision", "bf16", "--save_every_n_steps", "50",
                "--network_args", "loraplus_lr_ratio=4", "exclude_patterns=['.*ffn.*']", "--sdpa")
    assert cfg.network_dim == 16 and cfg.network_alpha == 8.0 and cfg.learning_rate == 1e-4
    assert cfg.optimizer_kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.99)}
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.lr_warmup_steps == 0.1
    assert cfg.timestep.timestep_sampling == "shift" and cfg.timestep.discrete_flow_shift == 3.0
    assert cfg.timestep.min_timestep == 100 and cfg.timestep.max_timestep is None
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "bf16" and cfg.save_every_n_steps == 50
    assert cfg.network_kwargs == {"loraplus_lr_ratio": 4.0, "exclude_patterns": "['.*ffn.*']"}
    # defaults are musubi's
    d = TrainConfig()
    assert (d.learning_rate, d.max_train_steps, d.max_grad_norm, d.network_alpha, d.lr_scheduler, d.save_format) == \
        (2e-6, 1600, 1.0, 1.0, "constant", "musubi")


def test_toml_keys_are_the_flags_tables_are_flattened_and_flags_win(tmp_path):
    conf = tmp_path / "train.toml"
    conf.write_text('dataset_config = "data.toml"\nlearning_rate = 5e-5\n\n[network]\nnetwork_dim = 32\n'
                    'network_args = ["loraplus_lr_ratio=2"]\n\n[timesteps]\ntimestep_sampling = "sigmoid"\n'
                    'min_timestep = 200\nmax_timestep = 800\n')
    cfg = parse("--config_file", str(conf), "--learning_rate", "1e-3", "--max_timestep", "900")
    assert cfg.learning_rate == 1e-3  # the flag wins
    assert cfg.network_dim == 32 and cfg.network_args == ("loraplus_lr_ratio=2",)
    assert cfg.timestep.timestep_sampling == "sigmoid"
    assert (cfg.timestep.min_timestep, cfg.timestep.max_timestep) == (200, 900)
    # the file without its .toml suffix is found, as musubi's --config_file
    assert parse("--config_file", str(tmp_path / "train")).learning_rate == 5e-5


def test_errors_name_the_flag_or_file_key_the_value_and_what_is_allowed(tmp_path):
    cases = [
        (["--learning_rate", "-1"], "--learning_rate: -1.0 is not allowed; expected a number > 0"),
        (["--learning_rate", "abc"], "--learning_rate: 'abc' is not allowed; expected a number > 0"),
        (["--lr_scheduler", "rex"], "--lr_scheduler: 'rex' is not allowed; expected one of constant, "
                                    "constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"),
        (["--timestep_sampling", "flux2_shift"], "--timestep_sampling: 'flux2_shift' is not allowed; expected one of "
                                                 "sigma, uniform"),
        (["--network_dim", "1.5"], "--network_dim: '1.5' is not allowed; expected an integer >= 1"),
        (["--lr_warmup_steps", "1.5"], "--lr_warmup_steps: 1.5 is not allowed; expected an integer >= 0 (steps), "
                                       "or a fraction"),
        (["--min_timestep", "600", "--max_timestep", "500"], "--max_timestep: 500 is not allowed; expected a value "
                                                             "above min_timestep (600)"),
        (["--optimizer_args", "weight_decay"], "--optimizer_args: 'weight_decay' is not allowed; expected key=value"),
        (["--optimizer_args", "lr=__import__('os')"], "--optimizer_args: lr=\"__import__('os')\" is not allowed; the "
                                                      "value must be a Python literal"),
        (["--network_args", "rank=4"], "--network_args: network_args key 'rank' is not allowed; one of "
                                       "exclude_patterns"),
    ]
    for argv, expected in cases:
        with pytest.raises(TrainConfigError) as err:
            parse(*argv)
        assert str(err.value).startswith(expected), (argv, str(err.value))
    conf = tmp_path / "bad.toml"
    conf.write_text('learning_rat = 1e-4\n')
    with pytest.raises(TrainConfigError, match=r"bad.toml: learning_rat: unknown setting \(did you mean "
                                                r"learning_rate\?\)"):
        parse("--config_file", str(conf))
    conf.write_text('[x]\nmixed_precision = "fp8"\n')
    with pytest.raises(TrainConfigError, match=r"bad.toml: mixed_precision: 'fp8' is not allowed; expected one of "
                                                r"no, fp16, bf16"):
        parse("--config_file", str(conf))
    # built in code, each value is checked too
    with pytest.raises(TrainConfigError, match="train config: save_format: 'kohya' is not allowed"):
        TrainConfig(save_format="kohya")


def test_rules_between_settings_name_the_flags():
    def problem(**kw) -> str:
        with pytest.raises(TrainConfigError) as err:
            check_for_training(TrainConfig(**{"dataset_config": "d.toml", "dit": "x", "output_dir": "o",
                                              "output_name": "n", **kw}))
        return str(err.value)

    assert problem(dataset_config=None).startswith("--dataset_config: required")
    assert problem(dit=None).startswith("--dit: required")
    assert problem(output_name=None).startswith("--output_name: required")
    assert problem(fp8_scaled=True).startswith("--fp8_scaled: needs --fp8_base")
    assert "constant_with_warmup" in problem(lr_warmup_steps=10)
    assert problem(save_last_n_steps=3).startswith("--save_last_n_steps: needs --save_every_n_steps")
    assert problem(log_with="tensorboard").startswith("--log_with: tensorboard needs --logging_dir")
    assert problem(blocks_to_swap=10).startswith("--blocks_to_swap: needs --gradient_checkpointing")
    assert problem(blocks_to_swap=1, gradient_checkpointing=True, fp8_base=True).startswith(
        "--blocks_to_swap: cannot be combined with --fp8_base")


def test_unsupported_musubi_flags_are_refused_by_name(tmp_path, capsys):
    assert {"xformers", "compile", "ddp_timeout", "base_weights", "lr_scheduler_type", "wandb_api_key"} <= \
        set(UNSUPPORTED_FLAGS)
    assert not set(UNSUPPORTED_FLAGS) & set(FLAG_NAMES)
    code = run(parser().parse_args(["--dataset_config", "d.toml", "--xformers", "--dit", "x"]))
    err = capsys.readouterr().err
    assert code == 2
    assert "--xformers: a musubi-tuner flag this trainer does not support" in err and "--sdpa" in err
    code = run(parser().parse_args(["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR"]))
    assert code == 2 and "--lr_scheduler_type: a musubi-tuner flag" in capsys.readouterr().err
    conf = tmp_path / "t.toml"
    conf.write_text("compile = true\n")
    assert run(parser().parse_args(["--config_file", str(conf)])) == 2
    assert "t.toml: compile: is a musubi-tuner setting this trainer does not support: torch.compile" in \
        capsys.readouterr().err


def test_run_reports_missing_settings_with_exit_code_2(capsys):
    assert run(parser().parse_args(["--dit", "x.safetensors"])) == 2
    assert "error: --dataset_config: required" in capsys.readouterr().err
    assert run(parser().parse_args(["--task", "t2v-99B"])) == 2
    assert "--task: 't2v-99B' is not allowed; expected one of t2v-1.3B" in capsys.readouterr().err


def test_help_tells_that_the_default_sigma_mode_ignores_the_shift():
    text = " ".join(parser().format_help().split())
    start = text.index("--timestep_sampling {sigma,", text.index("timesteps settings:"))
    block = text[start:text.index("--discrete_flow_shift X", start)]
    assert "sigma mode ignores --discrete_flow_shift" in block and "--timestep_sampling shift" in block
    assert "--learning_rate X learning rate" in text and "(default: 2e-06)" in text


def test_show_timesteps_console_stops_before_training(capsys):
    assert run(parser().parse_args(["--show_timesteps", "console", "--timestep_sampling", "shift",
                                    "--discrete_flow_shift", "3"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and lines[0].startswith("   0-  49") and lines[-1].startswith(" 950- 999")


def test_key_values_are_python_literals_never_code():
    assert parse_key_values(["betas=0.9,0.999", "decouple=True", "d_coef='x'", "eps=None"], "optimizer_args") == \
        {"betas": (0.9, 0.999), "decouple": True, "d_coef": "x", "eps": None}
    with pytest.raises(TrainConfigError):
        parse_key_values(["x=open('f')"], "optimizer_args")


# ---------------------------------------------------------------------------------------------
# Optimizers


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_optimizer_choices():
    choice = build_optimizer("", _params(), 1e-3, {"weight_decay": 0.0})
    assert type(choice.optimizer) is torch.optim.AdamW and choice.name == "torch.optim.adamw.AdamW"
    sgd = build_optimizer("torch.optim.SGD", _params(), 0.1, {"momentum": 0.9})
    assert type(sgd.optimizer) is torch.optim.SGD and sgd.args == "momentum=0.9"
    assert type(build_optimizer("RMSprop", _params(), 0.1).optimizer) is torch.optim.RMSprop
    with pytest.raises(OptimizerError, match="AdamW8bit \\(bitsandbytes\\) runs on a CUDA GPU; this run is on cpu"):
        build_optimizer("adamw8bit", _params(), 1e-3, device="cpu")
    with pytest.raises(OptimizerError, match="needs the package no_such_pkg"):
        build_optimizer("no_such_pkg.Opt", _params(), 1e-3)
    with pytest.raises(OptimizerError, match="'Adamm' is not allowed"):
        build_optimizer("Adamm", _params(), 1e-3)
    with pytest.raises(OptimizerError, match="torch.nn.Linear is not a torch optimizer class"):
        build_optimizer("torch.nn.Linear", _params(), 1e-3)
    with pytest.raises(OptimizerError, match="does not take these arguments"):
        build_optimizer("AdamW", _params(), 1e-3, {"momentum": 0.9})


def test_adafactor_relative_step_has_its_own_schedule_as_musubi():
    choice = build_optimizer("Adafactor", _params(), 1e-3)
    assert choice.own_lr_schedule == 1e-3 and type(choice.optimizer).__name__ == "Adafactor"
    sched = build_scheduler(choice, "constant", num_training_steps=10)
    assert type(sched).__name__ == "AdafactorSchedule"
    with pytest.raises(TrainConfigError, match="--lr_warmup_steps: Adafactor with relative_step"):
        build_scheduler(choice, "constant_with_warmup", num_training_steps=10, lr_warmup_steps=2)
    fixed = build_optimizer("Adafactor", _params(), 1e-3, {"relative_step": False, "scale_parameter": False})
    assert fixed.own_lr_schedule is None and type(build_scheduler(fixed, "linear", num_training_steps=10)).__name__ \
        == "LambdaLR"


# ---------------------------------------------------------------------------------------------
# Schedules: formulas written out here, and transformers' get_scheduler (musubi's source of them)


def formula(name: str, step: int, w: int, t: int, cycles: int = 1, power: float = 1.0, lr: float = 1e-3) -> float:
    if step < w and name != "constant":
        return step / max(1, w)
    progress = (step - w) / max(1, t - w)
    if name == "constant" or name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, (t - step) / max(1, t - w))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1)))
    if name == "polynomial":
        end = 1e-7
        return end / lr if step > t else ((lr - end) * (1 - progress) ** power + end) / lr
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_each_schedule_follows_its_formula_and_transformers(name):
    from transformers.optimization import get_scheduler
    total, warm, cycles, power, lr = 20, 0 if name == "constant" else 4, 3, 2.0, 1e-3
    choice = build_optimizer("AdamW", _params(), lr)
    ours = build_scheduler(choice, name, num_training_steps=total, lr_warmup_steps=warm, num_cycles=cycles,
                           power=power)
    ref_opt = torch.optim.AdamW(_params(), lr=lr)
    kw = {"num_cycles": cycles} if name == "cosine_with_restarts" else {"power": power} if name == "polynomial" else {}
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warm if name != "constant" else None,
                        num_training_steps=total, scheduler_specific_kwargs=kw)
    for step in range(total + 3):
        got = ours.get_last_lr()[0]
        assert got == pytest.approx(lr * formula(name, step, warm, total, cycles, power, lr), rel=1e-12, abs=1e-15)
        assert got == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        choice.optimizer.step()
        ours.step()
        ref_opt.step()
        ref.step()


def test_warmup_fraction_counts_training_steps():
    assert warmup_steps(0.1, 250) == 25 and warmup_steps(10, 250) == 10 and warmup_steps(0, 5) == 0
    f = lr_lambda("constant_with_warmup", num_warmup_steps=warmup_steps(0.25, 8), num_training_steps=8)
    assert [f(s) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# The command end to end


def test_the_train_command_trains_and_saves(tmp_path, capsys):
    from safetensors.torch import save_file

    from test_train_loop import clips, write_dataset
    from wan.testing.tiny_family import tiny_dit_state_dict
    dit = tmp_path / "dit.safetensors"
    save_file(tiny_dit_state_dict("t2v", 5), str(dit))
    data = write_dataset(tmp_path / "data", clips(2, (16, 1, 4, 4)), frames=1, size=(32, 32))
    conf = tmp_path / "train.toml"
    conf.write_text(f'[model]\ndit = "{dit}"\n[data]\ndataset_config = "{data}"\n[train]\nmax_train_steps = 2\n'
                    f'learning_rate = 1e-3\nseed = 0\nnetwork_dim = 2\n')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(parser().parse_args(["--config_file", str(conf), "--output_dir", str(tmp_path / "out"),
                                        "--output_name", "mine", "--max_train_steps", "3", "--sdpa"]))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert (tmp_path / "out" / "mine.safetensors").is_file()
    assert len((tmp_path / "out" / "mine.log.jsonl").read_text().splitlines()) == 3  # the flag won: 3 steps
    assert "memory estimate (rough):" in out.out
    # a missing state folder is bad input, named
    code = run(parser().parse_args(["--config_file", str(conf), "--output_dir", str(tmp_path / "out"),
                                    "--output_name", "mine", "--resume", str(tmp_path / "nowhere")]))
    assert code == 2 and "--resume" in capsys.readouterr().err
