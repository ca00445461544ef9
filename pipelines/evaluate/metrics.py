"""Evaluation metrics: pure functions of strings and numbers (no model, no I/O), unit-tested by hand.

Two scoring modes are always computed side by side (docs/eval.md):

``video-r1``  what the paper's numbers mean (Video-R1 ``src/eval_bench.py``): the prediction is the first
              ``<answer>`` content or, when it is empty, the whole output; multiple choice is exact string equality
              after strip; numerical is the decimal-agreement + round(., 2) rule; regression is MRA with a *strict*
              ``<`` in float32 with rel = |y^-y| / (|y| + 1e-8); OCR and free-form score 0. A file is summarised as
              ``mean_acc`` (non-regression items), ``mean_mra`` (regression items), their average (the VSI number)
              and the micro mean over all items.
``official``  each benchmark's own convention where it differs (VSI-Bench first-token MC + MRA with ``<=`` + macro
              over 8 tasks, Video-MME's prefix-stripping letter extraction, MVBench first-token per task, ...). The
              per-benchmark choices live in ``pipelines.evaluate.benchmarks``; the building blocks are here.

Per-sample scores are in [0, 1]; summaries (``summarise_*``) are in percent, like the paper's tables. A sample whose
media could not be read (``error`` set) scores 0 in every mode and stays in every denominator.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)

# --------------------------------------------------------------------------------------------------------------------
# Extraction


def answer_text(output: str) -> str:
    """Video-R1's eval prediction: the first ``<answer>`` content, stripped; the whole output when that is empty."""
    if not isinstance(output, str):
        return ""
    m = ANSWER_RE.search(output)
    ans = m.group(1).strip() if m else ""
    return ans if ans else output


def gold_text(solution: str) -> str:
    """The gold answer of a record's ``solution`` (``<answer>B</answer>`` -> ``B``; untagged: the stripped string)."""
    if not isinstance(solution, str):
        return ""
    m = ANSWER_RE.search(solution)
    return m.group(1).strip() if m else solution.strip()


def to_float(s: Any) -> float | None:
    """Video-R1's normalize_number: commas dropped, float(); None on failure or a non-finite value."""
    try:
        v = float(str(s).replace(",", ""))
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def first_token(text: str) -> str:
    """VSI-Bench's fuzzy_matching: the first whitespace token, trailing "." stripped."""
    parts = str(text).strip().split()
    return parts[0].rstrip(".").strip() if parts else ""


# --------------------------------------------------------------------------------------------------------------------
# MRA
MRA_START, MRA_END, MRA_STEP = 0.5, 0.95, 0.05
# Video-R1: torch.arange(0.5, 0.95 + 0.025, 0.05, dtype=float32) -> 10 thresholds (float32 values).
_THRESH_F32 = np.array([MRA_START + i * MRA_STEP for i in range(10)], dtype=np.float32)  # == torch's values
# VSI-Bench: np.linspace(.5, .95, int((.95 - .5) / .05 + 2)) -> int(10.000000000000002) = 10 thresholds (float64).
_THRESH_F64 = np.linspace(MRA_START, MRA_END, int((MRA_END - MRA_START) / MRA_STEP + 2))
MRA_THRESHOLDS = tuple(float(t) for t in _THRESH_F64)


def mra_video_r1(pred: float, gold: float) -> float:
    """Video-R1's MRA: float32, rel = |p-g| / (|g| + 1e-8), mean over 10 thresholds of ``rel < 1 - theta`` (strict).

    Exact boundaries score lower than the official ``<=``: (3, 2) -> 0.0, (5, 4) -> 0.5, (1.1, 1) -> 0.8.
    """
    p, g = np.float32(pred), np.float32(gold)
    rel = np.abs(p - g) / (np.abs(g) + np.float32(1e-8))
    return float(np.mean(rel < (np.float32(1.0) - _THRESH_F32)))


def mra_official(pred: float, gold: float) -> float:
    """VSI-Bench's MRA: float64, rel = |(p-g)/g| (|p-g| when g = 0), mean over 10 thresholds of ``rel <= 1 - theta``.

    (3, 2) -> 0.1, (5, 4) -> 0.6, (1.1, 1) -> 0.9.
    """
    p, g = float(pred), float(gold)
    rel = abs(p - g) if g == 0.0 else abs((p - g) / g)
    return float(np.mean(rel <= 1 - _THRESH_F64))


# --------------------------------------------------------------------------------------------------------------------
# Video-R1 scoring (eval_bench.py reward_fn)


def numerical_rule(pred: str, gold: str) -> float:
    """Video-R1's numerical rule: both or neither contain '.'/','; then round(float, 2) equal."""
    if ("." in gold or "," in gold) != ("." in pred or "," in pred):
        return 0.0
    g, p = to_float(gold), to_float(pred)
    if g is None or p is None:
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


def score_video_r1(output: str, solution: str, problem_type: str) -> tuple[str, float]:
    """(prediction, score) of one output under Video-R1's evaluation rules."""
    pred = answer_text(output)
    gold = gold_text(solution)
    try:
        if problem_type == "multiple choice":
            return pred, 1.0 if pred.strip() == gold.strip() else 0.0
        if problem_type == "numerical":
            return pred, numerical_rule(pred, gold)
        if problem_type == "regression":
            g, p = to_float(gold), to_float(pred)
            if g is None or p is None:
                return pred, 0.0
            return pred, mra_video_r1(p, g)
        return pred, 0.0  # OCR, free-form: 0 at eval in Video-R1
    except Exception:  # noqa: BLE001 - Video-R1: any exception scores 0
        return pred, 0.0


# --------------------------------------------------------------------------------------------------------------------
# Official building blocks

LETTERS = "ABCDEFGHIJ"


def option_letters(options: Sequence[str] | None, default: str = "ABCD") -> str:
    """The letters the options use ("A. red" -> A), or `default` when there are none."""
    out = []
    for o in options or []:
        m = re.match(r"^\s*\(?([A-Z])[.):]", str(o))
        if m:
            out.append(m.group(1))
    return "".join(out) or default


def _option_text(options: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for o in options or []:
        m = re.match(r"^\s*\(?([A-Z])[.):]\s*(.*)$", str(o), re.DOTALL)
        if m:
            out[m.group(1)] = " ".join(m.group(2).lower().split()).rstrip(".")
    return out


def vsi_mc_correct(pred: str, gold: str) -> float:
    """VSI-Bench MCA: first whitespace token, trailing '.' stripped, case-insensitive equality with the gold letter."""
    return 1.0 if first_token(pred).lower() == gold.strip().lower() and gold.strip() else 0.0


def vsi_na_score(pred: str, gold: str) -> float:
    """VSI-Bench NA: float(first token) vs the gold, MRA with ``<=``; 0 when either does not parse."""
    g, p = to_float(gold), to_float(first_token(pred))
    if g is None or p is None:
        return 0.0
    return mra_official(p, g)


def first_token_letter(pred: str) -> str | None:
    """MVBench's check: the first token of the answer with '(', ')' and '.' removed, upper-cased, if a letter."""
    tok = str(pred).strip().split()
    if not tok:
        return None
    t = tok[0].strip("().:,").upper()
    return t if len(t) == 1 and t in LETTERS else None


def rule_mc_letter(pred: str, options: Sequence[str] | None = None) -> str | None:
    """TempCompass/lmms-eval rules (no LLM judge): a bare letter, a prefix "A." / "A)" / "(A)", or an option's text."""
    s = str(pred).strip()
    letters = option_letters(options, LETTERS)
    if len(s) == 1 and s.upper() in letters:
        return s.upper()
    m = re.match(r"^\(([A-Za-z])\)|^([A-Za-z])[.):](?:\s|$)", s)
    if m:
        letter = (m.group(1) or m.group(2)).upper()
        if letter in letters:
            return letter
    norm = " ".join(s.lower().split()).rstrip(".")
    for letter, text in _option_text(options).items():
        if text and norm == text:
            return letter
    # MMVU's CoT prompt ends with "Therefore, the final answer is: $LETTER".
    m = re.search(r"(?:final answer|answer) is:?\s*\(?([A-Za-z])\)?(?:[.\s]|$)", s, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


_VIDEOMME_PREFIXES = (
    "The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
    "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:",
)


def videomme_letter(text: str) -> str | None:
    """Video-MME's extraction: strip answer prefixes; > 10 words with no A-D -> invalid (None); else first A-D."""
    s = str(text).strip()
    for prefix in _VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return None
    m = re.search("[ABCD]", s)
    return m.group(0) if m else None


def mmmu_mc_letter(text: str, options: Sequence[str] | None = None) -> str | None:
    """MMMU-style parse (VideoMMMU): '(X)' or a standalone 'X' among the option letters, else an option's text;
    with several candidates the last mentioned wins."""
    letters = option_letters(options, LETTERS)
    s = " " + str(text).strip().strip(".,!?;:'\"") + " "
    cands: list[tuple[int, str]] = []
    for letter in letters:
        for pat in (f"({letter})", f" {letter} ", f" {letter}.", f" {letter},", f" {letter})", f" {letter}:"):
            i = s.rfind(pat)
            if i >= 0:
                cands.append((i, letter))
    if not cands:
        low = s.lower()
        for letter, opt in _option_text(options).items():
            i = low.rfind(opt) if opt else -1
            if i >= 0:
                cands.append((i, letter))
    if not cands:
        return None
    return max(cands)[1]


_NUM_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def open_answer_correct(pred: str, gold: str) -> float:
    """MMMU-style open answer: a number in the prediction equal to the gold number (2 decimals), or the normalised gold
    a substring of the normalised prediction."""
    g = to_float(gold)
    if g is not None:
        for m in _NUM_RE.finditer(str(pred)):
            p = to_float(m.group(0))
            if p is not None and round(p, 2) == round(g, 2):
                return 1.0
        return 0.0
    gn, pn = " ".join(gold.lower().split()), " ".join(str(pred).lower().split())
    return 1.0 if gn and gn in pn else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Aggregation (percent)


def pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 4)


def mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def group_scores(rows: Sequence[Mapping[str, Any]], key: str | Callable[[Mapping[str, Any]], Any],
                 score: str) -> dict[str, dict[str, Any]]:
    """{group: {"n", "score" (percent), "errors"}} of rows grouped by a field (or a function); rows without it are
    grouped under "-"."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        g = key(r) if callable(key) else r.get(key)
        groups["-" if g in (None, "") else str(g)].append(r)
    return {g: {"n": len(rs), "score": pct(mean(float(r.get(score) or 0.0) for r in rs)),
                "errors": sum(1 for r in rs if r.get("error"))} for g, rs in sorted(groups.items())}


def summarise_video_r1(rows: Sequence[Mapping[str, Any]], score: str = "score") -> dict[str, Any]:
    """Video-R1's file summary: mean_acc over non-regression items, mean_mra over regression items, their average
    (the VSI-Bench number per Video-R1 #121) and the micro mean over all items (Spatial-MLLM's mean_all)."""
    acc = [float(r.get(score) or 0.0) for r in rows if r.get("problem_type") != "regression"]
    mra = [float(r.get(score) or 0.0) for r in rows if r.get("problem_type") == "regression"]
    allv = acc + mra
    mean_acc, mean_mra = mean(acc), mean(mra)
    both = [v for v in (mean_acc, mean_mra) if v is not None]
    return {
        "mean_acc": pct(mean_acc), "n_acc": len(acc),
        "mean_mra": pct(mean_mra), "n_mra": len(mra),
        "acc_mra_avg": pct(mean(both)),
        "micro": pct(mean(allv)), "n": len(allv),
    }


def vsi_task(question_type: Any) -> str | None:
    """VSI-Bench task of a question_type: the three object_rel_direction_{easy,medium,hard} levels are one task."""
    if not question_type:
        return None
    qt = str(question_type)
    return "object_rel_direction" if qt.startswith("object_rel_direction") else qt


def vsi_macro(rows: Sequence[Mapping[str, Any]], score: str = "official_score",
              key: str = "question_type") -> dict[str, Any]:
    """VSI-Bench's overall: mean per question_type, the rel_direction levels averaged (unweighted) into one task,
    then the unweighted mean over tasks (8 on the full benchmark), in percent."""
    per_qt = group_scores(rows, key, score)
    per_qt.pop("-", None)
    tasks: dict[str, list[float]] = defaultdict(list)
    for qt, v in per_qt.items():
        tasks[vsi_task(qt)].append(v["score"])
    task_scores = {t: round(sum(v) / len(v), 4) for t, v in sorted(tasks.items())}
    return {"overall": round(sum(task_scores.values()) / len(task_scores), 4) if task_scores else None,
            "tasks": task_scores, "by_question_type": per_qt}


def macro(groups: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Unweighted mean of group scores (percent), ignoring the '-' (no group) bucket."""
    vals = [g["score"] for k, g in groups.items() if k != "-" and g.get("score") is not None]
    return round(sum(vals) / len(vals), 4) if vals else None
