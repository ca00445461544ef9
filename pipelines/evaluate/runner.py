"""Run evaluations: batched generation, per-sample JSONL written as it goes, resume, data parallel, scoring.

Layout of an evaluation directory (``eval.output_dir``, default ``<run.output_dir>/eval/<model>-<protocol key>``)::

    protocol.json                 the settings that change outputs (+ their hash); checked on resume
    <bench>.part-<rank>.jsonl     rows a rank generated (appended + fsynced per batch)
    <bench>.samples.jsonl         merged rows of every rank, ordered by index (rank 0 writes it)
    <bench>.results.json          the scored summary of one benchmark
    results.json                  the summaries of the benchmarks of the last invocation, with config and model

The default directory is a function of the protocol (model, data, frames, pixels, template, sampling, backend, seed),
so the same command run again finds the rows it already wrote and only generates what is missing (lmms-eval keys its
cache the same way). Rank r of a world of w ranks generates records ``r::w`` of each file; a restart with another
world size still skips every finished index (rows are keyed by the record's index in the file).

Rows: ``{index, id, benchmark, problem_type, question_type?, data_source, options, output, prediction, solution,
gold, score, correct, official_prediction, official_score, official_correct, reward?, error?}``. ``score`` is the
``video-r1`` score, ``official_*`` the benchmark's own convention. A sample whose media or prompt cannot be built gets
``error`` and scores 0 in every mode; it counts in every denominator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.errors import VideoR1Error
from pipelines.evaluate import metrics as M
from pipelines.evaluate.benchmarks import CARRIED_KEYS, Benchmark, get_benchmark

RESULTS_SCHEMA = 1
PAPER_FILE = Path(__file__).with_name("paper_results.json")


class EvalError(VideoR1Error):
    """An evaluation that cannot run as asked (no data for a benchmark, a directory of another protocol...)."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs
@dataclass
class BenchInput:
    bench: Benchmark
    file: Path
    root: Path


def resolve_inputs(benches: Sequence[str], data: str | None, root: str | None) -> list[BenchInput]:
    """Map benchmark names to their eval files.

    ``data`` a directory: each benchmark's Video-R1 file name in it (``eval_vsibench.json`` ...; the synthetic
    world's ``test.json``); media resolve against ``root`` or that directory. ``data`` a file: exactly one benchmark.
    """
    names = [get_benchmark(b) for b in benches]
    if len({b.name for b in names}) != len(names):
        raise EvalError(f"a benchmark is named twice in --bench {','.join(benches)}")
    if not names:
        raise EvalError("no benchmark given", hint="--bench vsi,videomme,...")
    if data is None:
        raise EvalError("no eval data given",
                        hint="--data FILE (one benchmark) or --data DIR holding eval_<bench>.json files; "
                             "for the synthetic world: `videor1 data synth` then --data <world>/test.json")
    path = Path(data).expanduser()
    out = []
    if path.is_dir():
        for b in names:
            found = next((path / f for f in b.files if (path / f).is_file()), None)
            if found is None:
                raise EvalError(f"no file for benchmark '{b.name}' in {path}",
                                hint=f"expected one of: {', '.join(b.files)}")
            out.append(BenchInput(b, found.resolve(), Path(root).expanduser().resolve() if root else path.resolve()))
        return out
    if not path.is_file():
        raise EvalError(f"eval data not found: {path}", hint="--data FILE or a directory of eval_<bench>.json files")
    if len(names) > 1:
        raise EvalError(f"--data {path} is one file but {len(names)} benchmarks were asked for",
                        hint="give --data a directory holding eval_<bench>.json files, or one --bench")
    base = Path(root).expanduser().resolve() if root else path.resolve().parent
    return [BenchInput(names[0], path.resolve(), base)]


# VSI-Bench's question types (its 8 tasks, rel_direction in three levels): a record carrying one is a VSI record.
VSI_QUESTION_TYPES = frozenset({
    "object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
    "object_rel_distance", "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
    "route_planning", "obj_appearance_order"})


def recognised_benchmark(records: Sequence[dict[str, Any]]) -> str | None:
    """The benchmark a file's records unmistakably belong to, or None when they do not say: the synthetic world
    marks every record `data_source: synthetic/...`; VSI-Bench records carry its question types."""
    if not records:
        return None
    sources = [str(r.get("data_source") or "") for r in records]
    if all(s.startswith("synthetic/") for s in sources):
        return "synthetic"
    qtypes = {str(r.get("question_type") or "") for r in records} - {""}
    if qtypes and qtypes <= VSI_QUESTION_TYPES:
        return "vsi"
    return None


def check_format(bench_input: BenchInput, records: Sequence[dict[str, Any]]) -> None:
    """Refuse a file of another benchmark (scored by the wrong convention it would give a number that means
    nothing): e.g. the synthetic world's test.json given to --bench vsi."""
    found = recognised_benchmark(records)
    if found is not None and found != bench_input.bench.name:
        other = get_benchmark(found)
        said = ", ".join(f"{k} {records[0][k]!r}" for k in ("data_source", "question_type") if records[0].get(k))
        raise EvalError(f"{bench_input.file} holds {other.title} records (record 0: {said}), "
                        f"not {bench_input.bench.title}",
                        hint=f"evaluate it with --bench {other.name}, or give --bench {bench_input.bench.name} its "
                             f"own file ({', '.join(bench_input.bench.files)})")


# --------------------------------------------------------------------------------------------------------------------
# Protocol and directories
def protocol(cfg) -> dict[str, Any]:
    """The settings that change what a model outputs: what the default directory and resume are keyed on."""
    from pipelines.prompts import load_template

    model = cfg.model.name_or_path
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    tpl = asdict(load_template(cfg.prompt.template))
    tpl.pop("source", None)
    data = cfg.data.file
    if data and Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    return {
        "model": model, "revision": cfg.model.revision, "dtype": cfg.model.dtype,
        "data": data, "root": str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None,
        "video": cfg.video.model_dump(mode="json", exclude={"cache_dir", "backend"}),
        "image": cfg.image.model_dump(mode="json"),
        "template": tpl,
        "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, "max_new_tokens": cfg.eval.max_new_tokens,
        "backend": cfg.eval.backend, "seed": cfg.run.seed,
    }


def protocol_key(proto: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(name: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", str(name)) if p and p not in (".", "..")]
    tail = "-".join(parts[-2:]) if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tail)[:60]


def output_dir(cfg) -> Path:
    """``eval.output_dir`` or ``<run.output_dir>/eval/<model>-<protocol key>`` (stable across restarts)."""
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    proto = protocol(cfg)
    return Path(cfg.run.output_dir) / "eval" / f"{_slug(cfg.model.name_or_path)}-{protocol_key(proto)}"


def check_protocol(out: Path, proto: dict[str, Any]) -> None:
    """Write protocol.json, or refuse to mix rows of another protocol into an existing directory."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "protocol.json"
    key = protocol_key(proto)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("key") != key:
            changed = sorted(k for k in set(proto) | set(old.get("protocol", {}))
                             if proto.get(k) != old.get("protocol", {}).get(k))
            raise EvalError(f"{out} holds rows of another protocol (differs in: {', '.join(changed) or '?'})",
                            hint="leave eval.output_dir unset (each protocol gets its own directory) or point it "
                                 "to a new directory")
        return
    _atomic_write(path, json.dumps({"key": key, "protocol": proto}, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Sharding, JSONL
def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Deterministic shard of record indices: rank::world."""
    return list(range(rank, n, world))


def samples_path(out: Path, bench: str) -> Path:
    return Path(out) / f"{bench}.samples.jsonl"


def part_path(out: Path, bench: str, rank: int) -> Path:
    return Path(out) / f"{bench}.part-{rank}.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a process killed mid-write) is ignored."""
    rows = []
    if not Path(path).exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so appended rows start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def finished_rows(out: Path, bench: str) -> dict[int, dict[str, Any]]:
    """index -> row of every finished sample of a benchmark (merged file and every rank's part)."""
    done: dict[int, dict[str, Any]] = {}
    files = [samples_path(out, bench)] + sorted(Path(out).glob(f"{bench}.part-*.jsonl"))
    for f in files:
        for r in read_jsonl(f):
            if isinstance(r.get("index"), int):
                old = done.get(r["index"])
                if old is None or (old.get("error") and not r.get("error")):  # a retried error row: the new one
                    done[r["index"]] = r
    return done


def retry_needed(row: dict[str, Any] | None) -> bool:
    """A sample to (re)generate: never done, or done as an error row (unreadable media, a bad record, a failed
    generation): a rerun after fixing --root or the file retries those and keeps every finished row."""
    return row is None or bool(row.get("error"))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Rows and scoring
def base_row(bench: Benchmark, index: int, record: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": index,
        "id": record.get("problem_id"),
        "benchmark": bench.name,
        "problem_type": record.get("problem_type"),
        "data_type": record.get("data_type"),
        "path": record.get("path"),
        "options": list(record.get("options") or []),
        "solution": record.get("solution"),
        "gold": M.gold_text(record.get("solution") or ""),
    }
    for k in CARRIED_KEYS:
        if record.get(k) not in (None, ""):
            row[k] = record[k]
    return row


def score_row(bench: Benchmark, row: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute every score of a row from its output; errors score 0 everywhere."""
    row["gold"] = M.gold_text(row.get("solution") or "")
    if row.get("error"):
        row.update(prediction="", score=0.0, correct=False, official_prediction="", official_score=0.0,
                   official_correct=False)
        if bench.name == "synthetic":
            row["reward"] = 0.0
        return row
    pred, score = M.score_video_r1(row.get("output") or "", row.get("solution") or "", row.get("problem_type") or "")
    opred, oscore = bench.official(row)
    row.update(prediction=pred, score=float(score), correct=score == 1.0, official_prediction=opred,
               official_score=float(oscore), official_correct=oscore == 1.0)
    if bench.name == "synthetic":
        row["reward"] = float(oscore)  # the training accuracy reward (what `official` is for this world)
    return row


# --------------------------------------------------------------------------------------------------------------------
# Generation
def _rank_world() -> tuple[int, int]:
    try:
        from pipelines.launch import rank, world_size

        return int(rank()), int(world_size())
    except ImportError:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def sampling_for(cfg):
    from pipelines.generation import Sampling

    return Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                    n=1, seed=cfg.run.seed)


def build_backend(cfg, processor=None):
    """(backend, processor) for cfg.eval.backend: hf (transformers generate) or vllm (GPU, tensor parallel)."""
    from pipelines.models import load_processor

    if cfg.eval.backend == "vllm":  # the engine first: a family / dtype it cannot run is refused before loading
        from pipelines.generation.vllm import build_vllm_backend

        backend = build_vllm_backend(cfg, "eval")
        return backend, processor or load_processor(cfg.model.name_or_path, cfg.model.revision)
    processor = processor or load_processor(cfg.model.name_or_path, cfg.model.revision)
    from pipelines.generation.hf import HFBackend
    from pipelines.models import load_model

    model = load_model(cfg.model)
    return HFBackend(model, processor, batch_size=cfg.eval.batch_size), processor


def render_prompt(processor, record: dict[str, Any], template) -> str:
    from pipelines.prompts import build_messages

    messages = build_messages(record, template, mode="eval")
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_eval_records(file: Path, limit: int | None = None) -> list[dict[str, Any]]:
    from pipelines.records import json_columns, load_records, record_dict

    ds = load_records(file)
    jc = json_columns(ds)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [record_dict(ds[i], jc) for i in range(n)]


def generate_rows(
    cfg,
    bench_input: BenchInput,
    out: Path,
    backend,
    processor,
    *,
    rank: int = 0,
    world: int = 1,
    records: list[dict[str, Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    sampling=None,
) -> dict[str, int]:
    """Generate this rank's missing rows of one benchmark, appending each batch to its part file (fsync per batch).

    Returns {"todo", "generated", "skipped", "errors"}.
    """
    from pipelines.models import decode_media
    from pipelines.models.families import adapter_for
    from pipelines.prompts import load_template
    from pipelines.validate import check_record

    bench = bench_input.bench
    records = records if records is not None else load_eval_records(bench_input.file, cfg.eval.limit)
    done = finished_rows(out, bench.name)
    mine = shard_indices(len(records), rank, world)
    todo = [i for i in mine if retry_needed(done.get(i))]
    for i in mine:
        if i in done and done[i].get("id") != records[i].get("problem_id"):
            raise EvalError(f"{out}: row {i} of {bench.name} is for id {done[i].get('id')}, the file now has "
                            f"{records[i].get('problem_id')} there (the eval file changed)",
                            hint="evaluate into a new directory (eval.output_dir)")
    template = load_template(cfg.prompt.template)
    sampling = sampling or sampling_for(cfg)
    path = part_path(out, bench.name, rank)
    _repair_tail(path)
    stats = {"todo": len(todo), "generated": 0, "skipped": len(mine) - len(todo), "errors": 0}
    bs = max(1, cfg.eval.batch_size)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            rows, prompts, media, ok = [], [], [], []
            for i in chunk:
                row = base_row(bench, i, records[i])
                try:
                    check_record(records[i], bench_input.file, i)
                    prompt = render_prompt(processor, records[i], template)
                    m = decode_media(records[i], cfg, bench_input.root, factor=adapter_for(processor).factor)
                except VideoR1Error as e:  # MediaError, DataError: count it, never substitute another sample
                    row.update(output="", error=str(e))
                else:
                    prompts.append(prompt)
                    media.append(m)
                    ok.append(len(rows))
                rows.append(row)
            if prompts:
                outputs = _generate_safely(backend, prompts, media, sampling)
                for j, res in zip(ok, outputs):
                    if isinstance(res, str):
                        rows[j]["output"] = res
                    else:
                        rows[j].update(output="", error=f"generation failed: {res}")
            for row in rows:
                score_row(bench, row)
                stats["errors"] += bool(row.get("error"))
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
            stats["generated"] += len(rows)
            if progress:
                progress(len(rows))
    return stats


def _generate_safely(backend, prompts, media, sampling) -> list[str | BaseException]:
    """Texts of one batch; when the batch fails, each sample alone, so one bad sample cannot sink the others
    (Video-R1 marks the whole batch '<answer>error</answer>' instead)."""
    try:
        return [group[0].text for group in backend.generate(prompts, media, sampling)]
    except Exception:  # noqa: BLE001 - retried one by one below
        if len(prompts) == 1:
            import sys

            return [sys.exc_info()[1]]
    out: list[str | BaseException] = []
    for p, m in zip(prompts, media):
        try:
            out.append(backend.generate([p], [m], sampling)[0][0].text)
        except Exception as e:  # noqa: BLE001 - counted as an error row
            out.append(e)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Merge and summarise
def merge(out: Path, bench: str, n: int | None = None) -> list[dict[str, Any]]:
    """Merge the rank parts into ``<bench>.samples.jsonl`` (ordered, one row per index); removes the parts."""
    done = finished_rows(out, bench)
    rows = [done[i] for i in sorted(done) if n is None or i < n]
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    _atomic_write(samples_path(out, bench), text)
    for p in Path(out).glob(f"{bench}.part-*.jsonl"):
        p.unlink()
    return rows


def _mode_summary(bench: Benchmark, rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any]:
    score = "score" if mode == "video-r1" else "official_score"
    if mode == "video-r1":
        s = M.summarise_video_r1(rows, "score")
        out = {"overall": s[bench.video_r1_headline], "label": _VR1_LABELS[bench.video_r1_headline], **s}
    else:
        s = bench.official_summary(rows)
        out = {"label": bench.official_label, **s}
    out["by_problem_type"] = M.group_scores(rows, "problem_type", score)
    key = bench.group_key(rows)
    if key:
        out["group_key"] = key
        out["by_group"] = M.group_scores(rows, key, score)
    if bench.name == "synthetic":
        out["by_data_source"] = M.group_scores(rows, "data_source", score)
        out["by_order"] = M.group_scores(
            rows, lambda r: "order-dependent" if "order" in str(r.get("data_source") or "") else "other", score)
    return out


_VR1_LABELS = {
    "mean_acc": "mean_acc (Video-R1: accuracy over non-regression items)",
    "acc_mra_avg": "(mean_acc + mean_mra) / 2 (Video-R1 #121)",
    "micro": "micro mean over all items",
}


def summarise(bench: Benchmark, rows: Sequence[dict[str, Any]], file: str | None = None,
              world: dict[str, Any] | None = None) -> dict[str, Any]:
    errors = [r for r in rows if r.get("error")]
    res: dict[str, Any] = {
        "benchmark": bench.name, "title": bench.title, "file": file, "n": len(rows), "errors": len(errors),
        "error_ids": [r.get("id") for r in errors][:100],
        # what went wrong, per sample (the media path of an unreadable video is in its message)
        "error_examples": [{"id": r.get("id"), "error": str(r.get("error"))} for r in errors][:5],
        "video-r1": _mode_summary(bench, rows, "video-r1"),
        "official": _mode_summary(bench, rows, "official"),
    }
    if bench.name == "synthetic":
        res["reward"] = M.pct(M.mean(float(r.get("reward") or 0.0) for r in rows))
        if world:
            res["chance"] = {k: v.get("chance") for k, v in (world.get("chance") or {}).items()}
    res["chance_overall"], res["chance_label"] = chance_baseline(rows, res.get("chance"))
    if bench.notes:
        res["notes"] = bench.notes
    return res


def chance_baseline(rows: Sequence[dict[str, Any]], per_source: dict[str, Any] | None = None
                    ) -> tuple[float | None, str]:
    """What guessing scores on these rows, in percent, beside the model's score: the synthetic world's own chance
    level per data_source (world.json) when known, else a uniform guess among a multiple-choice item's options
    (other items count 0: a guess of a number or a text is almost never right)."""
    if not rows:
        return None, ""
    if per_source and all(per_source.get(r.get("data_source")) is not None for r in rows):
        return M.pct(M.mean(float(per_source[r["data_source"]]) for r in rows)), "chance (world.json, per data_source)"
    vals = [1.0 / len(r["options"]) if r.get("problem_type") == "multiple choice" and r.get("options") else 0.0
            for r in rows]
    return M.pct(M.mean(vals)), "chance (uniform guess on multiple choice, 0 elsewhere)"


def _world_manifest(file: Path) -> dict[str, Any] | None:
    w = Path(file).parent / "world.json"
    try:
        return json.loads(w.read_text()) if w.exists() else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Paper numbers
def load_paper() -> dict[str, Any]:
    return json.loads(PAPER_FILE.read_text())


def paper_model_for(model: str, explicit: str | None = None) -> str | None:
    """The paper row's model for a model path: explicit, else a name hint (Video-R1-7B, SFT, Qwen2.5-VL-7B)."""
    paper = load_paper()
    names = [m["model"] for m in paper["rows"]]
    if explicit:
        for n in names:
            if n.lower() == explicit.lower():
                return n
        raise EvalError(f"eval.paper_model '{explicit}' is not a row of the paper's table",
                        hint=f"rows: {', '.join(sorted(set(names)))}")
    low = str(model).lower()
    for hint in paper["hints"]:
        if all(h in low for h in hint["contains"]):
            return hint["model"]
    return None


def paper_row(model: str | None, frames: int | None) -> dict[str, Any] | None:
    if model is None:
        return None
    for row in load_paper()["rows"]:
        if row["model"] == model and row["frames"] == frames:
            return row
    return None


def attach_paper(results: dict[str, Any], model_name: str | None, frames: int | None) -> None:
    row = paper_row(model_name, frames)
    results["paper"] = {"model": model_name, "frames": frames, "found": row is not None,
                        "source": row.get("source") if row else None}
    for name, b in results["benchmarks"].items():
        bench = get_benchmark(name)
        if row is None or bench.paper_column is None or row["values"].get(bench.paper_column) is None:
            continue
        value = row["values"][bench.paper_column]
        ours = b["video-r1"]["overall"]
        b["paper"] = {"model": model_name, "frames": frames, "value": value,
                      "delta": None if ours is None else round(ours - value, 2)}


# --------------------------------------------------------------------------------------------------------------------
# Orchestration
@contextmanager
def eval_lock(out: Path):
    """Hold ``<out>/.eval.lock`` for the whole evaluation: a second identical eval (same output directory) refuses at
    once with one line instead of generating every sample again beside the first. The lock is an OS file lock
    (filelock), released when the holder exits or dies, so a killed eval never leaves a stale lock behind."""
    from filelock import FileLock, Timeout

    Path(out).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(out) / ".eval.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise EvalError(f"{out} is being evaluated by another process right now",
                        hint="wait for it to finish (rerunning then resumes and redoes nothing), or pass another "
                             "--out") from None
    try:
        yield
    finally:
        lock.release()


def _wait_for_ranks(out: Path, tag: str, world: int, rank: int, poll: float = 0.2) -> None:
    """A barrier through marker files: no process-group collective, so no collective timeout on long evals."""
    marks = Path(out) / ".ranks"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{tag}.{rank}").write_text(str(os.getpid()))
    if rank != 0:
        return
    while not all((marks / f"{tag}.{r}").exists() for r in range(world)):
        time.sleep(poll)
    for r in range(world):
        (marks / f"{tag}.{r}").unlink(missing_ok=True)


def evaluate(
    cfg,
    out: Path,
    *,
    backend=None,
    processor=None,
    run=None,
    progress_factory: Callable[[str, int], Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Generate (this rank's shard), then on rank 0 merge, score and write results.json; returns the results
    (None on other ranks)."""
    from pipelines.threads import apply_torch_threads

    apply_torch_threads(cfg)  # run.torch_threads, or this process's share of the cores
    rank, world = _rank_world()
    inputs = resolve_inputs(cfg.eval.bench, cfg.data.file, cfg.data.root)
    proto = protocol(cfg)
    check_protocol(out, proto)
    per_bench_records = {bi.bench.name: load_eval_records(bi.file, cfg.eval.limit) for bi in inputs}
    for bi in inputs:
        check_format(bi, per_bench_records[bi.bench.name])
    todo_of = {}
    for bi in inputs:
        done = finished_rows(out, bi.bench.name)
        n = len(per_bench_records[bi.bench.name])
        mine = shard_indices(n, rank, world)
        todo_of[bi.bench.name] = sum(1 for i in mine if retry_needed(done.get(i)))
        retry = sum(1 for i in mine if i in done and retry_needed(done[i]))
        if log and done and rank == 0:
            log(f"resuming {bi.bench.name}: {len(mine) - todo_of[bi.bench.name]} of {len(mine)} samples already done "
                f"in {out}, {todo_of[bi.bench.name]} to generate"
                + (f" (retrying {retry} error rows)" if retry else ""))
    stats: dict[str, dict[str, int]] = {}
    if any(todo_of.values()) and backend is None:
        backend, processor = build_backend(cfg, processor)
    t0 = time.perf_counter()
    for bi in inputs:
        recs = per_bench_records[bi.bench.name]
        todo = todo_of[bi.bench.name]
        bar = progress_factory(bi.bench.name, todo) if progress_factory and todo else None
        try:
            stats[bi.bench.name] = generate_rows(cfg, bi, out, backend, processor, rank=rank, world=world,
                                                 records=recs, progress=bar.advance if bar else None)
        finally:
            if bar:
                bar.close()
    gen_seconds = time.perf_counter() - t0
    tag = os.environ.get("VIDEOR1_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"
    if world > 1:
        _wait_for_ranks(out, tag, world, rank)
    if rank != 0:
        return None
    benches = {}
    for bi in inputs:
        rows = merge(out, bi.bench.name, len(per_bench_records[bi.bench.name]))
        benches[bi.bench.name] = finalize_bench(bi.bench, rows, out, str(bi.file), _world_manifest(bi.file))
    results = build_results(cfg, benches, proto, stats=stats, gen_seconds=round(gen_seconds, 3), world_size=world)
    write_results(out, results)
    check_errors(out, inputs, benches, cfg.data.max_skip_fraction)  # after writing: every sample row stays
    if run is not None:
        record_run(run, out, results)
    return results


def check_errors(out: Path, inputs, benches: dict[str, Any], max_fraction: float) -> None:
    """Raise DataError when a benchmark had no samples, or more than `max_fraction` of them are error rows (media
    unreadable, bad record, generation failed): a score over errors is not a result. The rows and results.json
    stay in `out`; a rerun retries only the error rows."""
    from pipelines.errors import DataError, check_skip_rate

    for bi in inputs:
        b = benches[bi.bench.name]
        rows = [r for r in read_jsonl(samples_path(out, bi.bench.name)) if r.get("error")][:1]
        example = f"id {rows[0].get('id')}: {rows[0]['error']}" if rows else ""
        try:
            check_skip_rate(b["errors"], b["n"], max_fraction, dataset_size=b["n"], file=str(bi.file),
                            example=example, what=f"{bi.bench.name} eval samples", final=True)
        except DataError as e:
            e.hint = (f"samples and results are kept in {out}; fix the cause and rerun the same command: it "
                      "retries the error rows and keeps the rest. To accept them: --set data.max_skip_fraction=1")
            raise


def finalize_bench(bench: Benchmark, rows: list[dict[str, Any]], out: Path, file: str | None,
                   world: dict[str, Any] | None = None) -> dict[str, Any]:
    res = summarise(bench, rows, file, world)
    _atomic_write(Path(out) / f"{bench.name}.results.json", json.dumps(res, indent=1, default=str) + "\n")
    return res


def build_results(cfg, benches: dict[str, Any], proto: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    results = {
        "schema": RESULTS_SCHEMA,
        "kind": "eval",
        "model": cfg.model.name_or_path if cfg is not None else None,
        "frames": (cfg.eval.frames or cfg.video.max_frames) if cfg is not None else None,
        "scoring": cfg.eval.scoring if cfg is not None else "video-r1",
        "backend": cfg.eval.backend if cfg is not None else None,
        "sampling": ({"temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                      "max_new_tokens": cfg.eval.max_new_tokens} if cfg is not None else None),
        "protocol_key": protocol_key(proto) if proto else None,
        "benchmarks": benches,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        **extra,
    }
    if cfg is not None and cfg.eval.compare == "paper":
        attach_paper(results, paper_model_for(cfg.model.name_or_path, getattr(cfg.eval, "paper_model", None)),
                     results["frames"])
    return results


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = Path(out) / "results.json"
    _atomic_write(path, json.dumps(results, indent=1, default=str) + "\n")
    return path


def headline(results: dict[str, Any], bench: str, mode: str | None = None) -> float | None:
    mode = mode or results.get("scoring") or "video-r1"
    return results["benchmarks"][bench][mode]["overall"]


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """Flat registry metrics: eval/<bench>/overall (headline mode), .../video-r1, .../official, per problem type."""
    out: dict[str, float] = {}
    mode = results.get("scoring") or "video-r1"
    for name, b in results["benchmarks"].items():
        out[f"eval/{name}/overall"] = b[mode]["overall"]
        for m in ("video-r1", "official"):
            out[f"eval/{name}/{m}"] = b[m]["overall"]
            for pt, v in b[m]["by_problem_type"].items():
                out[f"eval/{name}/{m}/{pt}"] = v["score"]
        out[f"eval/{name}/errors"] = b["errors"]
        out[f"eval/{name}/n"] = b["n"]
        if "paper" in b:
            out[f"eval/{name}/paper_delta"] = b["paper"]["delta"]
    return {k: v for k, v in out.items() if v is not None}


def record_run(run, out: Path, results: dict[str, Any]) -> None:
    run.log_metrics(0, metrics_of(results))
    for name in results["benchmarks"]:
        p = samples_path(out, name)
        if p.exists():
            run.log_artifact("eval-samples", p, meta={"benchmark": name})
    run.log_artifact("eval-results", Path(out) / "results.json",
                     meta={"benchmarks": list(results["benchmarks"]), "scoring": results.get("scoring")})


def rescore(path: str | Path, cfg=None) -> tuple[Path, dict[str, Any]]:
    """Recompute every score from existing sample rows (no model). ``path``: an eval directory or a
    ``<bench>.samples.jsonl``. Rewrites the samples file(s), ``<bench>.results.json`` and ``results.json``."""
    p = Path(path)
    if p.is_dir():
        out = p
        files = sorted(out.glob("*.samples.jsonl"))
        for part in sorted(out.glob("*.part-*.jsonl")):  # an unmerged run: merge what is there first
            name = part.name.split(".part-")[0]
            if samples_path(out, name) not in files:
                files.append(samples_path(out, name))
            merge(out, name)
    elif p.is_file():
        out, files = p.parent, [p]
    else:
        raise EvalError(f"nothing to rescore at {p}", hint="give an eval directory or a <bench>.samples.jsonl file")
    if not files:
        raise EvalError(f"no *.samples.jsonl in {out}", hint="run `videor1 eval` first")
    old = {}
    if (out / "results.json").exists():
        try:
            old = json.loads((out / "results.json").read_text())
        except ValueError:
            old = {}
    benches = {}
    for f in files:
        rows = read_jsonl(f)
        if not rows:
            continue
        bench = get_benchmark(rows[0].get("benchmark") or f.name.split(".")[0])
        rows = [score_row(bench, r) for r in rows]
        _atomic_write(f, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        old_file = (old.get("benchmarks", {}).get(bench.name) or {}).get("file")
        world = _world_manifest(Path(old_file)) if old_file else None
        benches[bench.name] = finalize_bench(bench, rows, out, old_file, world)
    if cfg is not None:
        results = build_results(cfg, benches, rescored=True)
    else:
        results = {k: v for k, v in old.items() if k != "benchmarks"} or {"schema": RESULTS_SCHEMA, "kind": "eval"}
        results["benchmarks"] = benches
        results["rescored"] = True
        if (old.get("paper") or {}).get("model"):
            attach_paper(results, old["paper"]["model"], old.get("frames"))
    write_results(out, results)
    return out, results


# --------------------------------------------------------------------------------------------------------------------
# Readers for other commands (runs compare)
def load_results(run_dir: str | Path) -> dict[str, Any]:
    """results.json of an eval run directory (or the file itself)."""
    p = Path(run_dir)
    f = p / "results.json" if p.is_dir() else p
    if not f.exists():
        raise EvalError(f"no results.json in {p}", hint="is this an eval run directory?")
    return json.loads(f.read_text())


def results_table_rows(results: dict[str, Any], mode: str | None = None) -> dict[str, float | None]:
    """{bench: overall} of one results.json in a scoring mode (default: the run's headline mode): what an
    eval-specific side-by-side view of several runs needs."""
    mode = mode or results.get("scoring") or "video-r1"
    return {name: b[mode]["overall"] for name, b in results.get("benchmarks", {}).items()}


def compare_results(runs: dict[str, dict[str, Any]], mode: str | None = None) -> dict[str, dict[str, float | None]]:
    """{bench: {run label: overall}} over several results.json dicts."""
    table: dict[str, dict[str, float | None]] = {}
    for label, res in runs.items():
        for bench, value in results_table_rows(res, mode).items():
            table.setdefault(bench, {})[label] = value
    return table
