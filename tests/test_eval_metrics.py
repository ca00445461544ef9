"""Evaluation metrics against hand-computed cases (anchors-eval.md §3 and §5)."""

from __future__ import annotations

import pytest

from pipelines.evaluate import metrics as M
from pipelines.evaluate.benchmarks import BENCHMARKS, get_benchmark
from pipelines.evaluate.runner import score_row, summarise


# -- MRA ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,gold,strict,official", [
    (3, 2, 0.0, 0.1),      # rel = 0.5 exactly: 0.5 < 0.5 fails, 0.5 <= 0.5 holds
    (5, 4, 0.5, 0.6),      # rel = 0.25: thresholds 1-θ = .5 .45 .4 .35 .3 (.25 only with <=)
    (1.1, 1, 0.8, 0.9),    # rel = 0.1
    (2, 2, 1.0, 1.0),
    (10, 2, 0.0, 0.0),
    (7, 10, 0.4, 0.5),     # rel 0.3: .5 .45 .4 .35 > .3 (4); <= adds 1-.7 (5)
])
def test_mra_vectors(pred, gold, strict, official):
    assert M.mra_video_r1(pred, gold) == pytest.approx(strict)
    assert M.mra_official(pred, gold) == pytest.approx(official)


def test_mra_thresholds_are_ten():
    assert len(M.MRA_THRESHOLDS) == 10
    assert M.MRA_THRESHOLDS[0] == pytest.approx(0.5) and M.MRA_THRESHOLDS[-1] == pytest.approx(0.95)


def test_mra_video_r1_matches_torch_float32():
    torch = pytest.importorskip("torch")

    def ref(p, t):  # Video-R1 eval_bench.py mean_relative_accuracy
        p, t = torch.tensor(p, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
        rel = torch.abs(p - t) / (torch.abs(t) + 1e-8)
        th = torch.arange(0.5, 0.95 + 0.05 / 2, 0.05, dtype=torch.float32)
        return (rel < (1 - th)).float().mean().item()

    for g in (1, 2, 3, 4, 5, 7, 10, 12, 20, 0.5, 1.5, 2.25):
        for k in range(0, 41):
            p = g * k / 20
            assert M.mra_video_r1(p, g) == pytest.approx(ref(p, g)), (p, g)


def test_mra_official_zero_gold_uses_absolute_error():
    assert M.mra_official(0, 0) == 1.0
    assert M.mra_official(0.32, 0) == pytest.approx(0.4)  # |0.32| <= .5 .45 .4 .35 -> 4 of 10


# -- Video-R1 scoring --------------------------------------------------------------------------------------------------
def test_video_r1_extraction_falls_back_to_whole_output():
    assert M.answer_text("<think>x</think><answer> B </answer>") == "B"
    assert M.answer_text("B") == "B"
    assert M.answer_text("<answer></answer>") == "<answer></answer>"


@pytest.mark.parametrize("output,gold,ptype,score", [
    ("<answer>B</answer>", "B", "multiple choice", 1.0),
    ("<answer>B.</answer>", "B", "multiple choice", 0.0),      # strict: "B." != "B"
    ("<answer>(B)</answer>", "B", "multiple choice", 0.0),
    ("<answer>b</answer>", "B", "multiple choice", 0.0),
    ("B", "B", "multiple choice", 1.0),                          # no tags: the whole output
    ("<answer>3</answer>", "3", "numerical", 1.0),
    ("<answer>3.0</answer>", "3", "numerical", 0.0),           # decimal agreement
    ("<answer>3.14159</answer>", "3.14", "numerical", 1.0),    # round 2
    ("<answer>1,000</answer>", "1000", "numerical", 0.0),      # ',' counts as a decimal mark
    ("<answer>x</answer>", "3", "numerical", 0.0),
    ("<answer>5</answer>", "4", "regression", 0.5),
    ("<answer>CAT</answer>", "CAT", "OCR", 0.0),               # OCR / free-form: 0 at eval
    ("<answer>a red square</answer>", "a red square", "free-form", 0.0),
])
def test_score_video_r1(output, gold, ptype, score):
    assert M.score_video_r1(output, f"<answer>{gold}</answer>", ptype)[1] == pytest.approx(score)


# -- Official building blocks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,gold,ok", [
    ("A", "A", 1.0), ("a", "A", 1.0), ("A.", "A", 1.0), ("A. The chair", "A", 1.0), ("(A)", "A", 0.0),
    ("B", "A", 0.0), ("", "A", 0.0),
])
def test_vsi_mc_lenient_vs_strict(pred, gold, ok):
    assert M.vsi_mc_correct(pred, gold) == ok
    # Video-R1's strict rule only takes the exact letter.
    assert M.score_video_r1(pred, f"<answer>{gold}</answer>", "multiple choice")[1] == float(pred == gold)


def test_vsi_na_first_token():
    assert M.vsi_na_score("3 meters", "2") == pytest.approx(0.1)
    assert M.vsi_na_score("2.", "2") == 1.0
    assert M.vsi_na_score("about 2", "2") == 0.0


@pytest.mark.parametrize("text,letter", [
    ("The best answer is B", "B"),
    ("The best answer is B.", "B"),
    ("Answer: (C) the cat", "C"),
    ("D", "D"),
    ("the person in the video is walking slowly towards the door and then sits down", None),  # 14 words, no A-D
    ("the man opens the door", None),  # short, but no A-D letter at all
])
def test_videomme_extraction(text, letter):
    assert M.videomme_letter(text) == letter


def test_videomme_twelve_words_without_letter_is_invalid():
    text = "one two three four five six seven eight nine ten eleven twelve"
    assert len(text.split()) == 12 and M.videomme_letter(text) is None


@pytest.mark.parametrize("pred,letter", [
    ("A", "A"), ("b", "B"), ("C.", "C"), ("(D)", "D"), ("A) red", "A"), ("red", "A"),
    ("Therefore, the final answer is: B", "B"), ("I think so", None),
])
def test_rule_mc_letter(pred, letter):
    assert M.rule_mc_letter(pred, ["A. red", "B. blue", "C. green", "D. yellow"]) == letter


def test_mvbench_first_token_and_mmmu():
    assert M.first_token_letter("(B) a dog") == "B"
    assert M.first_token_letter("B.") == "B"
    assert M.first_token_letter("Because") is None
    opts = ["A. 3", "B. 4", "C. 5"]
    assert M.mmmu_mc_letter("The answer is (B).", opts) == "B"
    assert M.mmmu_mc_letter("I first thought A but the answer is C", opts) == "C"
    assert M.open_answer_correct("it is about 3.50 m", "3.5") == 1.0
    assert M.open_answer_correct("4", "3.5") == 0.0


# -- Aggregation -------------------------------------------------------------------------------------------------------
def _row(qt, s, ptype="multiple choice", error=None):
    return {"question_type": qt, "official_score": s, "score": s, "problem_type": ptype, "error": error}


def test_vsi_macro_merges_rel_direction_levels():
    rows = (
        [_row("object_rel_direction_easy", 1.0)] * 2           # easy 1.0
        + [_row("object_rel_direction_medium", 0.0)] * 2       # medium 0.0
        + [_row("object_rel_direction_hard", 0.5)] * 4         # hard 0.5 -> task mean 0.5
        + [_row("object_counting", 1.0, "regression")] * 1     # 1.0
        + [_row("route_planning", 0.0)] * 3                    # 0.0
    )
    mac = M.vsi_macro(rows)
    assert mac["tasks"] == {"object_counting": 100.0, "object_rel_direction": 50.0, "route_planning": 0.0}
    assert mac["overall"] == pytest.approx(50.0)  # (100 + 50 + 0) / 3
    # micro over 12 items: (2 + 0 + 2 + 1 + 0) / 12
    micro = M.mean(r["official_score"] for r in rows)
    assert 100 * micro == pytest.approx(100 * 5 / 12)


def test_summarise_video_r1_acc_mra_and_micro():
    rows = [_row("a", 1.0), _row("a", 0.0), _row("a", 1.0), _row("n", 0.5, "regression")]
    s = M.summarise_video_r1(rows)
    assert s["mean_acc"] == pytest.approx(200 / 3)
    assert s["mean_mra"] == pytest.approx(50.0)
    assert s["acc_mra_avg"] == pytest.approx((200 / 3 + 50) / 2)
    assert s["micro"] == pytest.approx(62.5)


def test_errors_count_in_every_denominator():
    bench = get_benchmark("vsi")
    rows = [
        {"index": 0, "problem_type": "multiple choice", "solution": "<answer>A</answer>", "output": "<answer>A</answer>",
         "question_type": "route_planning"},
        {"index": 1, "problem_type": "multiple choice", "solution": "<answer>A</answer>", "output": "",
         "question_type": "route_planning", "error": "cannot read media x.mp4: missing"},
    ]
    rows = [score_row(bench, r) for r in rows]
    assert rows[1]["score"] == 0.0 and rows[1]["official_score"] == 0.0
    res = summarise(bench, rows)
    assert res["errors"] == 1 and res["n"] == 2
    assert res["video-r1"]["mean_acc"] == 50.0
    assert res["official"]["overall"] == 50.0
    assert res["video-r1"]["by_group"]["route_planning"]["errors"] == 1


def test_vsi_bench_end_to_end_scoring_both_modes():
    bench = get_benchmark("vsibench")
    rows = [
        {"problem_type": "regression", "solution": "<answer>2</answer>", "output": "<answer>3</answer>",
         "question_type": "object_counting"},
        {"problem_type": "multiple choice", "solution": "<answer>B</answer>", "output": "<answer>B.</answer>",
         "question_type": "object_rel_direction_easy"},
    ]
    rows = [score_row(bench, dict(r, index=i)) for i, r in enumerate(rows)]
    assert [r["score"] for r in rows] == [0.0, 0.0]
    assert [r["official_score"] for r in rows] == [pytest.approx(0.1), 1.0]
    res = summarise(bench, rows)
    assert res["video-r1"]["overall"] == 0.0
    assert res["official"]["overall"] == pytest.approx((10 + 100) / 2)


def test_mvbench_macro_over_tasks():
    bench = get_benchmark("mvbench")
    rows = [score_row(bench, {"index": i, "problem_type": "multiple choice", "solution": "<answer>A</answer>",
                              "output": out, "question_type": qt})
            for i, (qt, out) in enumerate([("t1", "A"), ("t1", "B"), ("t1", "(A) x"), ("t2", "A")])]
    res = summarise(bench, rows)
    assert res["official"]["tasks"] == {"t1": pytest.approx(200 / 3), "t2": 100.0}
    assert res["official"]["overall"] == pytest.approx((200 / 3 + 100) / 2)  # macro
    assert res["official"]["micro"] == pytest.approx(75.0)


def test_videomme_by_duration():
    bench = get_benchmark("videomme")
    rows = [score_row(bench, {"index": i, "problem_type": "multiple choice", "solution": f"<answer>{g}</answer>",
                              "output": out, "duration": d})
            for i, (g, out, d) in enumerate([("B", "The best answer is B", "short"), ("C", "A", "long")])]
    res = summarise(bench, rows)
    assert res["official"]["by_duration"] == {"long": 0.0, "short": 100.0}


def test_synthetic_official_is_training_reward_and_scores_ocr():
    bench = get_benchmark("synthetic")
    row = score_row(bench, {"index": 0, "problem_type": "OCR", "solution": "<answer>CAT</answer>",
                            "output": "<think>t</think><answer>CAT</answer>", "data_source": "synthetic/ocr"})
    assert row["score"] == 0.0       # Video-R1 eval: OCR scores 0
    assert row["official_score"] == 1.0 and row["reward"] == 1.0


def test_every_benchmark_has_files_and_scorers():
    for b in BENCHMARKS.values():
        assert b.files and callable(b.official) and callable(b.official_summary)
        assert b.video_r1_headline in ("mean_acc", "acc_mra_avg", "micro")
