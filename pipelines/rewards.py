"""Reward functions: pure scoring of completions, one registry, plugin loading.

What lives here and what does not
---------------------------------
* Here: the per-completion rewards R_i that Video-R1 sums (``accuracy`` + ``format``), the per-item scorer
  ``score_answer`` shared with CoT annotation filtering and evaluation, answer extraction, the reward registry
  (``@register``, ``get_reward_fn`` for ``pkg.mod:fn`` plugins) and ``compute_rewards`` (weighted sum + validation).
  Everything is a pure function of strings: no model, no tokenizer, no I/O.
* Not here: Video-R1's *group-level* bonuses, which need the whole rollout group and the rollout metadata, are
  added by the RL engine in ``pipelines/rl/advantages.py``:
    - the temporal bonus of T-GRPO (+alpha to correct ordered answers when p_ordered >= mu * p_shuffled), and
    - the length bonus (+omega to correct completions whose token length is in [l_min, l_max]).
  Both read the ``accuracy`` column this module returns ("correct" = accuracy > rl.correct_threshold), so keep
  ``accuracy`` in ``rl.rewards`` when they are on.

Batch reward functions
----------------------
Every reward has one signature: ``fn(completions: list[str], **columns) -> list[float]`` (one finite float per
completion). ``columns`` hold one list entry per completion: ``solution``, ``problem_type``, ``options``,
``data_type`` and, when known, ``completion_lengths`` (tokens), plus config-derived scalars ``mc_lenient`` and
``numerical_math_verify`` (see ``reward_kwargs``). Plugins must accept ``**kwargs`` and ignore what they do not use.
A completion may also be a TRL conversational completion (a list of messages); its last message's text is scored.

Deviations from Video-R1's ``grpo.py`` (each listed, with the original behaviour, in docs/rewards.md): the problem
type is read per completion (not from element 0); non-finite numbers never earn reward; regression with a gold of
0 is scored by absolute error; several disagreeing ``<answer>`` tags score 0; an empty prediction scores 0; a
solution without tags is its own answer; a free-form answer identical to the gold after ROUGE tokenisation scores 1.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from pipelines.errors import VideoR1Error

RewardFn = Callable[..., list[float]]

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
THINK_RE = re.compile(r"<think>\s*(.*?)\s*</think>", re.DOTALL)
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

# |gold| below this counts as a zero gold in regression: the relative error is undefined, absolute error is used.
REGRESSION_ZERO_EPS = 1e-6


class RewardError(VideoR1Error):
    """A reward that cannot be loaded or returned something unusable; names the reward."""


# --------------------------------------------------------------------------------------------------------------------
# Extraction
def extract_answer(text: str, fallback_whole: bool = False) -> str:
    """The first ``<answer>...</answer>`` content, stripped; "" when there is none.

    ``fallback_whole=True`` is Video-R1's evaluation rule (``eval_bench.py``): when the extracted answer is empty
    (no tags, or empty tags) the whole raw output is the prediction. Training never falls back.
    """
    m = ANSWER_RE.search(text)
    ans = m.group(1).strip() if m else ""
    if not ans and fallback_whole:
        return text
    return ans


def extract_answers(text: str) -> list[str]:
    """Every ``<answer>`` content of a completion, stripped, in order."""
    return [a.strip() for a in ANSWER_RE.findall(text)]


def extract_think(text: str) -> str:
    """The first ``<think>...</think>`` content, stripped; "" when there is none."""
    m = THINK_RE.search(text)
    return m.group(1).strip() if m else ""


def training_answer(text: str) -> str:
    """The answer a training completion commits to: "" when it has no tags or several that disagree.

    Video-R1 takes the first tag; a completion that writes ``<answer>A</answer> ... <answer>B</answer>`` could then
    hedge (the first is scored, the rest is free). Repeating the same answer is allowed.
    """
    answers = extract_answers(text)
    if not answers or len(set(answers)) > 1:
        return ""
    return answers[0]


def gold_answer(solution: str) -> str:
    """The gold answer of a record's ``solution``: the tag content, or the whole stripped string without tags."""
    if ANSWER_RE.search(solution):
        return extract_answer(solution)
    return solution.strip()


# --------------------------------------------------------------------------------------------------------------------
# Per-item scoring (already extracted strings)
_LENIENT_MC_RE = re.compile(r"^\(?([A-Za-z])\)?(?:[.):]\s*(.*))?$", re.DOTALL)
_MC_HEDGE_RE = re.compile(r"\bor\b|\band\b|[,;/&+|]", re.IGNORECASE)


def _norm_text(s: str) -> str:
    return " ".join(s.lower().split()).rstrip(".")


def _option_texts(options: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for opt in options or []:
        m = _LENIENT_MC_RE.match(opt.strip()) if isinstance(opt, str) else None
        if m and m.group(2) is not None:
            out[m.group(1).upper()] = _norm_text(m.group(2))
    return out


def mc_letter(answer: str, options: Sequence[str] | None = None) -> str | None:
    """The single option letter a lenient reader accepts, or None.

    Accepted: "B", "b", "B.", "(B)", "B)", "B:", and "B. text" / "B) text" where the text is option B's text when the
    options are known, or (without options) a text naming no other option letter and no "or"/"and"/list separator.
    Never "A or B", "A, B", "A/B", "AB".
    """
    s = answer.strip()
    m = _LENIENT_MC_RE.match(s)
    if not m:
        return None
    letter, rest = m.group(1).upper(), m.group(2)
    if rest is None or not rest.strip():
        return letter
    texts = _option_texts(options)
    if texts:
        return letter if texts.get(letter) == _norm_text(rest) else None
    if re.search(r"\b[A-Z]\b", rest) or _MC_HEDGE_RE.search(rest):
        return None
    return letter


def _score_mc(pred: str, gold: str, options: Sequence[str] | None, lenient: bool) -> float:
    if pred.strip() == gold.strip():
        return 1.0
    if not lenient:
        return 0.0
    p, g = mc_letter(pred, options), mc_letter(gold, options)
    return 1.0 if p is not None and p == g else 0.0


def _to_float(s: str) -> float | None:
    """Video-R1's normalize_number: drop commas, float(); None on failure. Non-finite values are returned as-is."""
    try:
        return float(s.replace(",", ""))
    except (ValueError, TypeError, OverflowError):
        return None


def _non_finite(s: str) -> bool:
    v = _to_float(s)
    return v is not None and not math.isfinite(v)


def _score_numerical_rule(pred: str, gold: str) -> float:
    gold_dec = "." in gold or "," in gold
    pred_dec = "." in pred or "," in pred
    if gold_dec != pred_dec:
        return 0.0
    g, p = _to_float(gold), _to_float(pred)
    if g is None or p is None or not math.isfinite(g) or not math.isfinite(p):
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


_NUMBER_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")
_MATH_GAP_RE = re.compile(r"^[\s+\-*/^(){}\[\]]*$")
_LATEX_OPS_RE = re.compile(r"\\(?:frac|dfrac|tfrac|sqrt|times|cdot|div|left|right|boxed)\b")


def _hedges_numbers(pred: str) -> bool:
    """True when a prediction lists several numbers ("3 or 4", "3, 4") rather than one expression ("1/2")."""
    nums = list(_NUMBER_RE.finditer(pred))
    for a, b in zip(nums, nums[1:]):
        gap = _LATEX_OPS_RE.sub("", pred[a.end():b.start()])
        if not _MATH_GAP_RE.match(gap):
            return True
    return False


def _score_numerical_math_verify(pred: str, gold: str) -> float:
    from math_verify import parse, verify

    if _hedges_numbers(pred):
        return 0.0
    # math_verify's timeouts use signal.alarm, which only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gp = parse(gold, parsing_timeout=timeout)
    pp = parse(pred, parsing_timeout=timeout)
    if not gp or not pp:
        return _score_numerical_rule(pred, gold)
    return 1.0 if verify(gp, pp, timeout_seconds=timeout) else 0.0


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance (unit costs) / max(1, #reference words); whitespace tokens, case-sensitive.

    Written out rather than taken from jiwer: Video-R1 defines WER exactly this way (its own DP in grpo.py), jiwer
    applies its own default transforms and divides by zero differently, and the DP is ten lines over short answers.
    """
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(1, len(ref))


@lru_cache(maxsize=1)
def _rouge():
    """(scorer, tokenizer), built once: RougeScorer construction loads the Porter stemmer."""
    from rouge_score import rouge_scorer, tokenizers

    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer), tokenizer


def rouge_mean(reference: str, hypothesis: str) -> float:
    """Mean of ROUGE-1/2/L F-measures (rouge_score, stemmer on, reference = gold), clipped to [0, 1].

    Deviation: when both sides tokenise to the same non-empty tokens the score is 1 (Video-R1 gives a one-word
    exact answer 2/3, since ROUGE-2 of a single token is 0).
    """
    scorer, tokenizer = _rouge()
    ref_tokens = tokenizer.tokenize(reference)
    if ref_tokens and ref_tokens == tokenizer.tokenize(hypothesis):
        return 1.0
    s = scorer.score(reference, hypothesis)
    mean = (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3
    return min(1.0, max(0.0, mean))


def _score_regression(pred: str, gold: str) -> float:
    g, p = _to_float(gold), _to_float(pred)
    if g is None or p is None or not math.isfinite(g) or not math.isfinite(p):
        return 0.0
    if abs(g) < REGRESSION_ZERO_EPS:
        # Video-R1: (|p - 0| + 1e-9) / (0 + 1e-9) >= 1 -> reward 0 even for p == 0. Absolute error in units of 1.
        err = abs(p - g)
    else:
        err = (abs(p - g) + 1e-9) / (abs(g) + 1e-9)
    return 1.0 - min(1.0, max(0.0, err))


def score_answer(
    prediction: str,
    gold: str,
    problem_type: str,
    *,
    options: Sequence[str] | None = None,
    mc_lenient: bool = False,
    numerical_math_verify: bool = False,
) -> float:
    """Accuracy of one already-extracted prediction against the extracted gold, in [0, 1] (Video-R1 §4).

    multiple choice: exact after strip (case-sensitive); ``mc_lenient`` also accepts "b", "B.", "(B)", "B. text".
    numerical: 0 if exactly one side contains '.' or ','; else commas dropped, float(), equal after round(., 2).
    ``numerical_math_verify``: math_verify parse/verify (rule on parse failure; lists of numbers score 0).
    OCR: 1 - WER clipped. free-form: mean ROUGE-1/2/L F. regression: 1 - clip(|p-g|/|g|) (absolute error at g=0).
    Unknown type, empty prediction, empty gold, non-finite numbers, any exception: 0.
    """
    try:
        if not isinstance(prediction, str) or not isinstance(gold, str):
            return 0.0
        pred, gt = prediction.strip(), gold.strip()
        if not pred or not gt:
            return 0.0
        if problem_type == "multiple choice":
            return _score_mc(pred, gt, options, mc_lenient)
        if problem_type == "numerical":
            if _non_finite(pred) or _non_finite(gt):
                return 0.0
            if numerical_math_verify:
                return _score_numerical_math_verify(pred, gt)
            return _score_numerical_rule(pred, gt)
        if problem_type == "OCR":
            return min(1.0, max(0.0, 1.0 - word_error_rate(gt, pred)))
        if problem_type == "free-form":
            return rouge_mean(gt, pred)
        if problem_type == "regression":
            return _score_regression(pred, gt)
        return 0.0
    except Exception:  # noqa: BLE001 - Video-R1: any exception scores 0
        return 0.0


# --------------------------------------------------------------------------------------------------------------------
# Registry
REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a built-in batch reward under ``name`` (usable in ``rl.rewards``)."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        fn.reward_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or the last message's text of a TRL conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        completion = completion[-1]
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
        if isinstance(content, list):
            return "".join(c.get("text", "") for c in content if isinstance(c, Mapping))
        return str(content)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _column(columns: Mapping[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    value = columns.get(name)
    if value is None:
        return [default] * n
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"column '{name}' has {len(value)} entries for {n} completions")
    return value


@register("accuracy")
def accuracy_reward(completions: list[Any], **columns: Any) -> list[float]:
    """Video-R1's accuracy reward per completion: ``score_answer`` of the committed answer against the gold.

    No ``<answer>`` tag, or several that disagree -> 0 (training never falls back to the raw text).
    """
    n = len(completions)
    solutions = _column(columns, "solution", n)
    types = _column(columns, "problem_type", n)
    options = _column(columns, "options", n)
    lenient = bool(columns.get("mc_lenient", False))
    use_mv = bool(columns.get("numerical_math_verify", False))
    out = []
    for completion, solution, ptype, opts in zip(completions, solutions, types, options):
        try:
            pred = training_answer(completion_text(completion))
            gold = gold_answer(solution) if isinstance(solution, str) else ""
        except Exception:  # noqa: BLE001
            out.append(0.0)
            continue
        out.append(score_answer(pred, gold, ptype, options=opts, mc_lenient=lenient, numerical_math_verify=use_mv))
    return out


@register("format")
def format_reward(completions: list[Any], **columns: Any) -> list[float]:
    """1.0 iff the whole completion is ``<think>...</think>`` + optional whitespace + ``<answer>...</answer>``.

    Video-R1 applies it to text decoded with special tokens skipped; the caller decodes.
    """
    out = []
    for c in completions:
        try:
            out.append(1.0 if FORMAT_RE.fullmatch(completion_text(c)) else 0.0)
        except TypeError:
            out.append(0.0)
    return out


def list_rewards() -> list[str]:
    return sorted(REWARDS)


def get_reward_fn(name: str) -> RewardFn:
    """A built-in reward by name, or a plugin ``"package.module:function"`` (imported on demand)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise RewardError(f"unknown reward '{name}'",
                          hint=f"built-in rewards: {', '.join(list_rewards())}; or a plugin as 'package.module:function'")
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward plugin '{name}' must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward plugin '{name}': cannot import module '{module_name}': {e}",
                          hint="install the package or put its directory on PYTHONPATH") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward plugin '{name}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward plugin '{name}': '{attr}' is a {type(obj).__name__}, not a function")
    return obj


def reward_kwargs(rl_config: Any) -> dict[str, Any]:
    """The config-derived keyword arguments every reward function receives (from ``cfg.rl``)."""
    return {"mc_lenient": bool(rl_config.mc_lenient), "numerical_math_verify": bool(rl_config.numerical_math_verify)}


def _check_output(name: str, values: Any, n: int) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward '{name}' returned {type(values).__name__}, expected a list of floats") from None
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward '{name}' returned {v!r} (a {type(v).__name__}) for completion {i}, "
                              "expected a float") from None
        if not math.isfinite(f):
            raise RewardError(f"reward '{name}' returned a non-finite value {f} for completion {i}")
        out.append(f)
    return out


def compute_rewards(
    names: Sequence[str],
    completions: list[Any],
    weights: Sequence[float] | None = None,
    **columns: Any,
) -> tuple[list[float], dict[str, list[float]]]:
    """Run every named reward; returns (weighted total per completion, {name: values}).

    Each reward must return one finite float per completion; anything else raises RewardError naming it.
    """
    names = list(names)
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise RewardError(f"reward '{dup}' is listed twice in rl.rewards")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise RewardError(f"{len(weights)} reward weights for {len(names)} rewards ({', '.join(names)})")
    n = len(completions)
    per: dict[str, list[float]] = {}
    total = [0.0] * n
    for name, w in zip(names, weights):
        fn = get_reward_fn(name)
        values = _check_output(name, fn(completions, **columns), n)
        per[name] = values
        total = [t + float(w) * v for t, v in zip(total, values)]
    return total, per


__all__ = [
    "REWARDS", "RewardError", "accuracy_reward", "completion_text", "compute_rewards", "extract_answer",
    "extract_answers", "extract_think", "format_reward", "get_reward_fn", "gold_answer", "list_rewards", "mc_letter",
    "register", "reward_kwargs", "rouge_mean", "score_answer", "training_answer", "word_error_rate",
]
