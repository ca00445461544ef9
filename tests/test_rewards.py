"""Rewards against hand-computed values, the reward hacks that must score 0, the registry and `rewards score`."""

from __future__ import annotations

import json
import textwrap

import pytest

from pipelines.rewards import (
    REWARDS,
    RewardError,
    accuracy_reward,
    compute_rewards,
    extract_answer,
    extract_think,
    format_reward,
    get_reward_fn,
    gold_answer,
    mc_letter,
    register,
    score_answer,
    training_answer,
    word_error_rate,
)


def ok(answer: str) -> str:
    return f"<think>reasoning</think>\n<answer>{answer}</answer>"


# ------------------------------------------------------------------------------------------------------------------
# extraction and format
def test_extract_answer():
    assert extract_answer("<think>x</think><answer>  B \n</answer>") == "B"
    assert extract_answer("<answer>a\nb</answer>") == "a\nb"
    assert extract_answer("<answer>A</answer><answer>B</answer>") == "A"  # first match, as Video-R1
    assert extract_answer("The answer is B") == ""
    assert extract_answer("<answer></answer>") == ""
    # eval rule: whole raw output when nothing (or nothing non-empty) was extracted
    assert extract_answer("The answer is B", fallback_whole=True) == "The answer is B"
    assert extract_answer("<answer> </answer>", fallback_whole=True) == "<answer> </answer>"
    assert extract_answer("<answer>C</answer>", fallback_whole=True) == "C"
    assert extract_think("<think>\n let me think \n</think><answer>1</answer>") == "let me think"
    assert extract_think("no tags") == ""


def test_training_answer_and_gold():
    assert training_answer("<answer>B</answer> <answer> B </answer>") == "B"  # repeating one answer is fine
    assert training_answer("<answer>A</answer><answer>B</answer>") == ""
    assert training_answer("B") == ""
    assert gold_answer("<answer>B</answer>") == "B"
    assert gold_answer("  B \n") == "B"  # a solution without tags is its own answer


@pytest.mark.parametrize("text,expected", [
    ("<think>x</think><answer>B</answer>", 1.0),
    ("<think>x</think>\n\n  <answer>B</answer>", 1.0),  # whitespace between think and answer
    ("<think>\nmulti\nline\n</think>\n<answer>\nB\n</answer>", 1.0),  # DOTALL
    ("<think>x</think><answer>B</answer> trailing", 0.0),
    ("<think>x</think><answer>B</answer>\n", 0.0),  # fullmatch: even a trailing newline fails
    ("  <think>x</think><answer>B</answer>", 0.0),
    ("<think>x</think> so <answer>B</answer>", 0.0),
    ("<answer>B</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward([text]) == [expected]


def test_format_reward_conversational():
    assert format_reward([[{"role": "assistant", "content": "<think>x</think><answer>B</answer>"}]]) == [1.0]
    assert format_reward([[{"role": "assistant", "content": [{"type": "text", "text": "B"}]}]]) == [0.0]


# ------------------------------------------------------------------------------------------------------------------
# multiple choice
@pytest.mark.parametrize("pred,gold,expected", [
    ("B", "B", 1.0), (" B ", "B", 1.0), ("b", "B", 0.0), ("B.", "B", 0.0), ("(B)", "B", 0.0), ("A", "B", 0.0),
    ("B. sitting", "B", 0.0), ("", "B", 0.0),
])
def test_mc_exact(pred, gold, expected):
    assert score_answer(pred, gold, "multiple choice") == expected


OPTIONS = ["A. running", "B. sitting", "C. eating", "D. sleeping"]


@pytest.mark.parametrize("pred,expected", [
    ("B", 1.0), ("b", 1.0), ("B.", 1.0), ("(B)", 1.0), ("(b)", 1.0), ("B)", 1.0), ("B:", 1.0),
    ("B) sitting", 1.0), ("B. sitting", 1.0), ("B. Sitting.", 1.0),
    ("B. running", 0.0),  # letter and text disagree
    ("A", 0.0), ("A or B", 0.0), ("A, B", 0.0), ("A/B", 0.0), ("AB", 0.0), ("B or A", 0.0), ("A and B", 0.0),
    ("A. or B", 0.0), ("", 0.0), ("sitting", 0.0),
])
def test_mc_lenient(pred, expected):
    assert score_answer(pred, "B", "multiple choice", options=OPTIONS, mc_lenient=True) == expected


def test_mc_lenient_without_options():
    assert mc_letter("B. sitting") == "B"
    assert mc_letter("B) the man sits") == "B"
    assert mc_letter("B. A or C") is None
    assert mc_letter("B. sitting, eating") is None
    assert mc_letter("A or B") is None
    assert mc_letter("A, B") is None
    assert score_answer("B. sitting", "B", "multiple choice", mc_lenient=True) == 1.0
    assert score_answer("A or B", "B", "multiple choice", mc_lenient=True) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# numerical
@pytest.mark.parametrize("pred,gold,expected", [
    ("3", "3", 1.0),
    ("3.0", "3", 0.0),  # Video-R1: exactly one side has '.' -> 0 (confirmed against grpo.py's rule)
    ("3", "3.0", 0.0),
    ("3.00", "3.0", 1.0),
    ("3.14", "3.14159", 1.0),  # round(., 2) equality
    ("3.15", "3.14159", 0.0),
    ("3.1", "3.14", 0.0),
    ("1,000", "1000", 0.0),  # a comma counts as a decimal marker in the agreement rule
    ("1,000.0", "1000.5", 0.0),
    ("1,000.0", "1000.0", 1.0),  # commas are dropped before float()
    ("1,000", "1,000", 1.0),
    ("-2", "-2", 1.0),
    ("0", "0", 1.0),  # gold 0: round rule handles it
    ("-0", "0", 1.0),
    ("0.004", "0.0", 1.0),  # round(0.004, 2) == 0.0
    ("0.01", "0.0", 0.0),
    ("three", "3", 0.0),
    ("3 or 4", "3", 0.0),
    ("", "3", 0.0),
    ("nan", "3", 0.0), ("inf", "3", 0.0), ("1e999", "3", 0.0),
    ("inf", "inf", 0.0), ("1e999", "1e999", 0.0), ("nan", "nan", 0.0),  # non-finite never earns reward
])
def test_numerical_rule(pred, gold, expected):
    assert score_answer(pred, gold, "numerical") == expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("3.0", "3", 1.0), ("3", "3.0", 1.0), ("1/2", "0.5", 1.0), ("\\frac{1}{2}", "0.5", 1.0),
    ("1,000", "1000", 1.0), ("4", "3", 0.0),
    ("3 or 4", "3", 0.0), ("4, 3", "3", 0.0), ("3; 4", "3", 0.0),  # several numbers: hedging
    ("1e999", "1", 0.0), ("inf", "3", 0.0), ("nan", "3", 0.0),
    ("", "3", 0.0),
])
def test_numerical_math_verify(pred, gold, expected):
    assert score_answer(pred, gold, "numerical", numerical_math_verify=True) == expected


def test_numerical_math_verify_falls_back_on_parse_failure():
    # math_verify cannot parse either word: the rule decides (and both have no decimal, float fails -> 0)
    assert score_answer("abc", "abc", "numerical", numerical_math_verify=True) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# OCR
def test_wer_by_hand():
    assert word_error_rate("the cat sat", "the cat sit") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the cat") == pytest.approx(1 / 3)  # one deletion
    assert word_error_rate("the cat sat", "the big cat sat") == pytest.approx(1 / 3)  # one insertion
    assert word_error_rate("the cat sat", "sat the cat") == pytest.approx(2 / 3)
    assert word_error_rate("a b", "c d e f g") == pytest.approx(5 / 2)  # > 1 before clipping
    assert word_error_rate("", "x y") == 2.0  # max(1, 0) denominator
    assert word_error_rate("The", "the") == 1.0  # case-sensitive


@pytest.mark.parametrize("pred,gold,expected", [
    ("the cat sit", "the cat sat", 2 / 3),
    ("the cat sat", "the cat sat", 1.0),
    ("  the   cat sat ", "the cat sat", 1.0),
    ("a b c d e f g", "x y", 0.0),  # clipped at 0
    ("", "the cat sat", 0.0),
    ("anything", "", 0.0),  # empty gold is broken data, not free reward
])
def test_ocr(pred, gold, expected):
    assert score_answer(pred, gold, "OCR") == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------------
# free-form
@pytest.mark.parametrize("pred,gold,expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("dogs run fast", "the cat sat", 0.0),
    # ref 6 tokens, hyp 3: R1 F = 2/3, R2 = 2*(1*0.4)/(1.4) = 4/7, RL (LCS 3) = 2/3
    ("the cat sat", "the cat sat on the mat", (2 / 3 + 4 / 7 + 2 / 3) / 3),
    ("Cats.", "cat", 1.0),  # identical after ROUGE tokenisation (stemmer): deviation, Video-R1 gives 2/3
    ("cat", "cat", 1.0),
    ("", "the cat", 0.0),
])
def test_free_form(pred, gold, expected):
    assert score_answer(pred, gold, "free-form") == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------------
# regression
@pytest.mark.parametrize("pred,gold,expected", [
    ("4", "4", 1.0),
    ("8", "4", 0.0),  # p = 2g: relative error 1 -> 0
    ("5", "4", 0.75),
    ("3", "4", 0.75),
    ("100", "4", 0.0),  # clipped
    ("-4", "4", 0.0),
    ("2.5", "2", 0.75),  # no decimal-agreement rule in regression
    ("1,500", "1500", 1.0),
    ("0", "0", 1.0),  # gold 0 fix: Video-R1 gives 0 here
    ("0.25", "0", 0.75),  # gold 0: absolute error
    ("-0.5", "0", 0.5),
    ("3", "0", 0.0),
    ("nan", "4", 0.0),  # Video-R1 gives nan full reward (min(1, max(0, nan)) == 0)
    ("inf", "4", 0.0), ("-inf", "4", 0.0), ("1e999", "4", 0.0),
    ("four", "4", 0.0), ("", "4", 0.0),
])
def test_regression(pred, gold, expected):
    assert score_answer(pred, gold, "regression") == pytest.approx(expected, abs=1e-6)


def test_regression_original_formula_bugs():
    """Why the fixes exist: Video-R1's formula scores an exact 0 as 0 and a nan as 1."""
    def original(p, g):
        rel = (abs(p - g) + 1e-9) / (abs(g) + 1e-9)
        return 1 - min(1.0, max(0.0, rel))
    assert original(0.0, 0.0) == 0.0
    assert original(float("nan"), 4.0) == 1.0


def test_unknown_type_and_non_strings():
    assert score_answer("B", "B", "essay") == 0.0
    assert score_answer(None, "B", "multiple choice") == 0.0  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# batch accuracy: reward hacks score 0
def acc(completion, solution="<answer>B</answer>", ptype="multiple choice", **kw):
    return accuracy_reward([completion], solution=[solution], problem_type=[ptype], options=[OPTIONS], **kw)[0]


def test_accuracy_correct():
    assert acc(ok("B")) == 1.0
    assert acc(ok("B"), solution="B") == 1.0  # untagged solution


@pytest.mark.parametrize("completion", [
    "<think>x</think><answer></answer>",  # empty answer
    "<think>x</think><answer>   </answer>",
    "<think>x</think><answer>A</answer><answer>B</answer>",  # several disagreeing tags
    "<think><answer>B</answer></think><answer>A</answer>",
    "<think>x</think><answer>B</answer><answer>A</answer>",  # Video-R1 would take the first (B) and pay 1
    "<think>the answer is B</think>",  # answer outside the tags only
    "B",
    ok("A or B"),
    ok("A, B"),
])
def test_accuracy_hacks_score_zero(completion):
    assert acc(completion) == 0.0
    assert acc(completion, mc_lenient=True) == 0.0


@pytest.mark.parametrize("completion,solution,ptype", [
    (ok("nan"), "<answer>4</answer>", "regression"),
    (ok("inf"), "<answer>4</answer>", "regression"),
    (ok("1e999"), "<answer>1e999</answer>", "numerical"),
    (ok("inf"), "<answer>inf</answer>", "numerical"),
    (ok(""), "<answer></answer>", "OCR"),
    (ok(""), "<answer></answer>", "free-form"),
    (ok("3 or 4"), "<answer>3</answer>", "numerical"),
])
def test_accuracy_hacks_other_types(completion, solution, ptype):
    assert accuracy_reward([completion], solution=[solution], problem_type=[ptype],
                           numerical_math_verify=False)[0] == 0.0
    assert accuracy_reward([completion], solution=[solution], problem_type=[ptype],
                           numerical_math_verify=True)[0] == 0.0


def test_accuracy_repeated_same_answer_counts():
    assert acc("<think>x</think><answer>B</answer> <answer>B</answer>") == 1.0


def test_accuracy_per_item_problem_type():
    """Video-R1 reads problem_type[0] for the whole batch; here each completion uses its own."""
    out = accuracy_reward(
        [ok("B"), ok("3"), ok("the cat sit"), ok("4")],
        solution=["<answer>B</answer>", "<answer>3</answer>", "<answer>the cat sat</answer>", "<answer>5</answer>"],
        problem_type=["multiple choice", "numerical", "OCR", "regression"],
        options=[OPTIONS, [], [], []],
    )
    assert out == pytest.approx([1.0, 1.0, 2 / 3, 0.8])


def test_accuracy_options_flags():
    assert acc(ok("(B)")) == 0.0
    assert acc(ok("(B)"), mc_lenient=True) == 1.0
    assert acc(ok("3.0"), solution="<answer>3</answer>", ptype="numerical") == 0.0
    assert acc(ok("3.0"), solution="<answer>3</answer>", ptype="numerical", numerical_math_verify=True) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# registry and compute_rewards
def test_registry_builtins():
    assert REWARDS["accuracy"] is accuracy_reward and REWARDS["format"] is format_reward
    assert get_reward_fn("accuracy") is accuracy_reward


def test_register_decorator():
    @register("test-const")
    def const(completions, **_):
        return [0.5] * len(completions)

    try:
        assert get_reward_fn("test-const") is const
        total, per = compute_rewards(["format", "test-const"], [ok("B")], weights=[1.0, 2.0])
        assert total == [2.0] and per == {"format": [1.0], "test-const": [0.5]}
    finally:
        REWARDS.pop("test-const")


def test_compute_rewards_sum_and_weights():
    cols = dict(solution=["<answer>B</answer>"] * 3, problem_type=["multiple choice"] * 3, options=[OPTIONS] * 3)
    comps = [ok("B"), "<answer>B</answer>", ok("A")]
    total, per = compute_rewards(["accuracy", "format"], comps, **cols)
    assert per == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert total == [2.0, 1.0, 1.0]
    total, _ = compute_rewards(["accuracy", "format"], comps, weights=[1.0, 0.5], **cols)
    assert total == [1.5, 1.0, 0.5]
    with pytest.raises(RewardError, match="weights"):
        compute_rewards(["accuracy", "format"], comps, weights=[1.0], **cols)
    with pytest.raises(RewardError, match="twice"):
        compute_rewards(["format", "format"], comps)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "mod.py").write_text(textwrap.dedent("""
        NOT_CALLABLE = 3

        def brevity(completions, **kwargs):
            return [1.0 if len(c) < 60 else 0.0 for c in completions]

        def lenient_flag(completions, mc_lenient=False, **kwargs):
            return [float(mc_lenient)] * len(completions)

        def short(completions, **kwargs):
            return [1.0]

        def nan(completions, **kwargs):
            return [float("nan")] * len(completions)

        def text(completions, **kwargs):
            return ["high"] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_pkg.mod"


def test_plugin_loading(plugin):
    fn = get_reward_fn(f"{plugin}:brevity")
    assert fn(["short", "x" * 100]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="cannot import module 'no_such_pkg.mod'"):
        get_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        get_reward_fn(f"{plugin}:missing")
    with pytest.raises(RewardError, match="not a function"):
        get_reward_fn(f"{plugin}:NOT_CALLABLE")
    with pytest.raises(RewardError, match="unknown reward 'acuracy'") as e:
        get_reward_fn("acuracy")
    assert "accuracy" in e.value.hint


@pytest.mark.parametrize("name,match", [("short", "1 values for 2"), ("nan", "non-finite"), ("text", "'high'")])
def test_compute_rewards_validates_plugin_output(plugin, name, match):
    with pytest.raises(RewardError, match=match) as e:
        compute_rewards([f"{plugin}:{name}"], ["a", "b"])
    assert f"{plugin}:{name}" in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# `videor1 rewards score`
LINES = [
    {"problem_type": "multiple choice", "solution": "<answer>B</answer>", "completion": ok("B"), "options": OPTIONS,
     "data_type": "video", "id": "mc-1"},
    {"problem_type": "multiple choice", "solution": "<answer>B</answer>", "completion": ok("(B)"),
     "options": OPTIONS, "id": "mc-2"},
    {"problem_type": "numerical", "solution": "<answer>3</answer>", "completion": "<answer>3</answer>", "id": "n-1"},
    {"problem_type": "regression", "solution": "<answer>0</answer>", "completion": ok("0") + " extra", "id": "r-1"},
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_cli_score(tmp_path):
    from conftest import run_cli

    src = write_jsonl(tmp_path / "c.jsonl", LINES)
    out = tmp_path / "scored.jsonl"
    result = run_cli("rewards", "score", src, "-o", out, "--set", f"run.output_dir={tmp_path / 'runs'}")
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["mc-1", "mc-2", "n-1", "r-1"]
    assert [r["accuracy"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    assert [r["format"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["reward"] for r in rows] == [2.0, 1.0, 1.0, 1.0]
    assert rows[0]["options"] == OPTIONS and rows[0]["data_type"] == "video"
    assert "multiple choice" in result.output and "accuracy" in result.output

    from pipelines.config import load_config
    from pipelines.registry import Registry

    reg = Registry(load_config(overrides=[f"run.output_dir={tmp_path / 'runs'}"]).registry_path())
    (run,) = reg.list_runs()
    info = reg.get_run(run["id"])
    assert info["kind"] == "rewards-score" and info["status"] == "finished"
    metrics = reg.metrics(run["id"])
    assert metrics["accuracy"] == [(0, pytest.approx(0.75))]
    assert metrics["multiple choice/accuracy"] == [(0, pytest.approx(0.5))]
    assert metrics["count"] == [(0, 4.0)]
    assert info["summary"]["accuracy"] == pytest.approx(0.75) and info["summary"]["bad_lines"] == 0
    arts = reg.artifacts_of(run["id"])
    assert any(a.path == str(out.resolve()) for group in arts.values() for a in group)


def test_cli_score_config_and_plugin(tmp_path, plugin):
    from conftest import run_cli

    src = write_jsonl(tmp_path / "c.jsonl", LINES)
    out = tmp_path / "scored.jsonl"
    run_cli("rewards", "score", src, "-o", out, "--set", "rl.mc_lenient=true",
            "--set", f'rl.rewards=[format,accuracy,"{plugin}:lenient_flag"]',
            "--set", "rl.reward_weights=[0.5,1,2]", "--set", f"run.output_dir={tmp_path / 'runs'}")
    rows = read_jsonl(out)
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 1.0, 1.0]  # (B) accepted with mc_lenient
    assert [r[f"{plugin}:lenient_flag"] for r in rows] == [1.0] * 4
    assert [r["reward"] for r in rows] == [0.5 + 1 + 2, 0.5 + 1 + 2, 1 + 2, 1 + 2]


def test_cli_score_bad_lines(tmp_path):
    from conftest import run_cli

    src = write_jsonl(tmp_path / "c.jsonl", LINES[:2], ['{"problem_type": "OCR", "completion": "x"}', "not json"])
    out = tmp_path / "scored.jsonl"
    result = run_cli("rewards", "score", src, "-o", out, "--set", f"run.output_dir={tmp_path / 'runs'}",
                     check=False)
    assert result.exit_code == 1
    assert f"{src} line 3" in result.output and "solution" in result.output
    assert "2 bad line(s)" in result.output
    assert len(read_jsonl(out)) == 2  # the good lines are still scored and written


def test_cli_score_unknown_plugin(tmp_path):
    from conftest import run_cli

    src = write_jsonl(tmp_path / "c.jsonl", LINES)
    result = run_cli("rewards", "score", src, "--set", 'rl.rewards=[accuracy,"nope_pkg.x:fn"]',
                     "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert result.exit_code == 1 and "nope_pkg" in result.output
