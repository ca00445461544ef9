"""Prompt templates: the shipped video-r1 template reproduces Video-R1's text character for character."""

from __future__ import annotations

import pytest

from pipelines.errors import DataError, VideoR1Error
from pipelines.prompts import (
    PROBLEM_TYPES,
    TemplateError,
    build_messages,
    list_templates,
    load_template,
    question_text,
)

# Copied verbatim from /work/shared/reference/video-r1-prompts.md (Video-R1's grpo.py / sft_video.py / eval_bench.py).
QUESTION_TEMPLATE = (
    "{Question}\nPlease think about this question as if you were a human pondering deeply. Engage in an internal "
    "dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or "
    "other natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your final "
    "answer between the <answer> </answer> tags."
)
EVAL_LAST = ("Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer "
             "between the <answer> and </answer> tags.")
TRAIN_LAST = ("Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
              "between the <answer> </answer> tags.")
EVAL_QUESTION_TEMPLATE = QUESTION_TEMPLATE.replace(TRAIN_LAST, EVAL_LAST)
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> "
                       "</answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> "
           "</answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
}

MC = {
    "problem_id": 7,
    "problem": "What is the man doing?",
    "data_type": "video",
    "problem_type": "multiple choice",
    "options": ["A. running", "B. sitting", "C. eating", "D. sleeping"],
    "process": "<think>He is on a chair.</think>",
    "solution": "<answer>B</answer>",
    "path": "./LLaVA-Video-178K/x.mp4",
}
NUM = {"problem": "How many balls are there?", "data_type": "image", "problem_type": "numerical", "options": [],
       "solution": "<answer>3</answer>", "process": "<think>count</think>", "path": "./Math/x.png"}


def original(record, eval_=False):
    """Video-R1's own rendering, written the way grpo.py writes it."""
    if record["problem_type"] == "multiple choice":
        question = record["problem"] + "Options:\n"
        for op in record["options"]:
            question += op + "\n"
    else:
        question = record["problem"]
    tpl = EVAL_QUESTION_TEMPLATE if eval_ else QUESTION_TEMPLATE
    return tpl.format(Question=question) + TYPE_TEMPLATE[record["problem_type"]]


def test_shipped_templates():
    assert {"video-r1", "answer-only"} <= set(list_templates())
    for name in list_templates():
        t = load_template(name)
        assert t.name == name
        assert set(PROBLEM_TYPES) <= set(t.type_template)


def test_video_r1_fields_are_the_literal_strings():
    t = load_template("video-r1")
    assert t.question_template == QUESTION_TEMPLATE
    assert t.eval_question_template == EVAL_QUESTION_TEMPLATE
    assert t.type_template == TYPE_TEMPLATE
    assert t.options_header == "Options:\n"
    assert t.system is None
    assert t.sft_system == "You are a helpful assistant"
    assert t.assistant_format == "{process}\n{solution}"
    # The eval copy differs only in its last sentence.
    assert t.question_template.replace(TRAIN_LAST, "") == t.eval_question_template.replace(EVAL_LAST, "")


@pytest.mark.parametrize("ptype", PROBLEM_TYPES)
def test_video_r1_rendering_matches_original(ptype):
    rec = dict(MC, problem_type=ptype) if ptype == "multiple choice" else dict(NUM, problem_type=ptype)
    t = load_template("video-r1")
    assert question_text(rec, t, "train") == original(rec)
    assert question_text(rec, t, "eval") == original(rec, eval_=True)
    assert question_text(rec, "video-r1", "sft") == original(rec)


def test_mc_text_by_hand():
    text = question_text(MC, "video-r1")
    expected_head = ("What is the man doing?Options:\nA. running\nB. sitting\nC. eating\nD. sleeping\n\n"
                     "Please think about this question")
    assert text.startswith(expected_head)
    assert text.endswith("the <answer> </answer> tags. Please provide only the single option letter (e.g., A, B, C, "
                         "D, etc.) within the <answer> </answer> tags.")


def test_question_braces_are_kept():
    rec = dict(NUM, problem="Solve {x}: f(x) = {Question}?")
    assert question_text(rec, "video-r1").startswith("Solve {x}: f(x) = {Question}?\nPlease think")


def test_messages_train_and_eval():
    msgs = build_messages(MC, "video-r1", "train")
    assert msgs == [{"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": original(MC)}]}]
    msgs = build_messages(NUM, "video-r1", "eval")
    assert msgs == [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": original(NUM, eval_=True)}]}]
    assert "path" not in str(msgs) and "x.png" not in str(msgs)


def test_messages_sft():
    msgs = build_messages(MC, "video-r1", "sft")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == [{"type": "text", "text": "You are a helpful assistant"}]
    assert msgs[1]["content"][1]["text"] == original(MC)
    assert msgs[2]["content"] == [{"type": "text", "text": "<think>He is on a chair.</think>\n<answer>B</answer>"}]


def test_sft_needs_process():
    rec = {k: v for k, v in MC.items() if k != "process"}
    with pytest.raises(DataError, match="process"):
        build_messages(rec, "video-r1", "sft")


def test_bad_records():
    with pytest.raises(DataError, match="data_type"):
        build_messages(dict(MC, data_type="audio"), "video-r1")
    with pytest.raises(DataError, match="problem_type"):
        question_text(dict(MC, problem_type="essay"), "video-r1")
    with pytest.raises(DataError, match="problem"):
        question_text({"problem_type": "numerical"}, "video-r1")


def test_answer_only():
    t = load_template("answer-only")
    text = question_text(MC, t)
    assert text == ("What is the man doing?Options:\nA. running\nB. sitting\nC. eating\nD. sleeping\n"
                    " Answer with the option letter inside <answer> </answer>.")
    assert len(question_text(NUM, t)) < 100


def test_unknown_name_lists_shipped():
    with pytest.raises(VideoR1Error) as e:
        load_template("video-r2")
    assert "video-r2" in str(e.value) and "video-r1" in e.value.hint and "answer-only" in e.value.hint


def test_user_template(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text('name: mine\nquestion_template: "Q: {Question}"\nsystem: "Be brief."\n'
                 'type_template:\n  numerical: " Number in <answer></answer>."\n')
    t = load_template(str(p))
    assert t.eval_question_template is None
    assert question_text(NUM, t, "eval") == "Q: How many balls are there? Number in <answer></answer>."
    msgs = build_messages(NUM, t)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


@pytest.mark.parametrize("body,field", [
    ('question_template: "{Question}"\ntype_template: {numerical: " x"}\n', "name"),
    ('name: x\ntype_template: {numerical: " x"}\n', "question_template"),
    ('name: x\nquestion_template: "no placeholder"\ntype_template: {numerical: " x"}\n', "question_template"),
    ('name: x\nquestion_template: "{Question}"\n', "type_template"),
    ('name: x\nquestion_template: "{Question}"\ntype_template: {numerical: 3}\n', "type_template.numerical"),
    ('name: x\nquestion_template: "{Question}"\ntype_template: {numerical: " x"}\nsytem: "typo"\n', "sytem"),
])
def test_bad_template_names_file_and_field(tmp_path, body, field):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(TemplateError) as e:
        load_template(p)
    assert str(p) in str(e.value) and f"field '{field}'" in str(e.value)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(TemplateError, match="invalid YAML"):
        load_template(p)
    with pytest.raises(TemplateError, match="does not exist"):
        load_template(tmp_path / "missing.yaml")
