"""`videor1 annotate` / `annotate merge`: records, filtering, COT format, resume, shards, vLLM requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import run_cli

ANNOTATION_KEYS = {"answer", "reward", "select", "teacher", "error"}


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
def test_shards_partition_and_are_stable():
    from pipelines.annotate import parse_shard, shard_of

    ids = list(range(1000)) + [f"s{i}" for i in range(100)]
    for n in (1, 3, 8):
        parts = [[x for x in ids if shard_of(x, n) == i] for i in range(n)]
        assert sum(len(p) for p in parts) == len(ids)
        assert all(p for p in parts)
    assert shard_of(12345, 8) == shard_of("12345", 8)  # by str(problem_id): same in JSON list and JSONL
    assert parse_shard("2/8") == (2, 8) and parse_shard(None) is None
    from pipelines.errors import VideoR1Error

    for bad in ("8/8", "a/b", "1"):
        with pytest.raises(VideoR1Error):
            parse_shard(bad)


def test_annotate_record_and_cot_format():
    from pipelines.annotate import annotate_record, cot_record

    rec = {"problem_id": 7, "problem": "Q?", "data_type": "video", "problem_type": "multiple choice",
           "options": ["A. red", "B. blue"], "solution": "<answer>B</answer>", "path": "./v.mp4",
           "data_source": "x"}
    good = annotate_record(rec, "<think> it is blue </think>\n<answer>B</answer>", "T", 0.6)
    assert good["process"] == "<think>it is blue</think>" and good["answer"] == "B"
    assert good["reward"] == 1.0 and good["select"] is True and good["teacher"] == "T"
    bad = annotate_record(rec, "<think>red</think><answer>A</answer>", "T", 0.6)
    assert bad["reward"] == 0.0 and bad["select"] is False
    none = annotate_record(rec, "no tags at all", "T", 0.6)
    assert none["process"] == "<think></think>" and none["answer"] == "" and none["select"] is False
    # numerical: Video-R1's rule; free-form: fuzzy, kept only above min_reward
    num = {**rec, "problem_type": "numerical", "options": [], "solution": "<answer>3</answer>"}
    assert annotate_record(num, "<think>x</think><answer>3</answer>", "T", 0.6)["select"] is True
    cot = cot_record(good)
    assert list(cot) == ["problem_id", "problem", "data_type", "problem_type", "options", "process", "solution",
                         "path", "data_source"]
    assert not ANNOTATION_KEYS & set(cot)


def test_read_log_tolerates_torn_last_line(tmp_path):
    from pipelines.annotate import read_log
    from pipelines.errors import DataError

    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"problem_id": 1}\n{"problem_id": 2}\n{"problem_id": 3, "proc')
    assert [r["problem_id"] for r in read_log(p)] == [1, 2]
    assert [r["problem_id"] for r in read_log(p, repair=True)] == [1, 2]
    assert p.read_bytes() == b'{"problem_id": 1}\n{"problem_id": 2}\n'
    p.write_bytes(b'{"problem_id": 1}\n{"problem_id": 2}')  # complete record, newline lost
    assert len(read_log(p, repair=True)) == 2 and p.read_bytes().endswith(b"}\n")
    p.write_bytes(b'{"problem_id": 1}\nnot json\n{"problem_id": 2}\n')
    with pytest.raises(DataError):
        read_log(p)


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline with a stand-in teacher (no model): every branch without generation cost
class EchoTeacher:
    """Answers the gold answer for even problem ids and a wrong one for odd ids; can fail after N calls."""

    def __init__(self, records, fail_after: int | None = None):
        self.by_prompt = {}
        self.records = {str(r["problem_id"]): r for r in records}
        self.calls = 0
        self.batches: list[int] = []
        self.fail_after = fail_after

    def generate(self, prompts, media, sampling):
        from pipelines.generation import Completion

        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            rec = next(r for r in self.records.values() if r["problem"] in p)
            from pipelines.rewards import gold_answer

            ans = gold_answer(rec["solution"]) if int(rec["problem_id"]) % 2 == 0 else "zzz"
            out.append([Completion(text=f"<think>about {rec['problem_id']}</think>\n<answer>{ans}</answer>",
                                   token_ids=[1, 2, 3])])
        return out


@pytest.fixture()
def small_world(tmp_path, synth_world):
    """12 records with unique problems (the stand-in finds its record by the question text) + 1 broken video."""
    recs = json.loads(Path(synth_world["rl"]).read_text())
    uniq = []
    for i, r in enumerate(recs):
        r = dict(r, problem=f"[{i}] " + r["problem"])
        uniq.append(r)
    uniq = uniq[:12]
    broken = dict(uniq[0], problem_id=999_001, problem="[broken] what?", path="./videos/missing.mp4",
                  data_type="video")
    uniq.append(broken)
    f = tmp_path / "in.json"
    f.write_text(json.dumps(uniq))
    return {"file": f, "root": synth_world["root"], "records": uniq}


def _cfg(world, tiny_model_dir, tmp_path, **sets):
    from pipelines.config import load_config

    shortcuts = {"data.file": str(world["file"]), "data.root": str(world["root"]),
                 "annotate.model": str(tiny_model_dir), "annotate.batch_size": 4,
                 "run.output_dir": str(tmp_path / "runs"),
                 "data.max_skip_fraction": 0.5}  # the broken record is 1 of a shard's ~6: counted, not fatal here
    shortcuts.update(sets)
    return load_config(shortcuts=shortcuts)


def test_annotate_stand_in_records_errors_cot_and_resume(small_world, tiny_model_dir, tmp_path):
    from pipelines.annotate import annotate, read_log
    from pipelines.models import load_processor

    proc = load_processor(tiny_model_dir)
    cfg = _cfg(small_world, tiny_model_dir, tmp_path)
    prefix = tmp_path / "out" / "ann"
    # First run "killed" after 2 batches: what was written stays, nothing else
    t1 = EchoTeacher(small_world["records"], fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        annotate(cfg, backend=t1, processor=proc, prefix=prefix)
    first = read_log(str(prefix) + ".jsonl")
    assert len(first) == 8 and not Path(str(prefix) + ".cot.json").exists()
    # Restart: only the rest is generated
    t2 = EchoTeacher(small_world["records"])
    res = annotate(cfg, backend=t2, processor=proc, prefix=prefix)
    assert res.resumed == 8 and res.processed == 5 and sum(t2.batches) == 4  # broken media never reaches the teacher
    allr = read_log(res.jsonl)
    ids = [str(r["problem_id"]) for r in allr]
    assert sorted(ids) == sorted(str(r["problem_id"]) for r in small_world["records"]) and len(set(ids)) == 13
    broken = next(r for r in allr if r["problem_id"] == 999_001)
    assert "missing.mp4" in broken["error"] and broken["select"] is False
    assert res.stats["errors"] == 1 and res.stats["error_ids"] == ["999001"]
    for r in allr:
        if "error" not in r:
            assert r["select"] == (int(r["problem_id"]) % 2 == 0) and r["teacher"] == str(tiny_model_dir)
            assert r["process"] == f"<think>about {r['problem_id']}</think>"
    cot = json.loads(res.cot.read_text())
    want = [r for r in small_world["records"] if int(r["problem_id"]) % 2 == 0 and r["problem_id"] != 999_001]
    assert [c["problem_id"] for c in cot] == [r["problem_id"] for r in want]  # input order
    for c, r in zip(cot, want):
        assert c == {**r, "process": f"<think>about {r['problem_id']}</think>"}
        assert not ANNOTATION_KEYS & set(c)
    # kept rate by type in the summary
    by = res.stats["by"]["data_type"]
    assert sum(v["n"] for v in by.values()) == 13 and res.stats["kept"] == len(want)
    # A third run redoes nothing
    t3 = EchoTeacher(small_world["records"])
    res3 = annotate(cfg, backend=t3, processor=proc, prefix=prefix)
    assert t3.calls == 0 and res3.processed == 0 and res3.cot is not None
    # The COT file is what SFT reads
    from pipelines.records import load_records

    assert len(load_records(res.cot)) == len(want)


def test_annotate_refuses_other_input_in_same_prefix(small_world, tiny_model_dir, tmp_path, synth_world):
    from pipelines.annotate import annotate
    from pipelines.errors import VideoR1Error
    from pipelines.models import load_processor

    proc = load_processor(tiny_model_dir)
    prefix = tmp_path / "ann"
    annotate(_cfg(small_world, tiny_model_dir, tmp_path), backend=EchoTeacher(small_world["records"]),
             processor=proc, prefix=prefix)
    other = dict(small_world, file=Path(synth_world["test"]))
    with pytest.raises(VideoR1Error, match="other settings"):
        annotate(_cfg(other, tiny_model_dir, tmp_path), backend=EchoTeacher([]), processor=proc, prefix=prefix)


def test_shards_then_merge_detects_missing_and_duplicates(small_world, tiny_model_dir, tmp_path):
    from pipelines.annotate import annotate, merge, shard_files
    from pipelines.errors import DataError
    from pipelines.models import load_processor

    proc = load_processor(tiny_model_dir)
    cfg = _cfg(small_world, tiny_model_dir, tmp_path)
    prefix = tmp_path / "sh" / "ann"
    n = 3
    sizes = []
    for i in range(n):
        res = annotate(cfg, backend=EchoTeacher(small_world["records"]), processor=proc, prefix=prefix, shard=(i, n))
        sizes.append(res.stats["records"])
    assert sum(sizes) == 13 and all(sizes)
    files = shard_files(prefix)
    assert len(files) == n
    out = merge(files, tmp_path / "merged.cot.json")
    cot = json.loads(out.cot.read_text())
    unsharded = annotate(cfg, backend=EchoTeacher(small_world["records"]), processor=proc, prefix=tmp_path / "one")
    assert cot == json.loads(unsharded.cot.read_text())
    # missing: drop one shard
    with pytest.raises(DataError, match=r"missing.*shard\(s\)"):
        merge(files[:2], tmp_path / "x.json")
    # duplicated: one shard given twice
    with pytest.raises(DataError, match="duplicated"):
        merge(files + [files[0]], tmp_path / "x.json")
    # CLI: prefix form; and an error exits non-zero with one line
    r = run_cli("annotate", "merge", str(prefix), "--out", str(tmp_path / "cli.cot.json"))
    assert json.loads((tmp_path / "cli.cot.json").read_text()) == cot and "kept" in r.output
    r = run_cli("annotate", "merge", str(files[0]), str(files[1]), "--out", str(tmp_path / "y.json"), check=False)
    assert r.exit_code != 0 and "missing" in r.output


# ---------------------------------------------------------------------------------------------------------------------
# vLLM request building with a stand-in engine
class StandInLLM:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.requests = []
        self.params = []

    def get_tokenizer(self):
        return self.tok

    def generate(self, requests, sampling_params=None, use_tqdm=False):
        self.requests.extend(requests)
        self.params.append(sampling_params)
        eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        return [SimpleNamespace(outputs=[SimpleNamespace(text="<think>t</think><answer>A</answer>",
                                                         token_ids=[5, 6, eos], finish_reason="stop")])
                for _ in requests]


def test_vllm_requests_with_stand_in(small_world, tiny_model_dir, tmp_path):
    from pipelines.annotate import annotate, make_teacher
    from pipelines.models import load_processor

    tok = load_processor(tiny_model_dir).tokenizer
    llm = StandInLLM(tok)
    cfg = _cfg(small_world, tiny_model_dir, tmp_path, **{"annotate.backend": "vllm", "data.max_samples": 6})
    backend, proc = make_teacher(cfg, llm=llm, sampling_params_cls=lambda **kw: kw)
    res = annotate(cfg, backend=backend, processor=proc, prefix=tmp_path / "v")
    assert res.stats["records"] == 6 and len(llm.requests) == 6
    recs = small_world["records"][:6]
    for req, rec in zip(llm.requests, recs):
        assert rec["problem"] in req["prompt"] and req["prompt"].endswith("<|im_start|>assistant\n")
        assert "between the <think> and </think> tags" in req["prompt"]  # Video-R1's CoT (eval) wording
        assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in req["prompt"]  # template default
        if rec["data_type"] == "video":
            frames, meta = req["multi_modal_data"]["video"]
            assert frames.ndim == 4 and frames.shape[-1] == 3 and meta["total_num_frames"] == frames.shape[0]
            assert req["mm_processor_kwargs"]["fps"] == meta["fps"] > 0
            assert req["prompt"].count("<|video_pad|>") == 1
        else:
            assert "image" in req["multi_modal_data"] and req["prompt"].count("<|image_pad|>") == 1
    sp = llm.params[0]
    assert sp["temperature"] == 1.0 and sp["top_p"] == 0.95 and sp["max_tokens"] == cfg.annotate.max_new_tokens
    assert sp["n"] == 1 and tok.convert_tokens_to_ids("<|im_end|>") in sp["stop_token_ids"]
    assert [len(p) for p in [llm.requests]] == [6]


# ---------------------------------------------------------------------------------------------------------------------
# CLI with the hf backend on the tiny model
def test_cli_annotate_hf_tiny(small_world, tiny_model_dir, tmp_path):
    from pipelines.registry import Registry

    out = tmp_path / "cli" / "ann"
    args = ["annotate", "--data", small_world["file"], "--root", small_world["root"], "--teacher", tiny_model_dir,
            "--backend", "hf", "--batch-size", "4", "--out", out, "--limit", "6",
            "--set", "annotate.max_new_tokens=6", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    r = run_cli(*args)
    assert "kept" in r.output and "records/s" in r.output
    lines = [json.loads(x) for x in Path(str(out) + ".jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for rec in lines:
        assert {"process", "answer", "reward", "select", "teacher"} <= set(rec)
        assert rec["process"].startswith("<think>") and rec["process"].endswith("</think>")
        assert rec["select"] == (rec["reward"] > 0.6)
    cot = json.loads(Path(str(out) + ".cot.json").read_text())
    assert isinstance(cot, list) and len(cot) == sum(r["select"] for r in lines)
    reg = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db")
    run = reg.list_runs(kind="annotate")[0]
    s = run["summary"]
    assert s["records"] == 6 and s["complete"] and s["records_per_s"] > 0 and s["tokens_per_s"] > 0
    assert set(s["by"]) == {"problem_type", "data_type", "data_source"}
    arts = reg.artifacts_of(run["id"])
    assert any(a.kind == "records" for a in sum(arts.values(), []))
    # Rerun: resumes, generates nothing
    r2 = run_cli(*args)
    assert "resumed past 6" in r2.output


@pytest.mark.slow
def test_cli_annotate_resumes_after_sigkill(small_world, tiny_model_dir, tmp_path):
    out = tmp_path / "kill" / "ann"
    jsonl = Path(str(out) + ".jsonl")
    env = dict(os.environ, VIDEOR1_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "videor1_cli.app", "annotate", "--data", str(small_world["file"]),
            "--root", str(small_world["root"]), "--teacher", str(tiny_model_dir), "--backend", "hf",
            "--batch-size", "2", "--out", str(out), "--set", "annotate.max_new_tokens=24",
            "--set", f"run.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if jsonl.exists() and len(jsonl.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from pipelines.annotate import read_log

    before = read_log(jsonl)
    n_before = len(before)
    assert 4 <= n_before < 13, n_before
    with open(jsonl, "ab") as f:  # as if the kill had landed mid-write
        f.write(b'{"problem_id": 12345, "probl')
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed past {n_before}" in done.stdout.replace("\n", " ")
    recs = [json.loads(x) for x in jsonl.read_text().splitlines()]
    ids = [r["problem_id"] for r in recs]
    assert len(ids) == 13 and len(set(ids)) == 13  # nothing lost, nothing redone, torn line gone
    assert recs[:n_before] == before
    assert Path(str(out) + ".cot.json").exists()


def test_device_groups_partition_the_visible_gpus():
    from pipelines.annotate import device_groups
    from pipelines.errors import VideoR1Error

    assert device_groups(2, 1, []) == [[], []]  # CPU (hf): no devices to split
    assert device_groups(2, 2, ["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    assert device_groups(3, 1, ["4", "5", "6", "7"]) == [["4"], ["5"], ["6"]]
    with pytest.raises(VideoR1Error, match="needs 8 GPUs, 4 visible"):
        device_groups(2, 4, ["0", "1", "2", "3"])


def test_cli_annotate_nproc_runs_shard_processes_then_merges(small_world, tiny_model_dir, tmp_path):
    """`annotate --nproc 2`: two `--shard i/2` processes on the same resolved config, their joint progress, then the
    merge: every input record annotated exactly once (the broken one recorded with its error), one COT file, one
    parent run whose summary names the shards. A rerun resumes every shard and redoes nothing."""
    from pipelines.annotate import read_log
    from pipelines.registry import Registry

    out = tmp_path / "par" / "ann"
    args = ["annotate", "--data", small_world["file"], "--root", small_world["root"], "--teacher", tiny_model_dir,
            "--backend", "hf", "--batch-size", "4", "--out", out, "--nproc", "2", "--limit", "11",
            "--set", "annotate.max_new_tokens=6", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    r = run_cli(*args)
    assert "2 shard processes" in r.output
    logs = [Path(f"{out}.shard-{i:05d}-of-00002.jsonl") for i in range(2)]
    recs = [rec for f in logs for rec in read_log(f)]
    ids = sorted(str(x["problem_id"]) for x in recs)
    # the shard processes got the parent's settings: --limit 11 of the 13 records, 6 new tokens at most
    assert ids == sorted(str(x["problem_id"]) for x in small_world["records"][:11])
    assert all(read_log(f) for f in logs)  # both shards did work
    assert all(len(json.dumps(x.get("process", ""))) < 200 for x in recs)
    cot = json.loads(Path(f"{out}.cot.json").read_text())
    assert len(cot) == sum(1 for x in recs if x.get("select"))
    reg = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db")
    parent = [run for run in reg.list_runs(kind="annotate") if (run["summary"] or {}).get("nproc") == 2]
    assert len(parent) == 1 and parent[0]["status"] == "finished"
    assert parent[0]["summary"]["records"] == 11 and len(parent[0]["summary"]["shards"]) == 2
    children = [run for run in reg.list_runs(kind="annotate") if (run["summary"] or {}).get("shard")]
    assert sorted(c["summary"]["shard"] for c in children) == ["0/2", "1/2"]
    before = [f.read_bytes() for f in logs]
    run_cli(*args)
    assert [f.read_bytes() for f in logs] == before  # resumed: nothing redone, nothing appended


def test_cli_annotate_nproc_failure_names_the_shard_and_training_nproc_does_not_fan_out(small_world, tmp_path):
    """A failing shard process: one error line naming the shards, their exit codes and the log, nothing merged. And
    distributed.nproc (set to 4 by the video-r1-7b preset, for training) leaves annotate a single process."""
    from pipelines.config import load_config

    out = tmp_path / "bad" / "ann"
    r = run_cli("annotate", "--data", small_world["file"], "--root", small_world["root"], "--teacher",
                tmp_path / "no-such-teacher", "--backend", "hf", "--out", out, "--nproc", "2",
                "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1
    assert "annotate shard(s) 0/2 (exit 1), 1/2 (exit 1) failed" in r.output and "shard-0-of-2.log" in r.output
    assert "rerun the same command" in r.output and not Path(f"{out}.cot.json").exists()
    assert load_config(preset="video-r1-7b").annotate.nproc == 1
    r = run_cli("annotate", "--data", small_world["file"], "--root", small_world["root"], "--teacher",
                tmp_path / "no-such-teacher", "--backend", "hf", "--out", out, "--set", "distributed.nproc=2",
                "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1 and "shard" not in r.output  # the single-process path failed on the teacher

