"""LoRA strength strings: per-step and per-expert tables, errors, include/exclude filters."""

import pytest

from wan.lora.schedule import include_exclude, parse_multiplier

STEPS = 6
SWITCH = 3  # A14B: steps 0-2 run the high-noise expert, 3-5 the low-noise one

# (string, switch_step) -> expected (expert, multiplier) at steps 0..5, written out by hand.
TABLES = {
    ("1.0,0.8,0.6", None): [("transformer", v) for v in (1.0, 1.0, 0.8, 0.8, 0.6, 0.6)],
    ("0.7", None): [("transformer", 0.7)] * 6,
    ("0.7", SWITCH): [("high_noise", 0.7)] * 3 + [("low_noise", 0.7)] * 3,
    # A plain schedule on A14B covers all steps, whichever expert runs them.
    ("1.0,0.8,0.6", SWITCH): [("high_noise", 1.0), ("high_noise", 1.0), ("high_noise", 0.8),
                              ("low_noise", 0.8), ("low_noise", 0.6), ("low_noise", 0.6)],
    ("1;0", SWITCH): [("high_noise", 1.0)] * 3 + [("low_noise", 0.0)] * 3,
    # The high-noise schedule 1,0.5 is spread over the 3 high-noise steps: indices 0,0,1.
    ("1,0.5;0", SWITCH): [("high_noise", 1.0), ("high_noise", 1.0), ("high_noise", 0.5),
                          ("low_noise", 0.0), ("low_noise", 0.0), ("low_noise", 0.0)],
    # The low-noise schedule is spread over the low-noise steps 3..5 only.
    ("0;1,0.5,0.25", SWITCH): [("high_noise", 0.0)] * 3 + [("low_noise", 1.0), ("low_noise", 0.5),
                                                           ("low_noise", 0.25)],
}


@pytest.mark.parametrize("text,switch", list(TABLES))
def test_multiplier_table(text, switch):
    m = parse_multiplier(text)
    recorded = []
    for step in range(STEPS):
        expert = "transformer" if switch is None else ("high_noise" if step < switch else "low_noise")
        recorded.append((expert, m.at(step, STEPS, expert, switch_step=switch)))
    assert recorded == TABLES[(text, switch)]
    assert m.per_step(STEPS, switch) == [v for _, v in TABLES[(text, switch)]]


def test_spread_more_values_than_steps_and_uneven():
    # 4 values over 2 steps: indices floor(i*4/2) = 0, 2.
    assert parse_multiplier("1,2,3,4").per_step(2) == [1.0, 3.0]
    # 2 values over 5 steps: indices 0,0,0,1,1.
    assert parse_multiplier("1,0").per_step(5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_constant_without_switch_step_per_expert():
    # Constant sides need no switch step.
    m = parse_multiplier(" 1 ; 0.25 ")
    assert m.at(0, 4, "high_noise") == 1.0 and m.at(3, 4, "low_noise") == 0.25
    assert m.per_expert and not m.is_constant
    assert parse_multiplier("0.5").is_constant and parse_multiplier(0.5).text == "0.5"
    assert parse_multiplier("-0.5").at(0, 1) == -0.5


@pytest.mark.parametrize("text,part", [
    ("", "empty"), ("abc", "'abc'"), ("1,,2", "empty value"), ("1;2;3;4", "at most 3"),
    ("nan", "'nan'"), ("inf", "'inf'"), ("1_0", "'1_0'"), ("1;", "empty value"), ("0.5x", "'0.5x'"),
])
def test_bad_strings(text, part):
    with pytest.raises(ValueError) as err:
        parse_multiplier(text)
    msg = str(err.value)
    assert repr(text) in msg and part in msg
    if text:
        assert "high;low" in msg  # the accepted syntax is spelled out


def test_misuse_errors():
    with pytest.raises(ValueError, match="single transformer"):
        parse_multiplier("1;0").at(0, 6, "transformer")
    with pytest.raises(ValueError, match="switch_step"):
        parse_multiplier("1,0.5;0").at(0, 6, "high_noise")
    with pytest.raises(ValueError, match="high-noise expert runs steps 0..2"):
        parse_multiplier("1;0").at(4, 6, "high_noise", switch_step=3)
    with pytest.raises(ValueError, match="step must be in 0..5"):
        parse_multiplier("1").at(6, 6)
    with pytest.raises(ValueError, match="expert 'mid'"):
        parse_multiplier("1").at(0, 6, "mid")


NAMES = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0", "blocks.10.self_attn.o",
         "head.head", "text_embedding.0"]


def test_include_exclude():
    def kept(inc, exc):
        f = include_exclude(inc, exc)
        return [n for n in NAMES if f(n)]

    assert kept(None, None) == NAMES
    assert kept([], []) == NAMES
    assert kept([r"self_attn"], None) == ["blocks.0.self_attn.q", "blocks.10.self_attn.o"]
    assert kept(None, [r"^blocks\.1\."]) == [n for n in NAMES if n != "blocks.1.ffn.0"]
    # include first, then exclude: both apply
    assert kept([r"^blocks\."], [r"attn\.q$", r"ffn"]) == ["blocks.0.cross_attn.k", "blocks.10.self_attn.o"]
    # search, not match: an unanchored pattern matches inside the name
    assert kept(["attn.k"], None) == ["blocks.0.cross_attn.k"]
    # a lone string is one pattern, not a list of characters
    assert kept("head", None) == ["head.head"]
    with pytest.raises(ValueError, match=r"include pattern '\(unclosed'"):
        include_exclude(["(unclosed"], None)
