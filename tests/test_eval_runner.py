"""`videor1 eval` end to end on the tiny model and the synthetic world: rows, results, registry, resume, rescore,
broken media, data parallel, the vLLM request path with a stand-in engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROW_KEYS = {"index", "id", "benchmark", "problem_type", "output", "prediction", "solution", "score", "correct",
            "official_score", "official_correct", "data_source", "reward"}


def _eval_args(model, data, out, *extra):
    return ["eval", "--bench", "synthetic", "--model", model, "--data", data, "--out", out,
            "--set", "eval.max_new_tokens=16", "--set", "eval.temperature=0", *extra]


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def first_eval(tiny_model_dir, synth_world, tmp_path_factory):
    """One CLI eval of the 12-question synthetic test split (shared by the checks below)."""
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("eval") / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("VIDEOR1_HOME", str(home))
    try:
        result = run_cli(*_eval_args(tiny_model_dir, synth_world["test"], out, "--batch-size", "4"))
    finally:
        mp.undo()
    return {"out": out, "home": home, "stdout": result.output}


def test_cli_eval_end_to_end(first_eval, synth_world):
    out = first_eval["out"]
    rows = _rows(out / "synthetic.samples.jsonl")
    assert len(rows) == 12 and [r["index"] for r in rows] == list(range(12))
    assert all(ROW_KEYS <= set(r) for r in rows)
    records = json.loads(Path(synth_world["test"]).read_text())
    assert [r["id"] for r in rows] == [r["problem_id"] for r in records]
    res = json.loads((out / "results.json").read_text())
    b = res["benchmarks"]["synthetic"]
    assert b["n"] == 12 and b["errors"] == 0
    for mode in ("video-r1", "official"):
        assert set(b[mode]["by_problem_type"]) <= {"multiple choice", "numerical", "OCR", "free-form", "regression"}
        assert sum(v["n"] for v in b[mode]["by_problem_type"].values()) == 12
    assert set(b["video-r1"]["by_order"]) <= {"order-dependent", "other"}
    assert sum(v["n"] for v in b["video-r1"]["by_data_source"].values()) == 12
    assert res["config"]["eval"]["max_new_tokens"] == 16 and res["frames"] == res["config"]["video"]["max_frames"]
    assert "Synthetic world" in first_eval["stdout"] and "order-dependent" in first_eval["stdout"]


def test_eval_registry_run(first_eval, tiny_model_dir):
    from pipelines.registry import Registry

    reg = Registry(first_eval["home"] / "registry.db")
    runs = reg.list_runs(kind="eval")
    assert len(runs) == 1 and runs[0]["status"] == "finished"
    rid = runs[0]["id"]
    arts = reg.artifacts_of(rid)
    kinds = {a.kind for a in arts["outputs"]}
    assert {"eval-results", "eval-samples"} <= kinds
    assert any(Path(a.path) == Path(tiny_model_dir).resolve() and a.kind == "external:model" for a in arts["inputs"])
    assert any(a.kind == "external:data" for a in arts["inputs"])
    metrics = reg.metrics(rid)
    assert "eval/synthetic/overall" in metrics and "eval/synthetic/official" in metrics
    assert "synthetic" in runs[0]["summary"]


def test_rerun_skips_finished_and_rescore(first_eval, tiny_model_dir, synth_world, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(first_eval["out"], out)
    before = _rows(out / "synthetic.samples.jsonl")
    # Same arguments: nothing left to generate, so the model is never built.
    import pipelines.evaluate.runner as R

    monkeypatch.setattr(R, "build_backend", lambda *a, **k: pytest.fail("model loaded on a finished eval"))
    run_cli(*_eval_args(tiny_model_dir, synth_world["test"], out))
    assert _rows(out / "synthetic.samples.jsonl") == before

    # --rescore: hand-edit two outputs to the right answers; scores are recomputed without a model.
    rows = before
    rows[0]["output"] = f"<think>t</think><answer>{rows[0]['gold']}</answer>"
    ocr = next((r for r in rows if r["problem_type"] == "OCR"), None)
    if ocr is not None:
        ocr["output"] = f"<answer>{ocr['gold']}</answer>"
    (out / "synthetic.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli("eval", "--rescore", out)
    new = _rows(out / "synthetic.samples.jsonl")
    assert new[0]["score"] == (0.0 if new[0]["problem_type"] in ("OCR", "free-form") else 1.0)
    assert new[0]["official_score"] == 1.0
    if ocr is not None:
        o = next(r for r in new if r["index"] == ocr["index"])
        assert o["score"] == 0.0 and o["official_score"] == 1.0  # Video-R1 eval: OCR 0; training reward: 1
    res = json.loads((out / "results.json").read_text())
    assert res["rescored"] is True
    assert res["benchmarks"]["synthetic"]["official"]["overall"] > 0


def test_broken_media_counts_as_error(tiny_model_dir, synth_world, tmp_path):
    records = json.loads(Path(synth_world["test"]).read_text())[:3]
    records[1] = dict(records[1], path="./videos/missing.mp4", data_type="video")
    data = tmp_path / "eval_synth.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    # 1 error row in 3 is over the default data.max_skip_fraction (0.1): allowed here to check how it is counted
    run_cli(*_eval_args(tiny_model_dir, data, out, "--root", synth_world["root"], "--set", "data.max_skip_fraction=0.5"))
    rows = _rows(out / "synthetic.samples.jsonl")
    assert len(rows) == 3
    assert rows[1]["error"] and "missing.mp4" in rows[1]["error"] and rows[1]["score"] == 0.0
    res = json.loads((out / "results.json").read_text())["benchmarks"]["synthetic"]
    assert res["n"] == 3 and res["errors"] == 1 and res["error_ids"] == [records[1]["problem_id"]]
    assert res["video-r1"]["n"] == 3


def test_resolve_inputs(tmp_path):
    from pipelines.errors import VideoR1Error
    from pipelines.evaluate.runner import resolve_inputs

    (tmp_path / "eval_vsibench.json").write_text("[]")
    (tmp_path / "eval_videomme.json").write_text("[]")
    ins = resolve_inputs(["vsi", "videomme"], str(tmp_path), None)
    assert [i.file.name for i in ins] == ["eval_vsibench.json", "eval_videomme.json"]
    assert all(i.root == tmp_path.resolve() for i in ins)
    with pytest.raises(VideoR1Error, match="mvbench"):
        resolve_inputs(["mvbench"], str(tmp_path), None)
    with pytest.raises(VideoR1Error, match="one file"):
        resolve_inputs(["vsi", "videomme"], str(tmp_path / "eval_vsibench.json"), None)
    with pytest.raises(VideoR1Error, match="unknown benchmark"):
        resolve_inputs(["nope"], str(tmp_path), None)


def test_shards_cover_every_index_once():
    from pipelines.evaluate.runner import shard_indices

    for n in (0, 1, 7, 12):
        for w in (1, 2, 3):
            got = sorted(i for r in range(w) for i in shard_indices(n, r, w))
            assert got == list(range(n))


def test_torn_jsonl_line_is_ignored_and_repaired(tmp_path):
    from pipelines.evaluate.runner import _repair_tail, finished_rows, part_path

    p = part_path(tmp_path, "vsi", 0)
    p.write_text('{"index": 0, "id": 1}\n{"index": 1, "id"')
    assert set(finished_rows(tmp_path, "vsi")) == {0}
    _repair_tail(p)
    assert p.read_text() == '{"index": 0, "id": 1}\n'


def test_paper_compare_and_results_helpers(tmp_path):
    from pipelines.config import load_config
    from pipelines.evaluate import runner as R
    from pipelines.evaluate.benchmarks import get_benchmark

    assert R.paper_model_for("/ckpt/Video-R1/Video-R1-7B") == "Video-R1-7B"
    assert R.paper_model_for("Video-R1/Qwen2.5-VL-7B-COT-SFT") == "Qwen2.5-VL-7B-SFT"
    assert R.paper_model_for("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen2.5-VL-7B (CoT)"
    assert R.paper_model_for("tiny") is None
    cfg = load_config(preset="video-r1-eval", overrides=["eval.compare=paper", "model.name_or_path=x/Video-R1-7B"],
                      shortcuts={"eval.frames": 32})
    bench = get_benchmark("vsi")
    rows = [R.score_row(bench, {"index": 0, "problem_type": "multiple choice", "solution": "<answer>A</answer>",
                                "output": "<answer>A</answer>", "question_type": "route_planning"})]
    res = R.build_results(cfg, {"vsi": R.summarise(bench, rows)})
    assert res["benchmarks"]["vsi"]["paper"] == {"model": "Video-R1-7B", "frames": 32, "value": 35.8,
                                                 "delta": pytest.approx(100 - 35.8)}
    R.write_results(tmp_path, res)
    loaded = R.load_results(tmp_path)
    assert R.results_table_rows(loaded) == {"vsi": 100.0}
    assert R.compare_results({"a": loaded, "b": loaded}) == {"vsi": {"a": 100.0, "b": 100.0}}
    m = R.metrics_of(loaded)
    assert m["eval/vsi/overall"] == 100.0 and "eval/vsi/paper_delta" in m


def test_default_output_dir_is_keyed_on_protocol(tmp_path):
    from pipelines.config import load_config
    from pipelines.evaluate.runner import output_dir

    a = output_dir(load_config(overrides=[f"run.output_dir={tmp_path}"], shortcuts={"eval.frames": 16}))
    b = output_dir(load_config(overrides=[f"run.output_dir={tmp_path}"], shortcuts={"eval.frames": 16}))
    c = output_dir(load_config(overrides=[f"run.output_dir={tmp_path}"], shortcuts={"eval.frames": 32}))
    d = output_dir(load_config(overrides=[f"run.output_dir={tmp_path}", "eval.batch_size=3"],
                               shortcuts={"eval.frames": 16}))
    assert a == b == d and a != c


def test_protocol_mismatch_is_refused(tmp_path):
    from pipelines.config import load_config
    from pipelines.errors import VideoR1Error
    from pipelines.evaluate.runner import check_protocol, protocol

    check_protocol(tmp_path, protocol(load_config(shortcuts={"eval.frames": 16})))
    check_protocol(tmp_path, protocol(load_config(shortcuts={"eval.frames": 16})))
    with pytest.raises(VideoR1Error, match="video"):
        check_protocol(tmp_path, protocol(load_config(shortcuts={"eval.frames": 32})))


def test_eval_preset_defaults_to_video_r1_protocol(monkeypatch):
    """Without --preset, the six benchmarks get video-r1-eval; synthetic keeps cpu-tiny."""
    import videor1_cli.eval as E

    seen = {}

    def fake_output_dir(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("pipelines.evaluate.runner.output_dir", fake_output_dir)
    run_cli("eval", "--bench", "vsi", "--data", "x.json", check=False)
    cfg = seen["cfg"]
    assert (cfg.video.max_pixels, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.max_new_tokens) == (
        256 * 28 * 28, 0.1, 0.001, 1024)
    run_cli("eval", "--bench", "synthetic", "--data", "x.json", check=False)
    assert seen["cfg"].video.max_pixels == 3136
    assert E.BENCH.key == "eval.bench"


# -- vLLM request building with a stand-in engine -------------------------------------------------------------------
class _Tok:
    def convert_tokens_to_ids(self, t):
        from pipelines.models import QWEN_SPECIAL_TOKENS

        return QWEN_SPECIAL_TOKENS.index(t) if t in QWEN_SPECIAL_TOKENS else -1


class _Out:
    def __init__(self, text):
        self.text, self.token_ids, self.finish_reason = text, [1, 2], "stop"


class _Req:
    def __init__(self, text):
        self.outputs = [_Out(text)]


class FakeLLM:
    def __init__(self):
        self.calls = []

    def get_tokenizer(self):
        return _Tok()

    def generate(self, requests, sampling_params=None, use_tqdm=False):
        self.calls.append((requests, sampling_params))
        return [_Req("<think>x</think><answer>A</answer>") for _ in requests]


def test_vllm_requests_from_eval(tiny_model_dir, synth_world, tmp_path):
    from pipelines.config import load_config
    from pipelines.evaluate import runner as R
    from pipelines.generation.vllm import VLLMBackend
    from pipelines.models import load_processor

    llm = FakeLLM()
    backend = VLLMBackend(str(tiny_model_dir), llm=llm, sampling_params_cls=dict)
    cfg = load_config(preset="cpu-tiny", overrides=[
        f"model.name_or_path={tiny_model_dir}", f"data.file={synth_world['test']}", "eval.backend=vllm",
        "eval.temperature=0.1", "eval.top_p=0.001", "eval.max_new_tokens=1024", "eval.batch_size=5",
        "eval.limit=6", f"eval.output_dir={tmp_path}"])
    res = R.evaluate(cfg, tmp_path, backend=backend, processor=load_processor(tiny_model_dir))
    assert len(llm.calls) == 2  # 6 samples in batches of 5
    requests, params = llm.calls[0]
    assert params["temperature"] == 0.1 and params["top_p"] == 0.001 and params["max_tokens"] == 1024
    records = json.loads(Path(synth_world["test"]).read_text())
    for req, rec in zip(requests, records):
        mm = req["multi_modal_data"]
        if rec["data_type"] == "video":
            frames, meta = mm["video"]
            assert frames.ndim == 4 and meta["total_num_frames"] == frames.shape[0]
            assert "<|video_pad|>" in req["prompt"] and req["mm_processor_kwargs"]["do_sample_frames"] is False
        else:
            assert "image" in mm and "<|image_pad|>" in req["prompt"]
        assert rec["problem"].split("\n")[0] in req["prompt"]
    assert res["benchmarks"]["synthetic"]["n"] == 6
    assert res["backend"] == "vllm"


# -- SIGKILL resume and data parallel (subprocesses) ----------------------------------------------------------------
def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "videor1_cli.app", *map(str, args)], env=env, **kw)


def _env(tmp_path):
    env = dict(os.environ, VIDEOR1_HOME=str(tmp_path / "home"), VIDEOR1_QUIET="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_resume_after_sigkill(tiny_model_dir, synth_world, tmp_path):
    out = tmp_path / "out"
    env = _env(tmp_path)
    args = _eval_args(tiny_model_dir, synth_world["test"], out, "--batch-size", "1")
    proc = _cli(args, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / "synthetic.part-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the eval finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _rows(part)
    assert 2 <= len(first) < 12
    proc = _cli(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    rows = _rows(out / "synthetic.samples.jsonl")
    assert [r["index"] for r in rows] == list(range(12))
    by_index = {r["index"]: r for r in rows}
    for r in first:
        assert by_index[r["index"]] == r  # finished rows kept as written, not regenerated
    res = json.loads((out / "results.json").read_text())
    assert res["stats"]["synthetic"]["skipped"] == len(first)
    assert res["stats"]["synthetic"]["generated"] == 12 - len(first)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_data_parallel_equals_one(tiny_model_dir, synth_world, tmp_path):
    env = _env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, []), (two, ["--nproc", "2", "--set", f"distributed.master_port={_free_port()}"])):
        proc = _cli(_eval_args(tiny_model_dir, synth_world["test"], out, "--batch-size", "3", *extra), env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (stdout + stderr).decode()[-3000:]
    a, b = _rows(one / "synthetic.samples.jsonl"), _rows(two / "synthetic.samples.jsonl")
    assert [r["index"] for r in b] == list(range(12))
    assert [(r["output"], r["score"], r["official_score"]) for r in a] == \
        [(r["output"], r["score"], r["official_score"]) for r in b]
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert ra["benchmarks"] == rb["benchmarks"]
    assert rb["world_size"] == 2 and not list(two.glob("*.part-*.jsonl"))
