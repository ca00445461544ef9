"""One small entry per benchmark: where its file is, how the official convention scores an item and a file.

The ``video-r1`` mode is the same for every benchmark (``metrics.score_video_r1`` + ``metrics.summarise_video_r1``);
only its headline differs (VSI: (mean_acc + mean_mra) / 2 per Video-R1 #121; the synthetic world: the micro mean;
the others: mean_acc). The ``official`` mode is what each benchmark's own harness does where it differs, without
any LLM judge (MMVU and TempCompass fall back to their rule-based extraction; see docs/eval.md).

Every scorer takes a sample row (``output``, ``gold``, ``problem_type``, ``options`` and the carried keys such as
``question_type``) and returns ``(prediction, score in [0, 1])``; every summary takes the scored rows of one file and
returns percentages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipelines.evaluate import metrics as M

Row = Mapping[str, Any]

# Keys of an eval record carried into each sample row (when present) for breakdowns.
CARRIED_KEYS = ("question_type", "data_source", "duration", "domain", "sub_category", "task_type", "task", "dim",
                "dimension", "track", "category", "subject", "discipline")


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    files: tuple[str, ...]  # names looked up in a --data directory, first found wins
    official: Callable[[Row], tuple[str, float]]
    official_summary: Callable[[Sequence[Row]], dict[str, Any]]
    official_label: str
    video_r1_headline: str  # a key of metrics.summarise_video_r1: mean_acc | acc_mra_avg | micro
    group_keys: tuple[str, ...] = ("question_type",)  # the per-task breakdown uses the first key present
    paper_column: str | None = None
    aliases: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def group_key(self, rows: Sequence[Row]) -> str | None:
        for k in self.group_keys:
            if any(r.get(k) not in (None, "") for r in rows):
                return k
        return None


# --------------------------------------------------------------------------------------------------------------------
# Official per-item scorers


def _mc_or_open(extract: Callable[[str, Sequence[str] | None], str | None]) -> Callable[[Row], tuple[str, float]]:
    def score(row: Row) -> tuple[str, float]:
        ans = M.answer_text(row.get("output") or "")
        gold = row.get("gold") or ""
        if row.get("problem_type") == "multiple choice":
            letter = extract(ans, row.get("options"))
            return letter or "", 1.0 if letter is not None and letter == gold.strip().upper() else 0.0
        if row.get("problem_type") in ("numerical", "regression"):
            return ans, M.open_answer_correct(ans, gold)
        return ans, 0.0

    return score


def _vsi(row: Row) -> tuple[str, float]:
    ans = M.answer_text(row.get("output") or "")
    gold = row.get("gold") or ""
    if row.get("problem_type") == "multiple choice":
        return M.first_token(ans), M.vsi_mc_correct(ans, gold)
    return M.first_token(ans), M.vsi_na_score(ans, gold)


def _videomme(row: Row) -> tuple[str, float]:
    letter = M.videomme_letter(M.answer_text(row.get("output") or ""))
    gold = (row.get("gold") or "").strip().upper()
    return letter or "", 1.0 if letter is not None and letter == gold else 0.0


def _mvbench(row: Row) -> tuple[str, float]:
    letter = M.first_token_letter(M.answer_text(row.get("output") or ""))
    gold = (row.get("gold") or "").strip().strip("()").upper()
    return letter or "", 1.0 if letter is not None and letter == gold else 0.0


def _synthetic(row: Row) -> tuple[str, float]:
    """The synthetic world's own convention is the training accuracy reward (OCR: 1-WER, free-form: ROUGE)."""
    from pipelines.rewards import score_answer, training_answer

    pred = training_answer(row.get("output") or "")
    return pred, score_answer(pred, row.get("gold") or "", row.get("problem_type") or "",
                              options=row.get("options") or None)


# --------------------------------------------------------------------------------------------------------------------
# Official file summaries


def _micro(rows: Sequence[Row]) -> float | None:
    return M.pct(M.mean(float(r.get("official_score") or 0.0) for r in rows))


def _summary_micro(rows: Sequence[Row]) -> dict[str, Any]:
    return {"overall": _micro(rows), "micro": _micro(rows)}


def _summary_vsi(rows: Sequence[Row]) -> dict[str, Any]:
    if not any(r.get("question_type") for r in rows):
        return {"overall": _micro(rows), "micro": _micro(rows),
                "note": "no question_type in the file: overall is the micro mean, not VSI's task macro"}
    mac = M.vsi_macro(rows, "official_score", "question_type")
    untyped = [r for r in rows if not r.get("question_type")]
    out = {"overall": mac["overall"], "micro": _micro(rows), "tasks": mac["tasks"]}
    if untyped:
        out["note"] = f"{len(untyped)} item(s) without question_type are left out of the task macro"
    return out


def _summary_per_task(rows: Sequence[Row]) -> dict[str, Any]:
    key = next((k for k in ("question_type", "task", "task_type", "data_source")
                if any(r.get(k) for r in rows)), None)
    if key is None:
        return _summary_micro(rows)
    groups = M.group_scores(rows, key, "official_score")
    return {"overall": M.macro(groups), "micro": _micro(rows), "tasks": {k: v["score"] for k, v in groups.items()},
            "task_key": key}


def _summary_videomme(rows: Sequence[Row]) -> dict[str, Any]:
    out = _summary_micro(rows)
    for key in ("duration", "domain", "task_type"):
        if any(r.get(key) for r in rows):
            out[f"by_{key}"] = {k: v["score"] for k, v in M.group_scores(rows, key, "official_score").items()}
    return out


def _summary_synthetic(rows: Sequence[Row]) -> dict[str, Any]:
    return _summary_micro(rows)


# --------------------------------------------------------------------------------------------------------------------
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "vsi", "VSI-Bench", ("eval_vsibench.json", "eval_vsi.json", "eval_vsibench.jsonl"),
            _vsi, _summary_vsi, "macro over tasks (rel_direction levels merged), MRA <=",
            "acc_mra_avg", ("question_type",), "VSI", ("vsibench", "vsi-bench"),
            "MC: first token, '.' stripped, case-insensitive; NA: MRA with <= on the first token.",
        ),
        Benchmark(
            "videommmu", "VideoMMMU", ("eval_videommmu.json", "eval_videommmu.jsonl"),
            _mc_or_open(M.mmmu_mc_letter), _summary_micro, "accuracy over all items (MMMU-style parsing)",
            "mean_acc", ("question_type", "track", "category", "data_source"), "VideoMMMU", ("video-mmmu",),
            "MC: MMMU-style letter parse; open: number equal to 2 decimals or gold substring.",
        ),
        Benchmark(
            "mmvu", "MMVU (mc)", ("eval_mmvu.json", "eval_mmvu.jsonl"),
            _mc_or_open(M.rule_mc_letter), _summary_micro, "accuracy (rules; the official GPT-4o judge is not used)",
            "mean_acc", ("question_type", "discipline", "subject", "data_source"), "MMVU", (),
            "The official harness judges every answer with GPT-4o; here the rule-based MC extraction is used.",
        ),
        Benchmark(
            "mvbench", "MVBench", ("eval_mvbench.json", "eval_mvbench.jsonl"),
            _mvbench, _summary_per_task, "mean over tasks (first-token letter)",
            "mean_acc", ("question_type", "task", "task_type", "data_source"), "MVBench", (),
            "Video-R1 used unclipped videos (tulerfeng/Video-R1#94); every item counts (no lmms-eval "
            "answered-only denominator).",
        ),
        Benchmark(
            "tempcompass", "TempCompass", ("eval_tempcompass.json", "eval_tempcompass.jsonl"),
            _mc_or_open(M.rule_mc_letter), _summary_micro, "accuracy (rules; no ChatGPT fallback, unmatched = 0)",
            "mean_acc", ("question_type", "dim", "dimension", "task", "data_source"), "TempCompass", (),
        ),
        Benchmark(
            "videomme", "Video-MME (wo sub)", ("eval_videomme.json", "eval_videomme.jsonl"),
            _videomme, _summary_videomme, "accuracy (answer prefixes stripped; by duration when present)",
            "mean_acc", ("duration", "question_type", "task_type", "domain"), "VideoMME", ("video-mme",),
        ),
        Benchmark(
            "synthetic", "Synthetic world", ("test.json", "eval_synthetic.json"),
            _synthetic, _summary_synthetic, "training accuracy reward (OCR 1-WER, free-form ROUGE)",
            "micro", ("data_source",), None, ("synth",),
            "video-r1 mode scores OCR/free-form 0 like Video-R1's eval; official = the training reward.",
        ),
    ]
}


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower()
    for b in BENCHMARKS.values():
        if key == b.name or key in b.aliases:
            return b
    from pipelines.errors import VideoR1Error

    raise VideoR1Error(f"unknown benchmark '{name}'", hint=f"benchmarks: {', '.join(BENCHMARKS)}")


def list_benchmarks() -> list[str]:
    return list(BENCHMARKS)
