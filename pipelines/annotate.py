"""CoT annotation with a teacher (`videor1 annotate`): Video-R1's `generate_cot_vllm.py`, resumable and sharded.

For each input record the teacher (``annotate.model`` on vLLM or transformers) answers the record's prompt once
(paper: temperature 1.0, top_p 0.95, 512 new tokens). The output record is the input plus

    process  "<think>" + the teacher's extracted think + "</think>"   (Video-R1's construction, even when empty)
    answer   the teacher's extracted <answer>
    reward   score_answer(answer, gold_answer(solution), problem_type, options=...)   (Video-R1's accuracy, §4)
    select   reward > annotate.min_reward (0.6)
    teacher  annotate.model

or, when its media cannot be read or its fields are unusable, the input plus ``error`` (and ``select: false``).

Prompt: the template's *eval* wording (``build_messages(record, template, "eval")``: "between the <think> and
</think> tags"), which is what Video-R1's CoT script used (reference §3/§8); SFT then trains on the *train*
wording (``mode="sft"``), as Video-R1 did. No system message (the chat template inserts its default).

Files (PREFIX = annotate.output, default <run.output_dir>/annotate/<data stem>; shards insert .shard-I-of-N):

    PREFIX.jsonl       every record, appended per batch (flush + fsync): the resume log
    PREFIX.meta.json   input file, shard, teacher: a restart with other inputs into the same PREFIX is refused
    PREFIX.cot.json    on completion: the selected records in Video-R1-COT format (a JSON list, input order,
                       without answer/reward/select/teacher), what `videor1 train sft` reads

Resume is by problem_id: a restarted run skips every id already in PREFIX.jsonl; a torn last line (a kill during a
write) is cut off and that record redone. Sharding (``shard=(i, n)``) takes the records whose stable hash of
``str(problem_id)`` is i mod n, so shards are disjoint, cover the file, and do not depend on record order;
`merge` joins shard logs, checks that no input id is missing or duplicated, and writes the COT file.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipelines.errors import DataError, VideoR1Error

ANNOTATION_FIELDS = ("answer", "reward", "select", "teacher", "error")
_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
def shard_of(problem_id: Any, n: int) -> int:
    """Stable shard of a record: sha1(str(problem_id)) mod n (independent of record order and of Python's hash)."""
    if n <= 1:
        return 0
    return int(hashlib.sha1(str(problem_id).encode("utf-8")).hexdigest()[:15], 16) % n


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n; None/'' -> None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise VideoR1Error(f"--shard expects i/n with 0 <= i < n, got '{text}'", hint="e.g. --shard 0/8 ... --shard 7/8")
    return int(m.group(1)), int(m.group(2))


def shard_prefix(prefix: str | os.PathLike, shard: tuple[int, int] | None) -> str:
    prefix = str(prefix)
    if shard is None or shard[1] == 1:
        return prefix
    return f"{prefix}.shard-{shard[0]:05d}-of-{shard[1]:05d}"


def process_text(completion: str) -> str:
    from pipelines.rewards import extract_think

    return "<think>" + extract_think(completion) + "</think>"


def annotate_record(record: dict, completion: str, teacher: str, min_reward: float,
                    mc_lenient: bool = False, numerical_math_verify: bool = False) -> dict:
    """The output record for one teacher completion (see the module docstring)."""
    from pipelines.rewards import extract_answer, gold_answer, score_answer

    answer = extract_answer(completion)
    reward = score_answer(answer, gold_answer(record.get("solution", "")), record.get("problem_type", ""),
                          options=record.get("options") or None, mc_lenient=mc_lenient,
                          numerical_math_verify=numerical_math_verify)
    out = dict(record)
    out.update(process=process_text(completion), answer=answer, reward=float(reward),
               select=bool(reward > min_reward), teacher=teacher)
    return out


def cot_record(rec: dict) -> dict:
    """A selected record in Video-R1-COT form: annotation fields dropped, `process` placed before `solution`."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if k in ANNOTATION_FIELDS or k == "process":
            continue
        if k == "solution":
            out["process"] = rec["process"]
        out[k] = v
    out.setdefault("process", rec["process"])
    return out


def rid(rec: dict) -> str:
    return str(rec.get("problem_id"))


# ---------------------------------------------------------------------------------------------------------------------
# The append-only log
def read_log(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of an annotation JSONL. A torn last line (a kill during a write: not JSON) is dropped -- and cut from
    the file when ``repair``. A bad line before the last is an error (the file was edited or is not ours)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    lines = data.split(b"\n")
    out: list[dict] = []
    pos, cut = 0, None
    for k, line in enumerate(lines):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if all(not rest.strip() for rest in lines[k + 1:]):
                cut = start
                break
            raise DataError(f"line {k + 1} is not JSON", file=str(p),
                            hint="the annotation log was edited by hand; fix or delete that line") from None
    if repair:
        if cut is not None:
            with open(p, "r+b") as f:
                f.truncate(cut)
        elif data and not data.endswith(b"\n"):
            with open(p, "ab") as f:
                f.write(b"\n")
    return out


def _append(f, records: Iterable[dict]) -> None:
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# Summary
@dataclass
class Stats:
    total: int = 0
    kept: int = 0
    errors: int = 0
    empty_think: int = 0
    by: dict[str, dict[str, list[int]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0])))
    error_ids: list[str] = field(default_factory=list)

    def add(self, rec: dict) -> None:
        self.total += 1
        if rec.get("error"):
            self.errors += 1
            if len(self.error_ids) < 20:
                self.error_ids.append(rid(rec))
        kept = bool(rec.get("select")) and not rec.get("error")
        self.kept += kept
        if not rec.get("error") and rec.get("process") == "<think></think>":
            self.empty_think += 1
        for key in ("problem_type", "data_type", "data_source"):
            cell = self.by[key][str(rec.get(key, ""))]
            cell[0] += 1
            cell[1] += kept

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.total, "kept": self.kept, "kept_rate": self.kept / self.total if self.total else 0.0,
            "errors": self.errors, "error_ids": self.error_ids, "empty_think": self.empty_think,
            "by": {k: {name: {"n": c[0], "kept": c[1], "kept_rate": c[1] / c[0] if c[0] else 0.0}
                       for name, c in sorted(v.items())} for k, v in self.by.items()},
        }


def stats_of(records: Iterable[dict]) -> Stats:
    st = Stats()
    for r in records:
        st.add(r)
    return st


@dataclass
class AnnotateResult:
    prefix: str
    jsonl: Path
    cot: Path | None  # None when the shard is not complete (interrupted)
    stats: dict[str, Any]
    processed: int  # records annotated by this call (resume skips the rest)
    resumed: int  # records found already done
    seconds: float  # generation loop wall time of this call
    records_per_s: float
    tokens_per_s: float
    completion_tokens: int


# ---------------------------------------------------------------------------------------------------------------------
# Teacher
def default_prefix(cfg) -> str:
    stem = Path(cfg.data.file).stem if cfg.data.file else "records"
    return str(Path(cfg.run.output_dir) / "annotate" / stem)


def make_teacher(cfg, llm: Any = None, sampling_params_cls: Any = None):
    """(backend, processor) of the teacher in ``annotate``: hf (transformers, `model.*` dtype/device settings) or vllm.

    ``llm`` / ``sampling_params_cls`` inject a stand-in engine into the vLLM backend (tests)."""
    from pipelines.generation import make_backend
    from pipelines.models import load_model, load_processor

    a = cfg.annotate
    if a.backend == "hf":
        processor = load_processor(a.model)
        model = load_model(cfg.model.model_copy(update={"name_or_path": a.model, "revision": None}), for_training=False)
        return make_backend("hf", model=model, processor=processor, batch_size=a.batch_size), processor
    from pipelines.generation.vllm import build_vllm_backend

    backend = build_vllm_backend(cfg, "annotate", llm=llm, sampling_params_cls=sampling_params_cls)
    return backend, load_processor(a.model)


def _meta(cfg, shard: tuple[int, int] | None, n_expected: int) -> dict[str, Any]:
    return {"data": str(Path(cfg.data.file).resolve()), "max_samples": cfg.data.max_samples,
            "shard": list(shard) if shard else [0, 1], "teacher": cfg.annotate.model,
            "template": cfg.prompt.template, "expected": n_expected}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1) + "\n")
        return
    old = json.loads(path.read_text())
    diff = [k for k in ("data", "max_samples", "shard", "teacher", "template") if old.get(k) != meta.get(k)]
    if diff:
        raise VideoR1Error(
            f"{path}: an annotation with other settings is already there "
            f"({', '.join(f'{k}: {old.get(k)!r} vs {meta.get(k)!r}' for k in diff)})",
            hint="use another --out prefix, or delete the old .jsonl/.meta.json to start over",
        )


# ---------------------------------------------------------------------------------------------------------------------
def annotate(
    cfg,
    *,
    backend: Any,
    processor: Any,
    prefix: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
    run: Any = None,
    progress: Callable[[int, int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> AnnotateResult:
    """Annotate this shard of `cfg.data.file` into PREFIX(.shard-I-of-N).jsonl; write the COT file when complete."""
    import torch

    from pipelines.generation import Sampling
    from pipelines.models import decode_media
    from pipelines.models.families import adapter_for
    from pipelines.prompts import build_messages, load_template
    from pipelines.records import json_columns, load_records, record_dict
    from pipelines.validate import check_record

    if not cfg.data.file:
        raise DataError("no input records given", hint="pass --data FILE (Video-R1 JSON list or JSONL)")
    a = cfg.annotate
    base = str(prefix or a.output or default_prefix(cfg))
    sp = shard_prefix(base, shard)
    jsonl, meta_path, cot = Path(sp + ".jsonl"), Path(sp + ".meta.json"), Path(sp + ".cot.json")

    ds = load_records(cfg.data.file)
    jc = json_columns(ds)
    n_in = len(ds) if cfg.data.max_samples is None else min(len(ds), cfg.data.max_samples)
    ids = [str(x) for x in ds["problem_id"][:n_in]]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise DataError(f"{len(dup)} problem_id(s) occur more than once (e.g. {', '.join(dup[:5])})",
                        file=cfg.data.file, field="problem_id",
                        hint="annotation resumes and merges by problem_id; give every record a unique id")
    mine = [i for i, x in enumerate(ids) if shard is None or shard_of(x, shard[1]) == shard[0]]
    _check_meta(meta_path, _meta(cfg, shard, len(mine)))

    done_recs = read_log(jsonl, repair=True)
    done = {rid(r) for r in done_recs}
    todo = [i for i in mine if ids[i] not in done]
    resumed = len(mine) - len(todo)
    template = load_template(cfg.prompt.template)
    root = cfg.data_root()
    teacher = a.model
    rw = dict(mc_lenient=cfg.rl.mc_lenient, numerical_math_verify=cfg.rl.numerical_math_verify)
    total_done = resumed
    if progress:
        progress(total_done, len(mine))

    processed = tokens = 0
    gen_time = 0.0
    t_start = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), a.batch_size):
            idx = todo[b:b + a.batch_size]
            recs = [record_dict(ds[i], jc) for i in idx]
            out: list[dict | None] = [None] * len(recs)
            prompts, media, slots = [], [], []
            for j, rec in enumerate(recs):
                try:
                    check_record(rec, cfg.data.file, idx[j])
                    msgs = build_messages(rec, template, mode="eval")
                    m = decode_media(rec, cfg, root, factor=adapter_for(processor).factor)
                    prompts.append(processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
                    media.append(m)
                    slots.append(j)
                except VideoR1Error as e:
                    out[j] = {**rec, "error": str(e), "select": False, "teacher": teacher}
            sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, n=1,
                                seed=cfg.run.seed + idx[0])
            t0 = time.perf_counter()
            completions = _generate_isolating(backend, prompts, media, sampling)
            gen_time += time.perf_counter() - t0
            for j, comp in zip(slots, completions):
                if isinstance(comp, Exception):
                    out[j] = {**recs[j], "error": f"generation failed: {type(comp).__name__}: {comp}",
                              "select": False, "teacher": teacher}
                    continue
                tokens += len(comp.token_ids)
                out[j] = annotate_record(recs[j], comp.text, teacher, a.min_reward, **rw)
            _append(f, out)  # type: ignore[arg-type]
            for r in out:
                if r and r.get("error") and on_error:
                    on_error(rid(r), r["error"])
            processed += len(out)
            total_done += len(out)
            if progress:
                progress(total_done, len(mine))
            if run is not None:
                el = time.perf_counter() - t_start
                run.log_metrics(total_done, {"records": total_done, "records_per_s": processed / max(el, 1e-9),
                                             "tokens_per_s": tokens / max(el, 1e-9)})
    elapsed = time.perf_counter() - t_start
    all_recs = read_log(jsonl)
    stats = stats_of(all_recs)
    have = {rid(r) for r in all_recs}
    complete = all(ids[i] in have for i in mine)
    if complete and (stats.total or shard is None):
        _end_error_check(cfg, jsonl, all_recs, stats)  # before the COT file: a run of errors is no dataset
    cot_path = None
    if complete:
        order = {x: k for k, x in enumerate(ids)}
        write_cot(all_recs, cot, order)
        cot_path = cot
    return AnnotateResult(prefix=sp, jsonl=jsonl, cot=cot_path, stats=stats.as_dict(), processed=processed,
                          resumed=resumed, seconds=elapsed, records_per_s=processed / max(elapsed, 1e-9),
                          tokens_per_s=tokens / max(elapsed, 1e-9), completion_tokens=tokens)


def _end_error_check(cfg, jsonl: Path, records: Sequence[dict], stats: Stats) -> None:
    """data.max_skip_fraction judged on every record of this shard: records that could not be annotated (media
    unreadable, a bad record, generation failed) are counted; nothing or only errors is a failure, not an empty
    COT file. The annotations stay in PREFIX.jsonl."""
    from pipelines.errors import check_skip_rate

    first = next((r for r in records if r.get("error")), None)
    example = f"record {rid(first)}: {first['error']}" if first else ""
    try:
        check_skip_rate(stats.errors, stats.total, cfg.data.max_skip_fraction, dataset_size=stats.total,
                        file=str(cfg.data.file), example=example, what="records to annotate", final=True)
    except DataError as e:
        e.hint = (f"the annotations are kept in {jsonl}; error records count as done there: fix the cause and "
                  "annotate into a new --out, or accept them with --set data.max_skip_fraction=1")
        raise


def _generate_isolating(backend, prompts: Sequence[str], media: Sequence[Any], sampling) -> list[Any]:
    """backend.generate for the batch; if the batch fails, each prompt alone, so one bad sample fails alone."""
    if not prompts:
        return []
    try:
        return [g[0] for g in backend.generate(prompts, media, sampling)]
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - find the culprit below
        if len(prompts) == 1:
            import sys

            return [sys.exc_info()[1]]
    out: list[Any] = []
    for p, m in zip(prompts, media):
        try:
            out.append(backend.generate([p], [m], sampling)[0][0])
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the record's `error`
            out.append(e)
    return out


def write_cot(records: Iterable[dict], path: str | os.PathLike, order: dict[str, int] | None = None) -> int:
    """The selected, error-free records in Video-R1-COT form, in input order; returns the count."""
    from pipelines.records import write_records

    kept = [r for r in records if r.get("select") and not r.get("error")]
    if order is not None:
        kept.sort(key=lambda r: order.get(rid(r), 1 << 62))
    return write_records([cot_record(r) for r in kept], path, fmt="json")


# ---------------------------------------------------------------------------------------------------------------------
# Merge
@dataclass
class MergeResult:
    cot: Path
    files: list[Path]
    stats: dict[str, Any]
    kept: int


def device_groups(nproc: int, per_process: int, visible: Sequence[str]) -> list[list[str]]:
    """The GPUs of each of `nproc` shard processes on one node: consecutive groups of `per_process` (the vLLM
    tensor-parallel size) from the visible devices. No GPU visible (hf on the CPU): every group is empty."""
    if not visible:
        return [[] for _ in range(nproc)]
    need = nproc * per_process
    if len(visible) < need:
        raise VideoR1Error(
            f"annotate --nproc {nproc} with tensor_parallel_size {per_process} needs {need} GPUs, "
            f"{len(visible)} visible ({','.join(visible)})",
            hint="lower --nproc or --tp, or run shards on several nodes with --shard i/n",
        )
    return [list(visible[i * per_process:(i + 1) * per_process]) for i in range(nproc)]


class ShardProgress:
    """Records written so far by the n shard processes of PREFIX (complete JSONL lines): the parent's progress.
    Reads only the bytes appended since the last call, so polling stays cheap on a 260k-record log."""

    def __init__(self, prefix: str | os.PathLike, n: int):
        self.paths = [Path(shard_prefix(prefix, (i, n)) + ".jsonl") for i in range(n)]
        self.offsets = [0] * n
        self.lines = 0

    def count(self) -> int:
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[i])
                    chunk = f.read()
            except FileNotFoundError:
                continue
            self.offsets[i] += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


def visible_gpus() -> list[str]:
    """The GPU ids shard processes may be given: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA runtime: the shards run on the CPU
        return []


def run_shard_processes(config_file: str | os.PathLike, prefix: str | os.PathLike, groups: Sequence[Sequence[str]],
                        log_dir: str | os.PathLike, on_poll: Callable[[int], None] | None = None
                        ) -> tuple[list[Path], list[Path]]:
    """`annotate --config FILE --shard i/n` as n processes on this node, shard i on the GPUs `groups[i]` (none: the
    CPU, cores shared out). `on_poll(records written so far)` every half second until all have exited; on an
    interrupt or error none is left running. Raises VideoR1Error naming every failed shard and the tail of the first
    one's log; returns (the shard JSONL paths for the merge, the shard logs), in shard order."""
    import subprocess
    import sys

    from pipelines.launch import APP_MODULE

    n = len(groups)
    counter = ShardProgress(prefix, n)
    procs: list[subprocess.Popen] = []
    logs = [Path(log_dir) / f"shard-{i}-of-{n}.log" for i in range(n)]
    try:
        for i, gpus in enumerate(groups):
            env = dict(os.environ, VIDEOR1_QUIET="1")
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            else:  # CPU: share the cores instead of oversubscribing them
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", APP_MODULE, "annotate", "--config", str(config_file), "--shard", f"{i}/{n}"],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            if on_poll is not None:
                on_poll(counter.count())
            time.sleep(0.5)
    finally:
        for p in procs:  # interrupted (Ctrl-C) or a launch error: never leave shard processes behind
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        first = logs[failed[0][0]]
        tail = first.read_text(errors="replace").strip().splitlines()[-3:] if first.exists() else []
        raise VideoR1Error(
            f"annotate shard(s) {', '.join(f'{i}/{n} (exit {c})' for i, c in failed)} failed; "
            f"log of shard {failed[0][0]}: {first}: {' | '.join(tail)}",
            hint="rerun the same command: every shard resumes where it stopped")
    return counter.paths, logs


def shard_files(prefix: str | os.PathLike) -> list[Path]:
    """PREFIX.shard-*-of-*.jsonl, sorted by shard index."""
    found = [Path(p) for p in _glob.glob(_glob.escape(str(prefix)) + ".shard-*-of-*.jsonl")]
    return sorted(found, key=lambda p: p.name)


def merge(files: Sequence[str | os.PathLike], out: str | os.PathLike, data_file: str | os.PathLike | None = None,
          max_samples: int | None = None) -> MergeResult:
    """Join annotation logs; refuse when an input id is missing or any id is duplicated or unknown; write the COT.

    The input file (and max_samples) default to what the shards' .meta.json files recorded."""
    from pipelines.records import load_records

    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no annotation files to merge", hint="pass PREFIX (finds PREFIX.shard-*-of-*.jsonl) or files")
    metas = []
    for p in paths:
        if not p.exists():
            raise DataError("annotation file not found", file=str(p))
        mp = Path(str(p)[: -len(".jsonl")] + ".meta.json") if str(p).endswith(".jsonl") else None
        if mp is not None and mp.exists():
            metas.append(json.loads(mp.read_text()))
    if data_file is None:
        datas = {m.get("data") for m in metas}
        if len(datas) != 1 or None in datas:
            raise DataError("cannot tell which input file the shards annotate",
                            hint="pass --data FILE (the records that were annotated)")
        data_file = datas.pop()
        if max_samples is None:
            max_samples = metas[0].get("max_samples")
    counts = {tuple(m.get("shard", [0, 1]))[1] for m in metas}
    if len(counts) > 1:
        raise DataError(f"the files come from different shardings (n = {sorted(counts)})")
    ds = load_records(data_file)
    n_in = len(ds) if max_samples is None else min(len(ds), max_samples)
    ids = [str(x) for x in ds["problem_id"][:n_in]]
    order = {x: k for k, x in enumerate(ids)}
    seen: dict[str, Path] = {}
    dups: list[str] = []
    unknown: list[str] = []
    records: list[dict] = []
    for p in paths:
        for r in read_log(p):
            k = rid(r)
            if k in seen:
                dups.append(f"{k} ({seen[k].name} and {p.name})")
                continue
            seen[k] = p
            if k not in order:
                unknown.append(k)
            records.append(r)
    problems = []
    if dups:
        problems.append(f"{len(dups)} duplicated id(s): {', '.join(dups[:5])}")
    if unknown:
        problems.append(f"{len(unknown)} id(s) not in {data_file}: {', '.join(unknown[:5])}")
    missing = [x for x in ids if x not in seen]
    if missing:
        n = next(iter(counts)) if counts else None
        where = ""
        if n and n > 1:
            shards = sorted({shard_of(x, n) for x in missing})
            where = f"; shard(s) {', '.join(f'{s}/{n}' for s in shards[:10])} incomplete"
        problems.append(f"{len(missing)} of {len(ids)} input id(s) missing (e.g. {', '.join(missing[:5])}){where}")
    if problems:
        raise DataError("; ".join(problems), hint="re-run (resume) the incomplete shards with the same --out, "
                        "then merge again; remove a duplicated shard file")
    kept = write_cot(records, out, order)
    return MergeResult(cot=Path(out), files=paths, stats=stats_of(records).as_dict(), kept=kept)


# ---------------------------------------------------------------------------------------------------------------------
# Throughput measurement (BENCHMARKS.md): the same records annotated at several batch sizes
def measure_throughput(cfg, batch_sizes: Sequence[int], repeats: int = 3, workdir: str | os.PathLike = ".",
                       backend: Any = None, processor: Any = None) -> dict[int, dict[str, float]]:
    """records/s and tokens/s (median of `repeats` fresh runs) of `annotate` per batch size, same records/teacher."""
    import statistics

    if backend is None:
        backend, processor = make_teacher(cfg)
    out: dict[int, dict[str, float]] = {}
    for bs in batch_sizes:
        rps, tps = [], []
        for k in range(repeats):
            c = cfg.model_copy(deep=True)
            c.annotate.batch_size = bs
            prefix = Path(workdir) / f"bench-bs{bs}-{k}"
            for suffix in (".jsonl", ".meta.json", ".cot.json"):
                Path(str(prefix) + suffix).unlink(missing_ok=True)
            res = annotate(c, backend=backend, processor=processor, prefix=prefix)
            rps.append(res.records_per_s)
            tps.append(res.tokens_per_s)
        out[bs] = {"records_per_s": statistics.median(rps), "tokens_per_s": statistics.median(tps),
                   "runs": repeats}
    return out
