"""The bad-input matrix (issue 17): each case runs the CLI on the tiny model and asserts the exit code and the one
line a user reads. Silent successes (a stage that skipped everything exiting 0), a bad multiple-choice answer passing
every stage, empty or cut videos, a model path taken for a Hub id, a hung decoder, two identical evals at once."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from conftest import run_cli
from pipelines.registry import Registry

RL_SMALL = ["--set", "rl.num_generations=2", "--set", "rl.max_completion_length=8", "--set", "rl.per_device_prompts=2",
            "--set", "rl.save_steps=100", "--set", "rl.logging_steps=1"]
EVAL_SMALL = ["--set", "eval.max_new_tokens=8", "--set", "eval.temperature=0"]


def registry() -> Registry:
    return Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")


def error_line(output: str) -> str:
    """The CLI's one error line ('error: ...'), asserted to be exactly one."""
    lines = [x for x in output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def runs_of(kind: str) -> list[dict]:
    reg = registry()
    return [reg.get_run(r["id"]) for r in reg.list_runs(kind=kind)]


@pytest.fixture
def empty_root(tmp_path) -> Path:
    d = tmp_path / "wrong-root"
    d.mkdir()
    return d


@pytest.fixture
def bad_answer_file(synth_world, tmp_path) -> Path:
    """The synthetic test split with record 1 answering 'Z' (not among its options A-D)."""
    recs = json.loads(Path(synth_world["test"]).read_text())
    recs.sort(key=lambda r: r["problem_type"] != "multiple choice")  # stable: multiple-choice records first
    assert recs[1]["problem_type"] == "multiple choice"
    recs[1]["solution"] = "<answer>Z</answer>"
    f = tmp_path / "bad-answer.json"
    f.write_text(json.dumps(recs))
    return f


# ---------------------------------------------------------------------------------------------------------------------
# 1. A stage that skipped everything fails at its end (exit 1, file, count, first reason); nothing done is lost
def test_train_rl_wrong_root_fails_and_registers_no_model(tiny_model_dir, synth_world, empty_root, tmp_path):
    r = run_cli("train", "rl", "--model", tiny_model_dir, "--data", synth_world["rl"], "--root", empty_root,
                "--max-steps", "2", "--set", f"run.output_dir={tmp_path / 'runs'}", *RL_SMALL, check=False)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert synth_world["rl"] in line and "all 4 RL prompts were skipped" in line and "file not found" in line
    (run,) = runs_of("train-rl")
    assert run["status"] == "failed"
    assert not [a for a in registry().artifacts_of(run["id"])["outputs"] if a.kind == "model"]
    assert (Path(run["run_dir"]) / "model" / "config.json").exists()  # the weights are still written


def test_train_sft_wrong_root_fails(tiny_model_dir, synth_world, empty_root, tmp_path):
    r = run_cli("train", "sft", "--model", tiny_model_dir, "--data", synth_world["sft"], "--root", empty_root,
                "--max-steps", "1", "--set", "sft.per_device_batch_size=2", "--set", "sft.save_steps=1",
                "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)  # 2 of the file's 6 samples seen: the in-loop check waits, the end check does not
    assert synth_world["sft"] in line and "all 2 training samples were skipped" in line and "file not found" in line
    (run,) = runs_of("train-sft")
    assert run["status"] == "failed"
    assert not [a for a in registry().artifacts_of(run["id"])["outputs"] if a.kind == "model"]
    assert list(Path(run["run_dir"]).glob("checkpoint-*"))  # checkpoints already written are kept


def test_eval_all_errors_fails_keeps_rows_and_a_fixed_rerun_retries_only_them(tiny_model_dir, synth_world,
                                                                              empty_root, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", synth_world["test"], "--out", out,
            "--limit", "4", *EVAL_SMALL]
    r = run_cli(*args, "--root", empty_root, check=False)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert synth_world["test"] in line and "all 4 synthetic eval samples" in line and "file not found" in line
    assert (out / "results.json").exists() and len((out / "synthetic.samples.jsonl").read_text().splitlines()) == 4
    assert not runs_of("eval")[0]["summary"]  # no result recorded as a success
    import shutil

    shutil.copytree(synth_world["root"], empty_root, dirs_exist_ok=True)  # the media put in place: rerun
    r = run_cli(*args, "--root", empty_root)
    assert "4 to generate (retrying 4 error rows)" in r.output
    rows = [json.loads(x) for x in (out / "synthetic.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any(x.get("error") for x in rows)


def test_annotate_all_errors_fails_without_a_cot_file(tiny_model_dir, synth_world, empty_root, tmp_path):
    recs = json.loads(Path(synth_world["rl"]).read_text())[:3]
    f = tmp_path / "in.json"
    f.write_text(json.dumps(recs))
    out = tmp_path / "ann"
    r = run_cli("annotate", "--data", f, "--root", empty_root, "--teacher", tiny_model_dir, "--backend", "hf",
                "--out", out, "--set", "annotate.max_new_tokens=8", check=False)
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert str(f) in line and "all 3 records to annotate were skipped" in line and "file not found" in line
    assert len(Path(f"{out}.jsonl").read_text().splitlines()) == 3 and not Path(f"{out}.cot.json").exists()


def test_skip_check_is_judged_at_the_end_of_a_short_run():
    from pipelines.errors import DataError, check_skip_rate

    check_skip_rate(3, 4, 0.5, dataset_size=1000, file="f.json")  # in the loop: 4 < 64 seen, not judged yet
    with pytest.raises(DataError, match=r"f.json: skipped 3 of 4 RL prompts in all \(e.g. x\), more than"):
        check_skip_rate(3, 4, 0.5, dataset_size=1000, file="f.json", example="x", what="RL prompts", final=True)
    check_skip_rate(1, 4, 0.5, dataset_size=1000, file="f.json", final=True)
    with pytest.raises(DataError, match="all 4 .* were skipped"):
        check_skip_rate(4, 4, 1.0, dataset_size=4, file="f.json", final=True)  # even at max_skip_fraction = 1
    with pytest.raises(DataError, match="no training samples were read"):
        check_skip_rate(0, 0, 1.0, dataset_size=0, file="f.json", final=True)


# ---------------------------------------------------------------------------------------------------------------------
# 2. A multiple-choice answer outside its options is skipped and counted by every stage, named by file/record/field
BAD_ANSWER = "record 1, field 'solution': answer 'Z' is not one of the option letters"


def test_eval_skips_a_bad_answer_record_naming_it(tiny_model_dir, synth_world, bad_answer_file, tmp_path):
    out = tmp_path / "eval"
    r = run_cli("eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", bad_answer_file, "--root",
                synth_world["root"], "--out", out, "--limit", "4", "--set", "data.max_skip_fraction=0.5", *EVAL_SMALL)
    rows = [json.loads(x) for x in (out / "synthetic.samples.jsonl").read_text().splitlines()]
    assert [bool(x.get("error")) for x in rows] == [False, True, False, False]
    assert f"{bad_answer_file}, {BAD_ANSWER}" in rows[1]["error"] and rows[1]["output"] == ""
    assert "results" in r.output
    # over the default max_skip_fraction (1 of 4 > 0.1) the same eval fails, naming it
    r = run_cli("eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", bad_answer_file, "--root",
                synth_world["root"], "--out", out, "--limit", "4", *EVAL_SMALL, check=False)
    assert r.exit_code == 1 and "skipped 1 of 4 synthetic eval samples" in error_line(r.output)


def test_train_rl_skips_a_bad_answer_record(tiny_model_dir, synth_world, bad_answer_file, tmp_path, capfd):
    r = run_cli("train", "rl", "--model", tiny_model_dir, "--data", bad_answer_file, "--root", synth_world["root"],
                "--max-steps", "1", "--set", "data.shuffle=false", "--set", "data.max_skip_fraction=0.5",
                "--set", f"run.output_dir={tmp_path / 'runs'}", *RL_SMALL, check=False)
    err = r.output + capfd.readouterr().err
    assert r.exit_code == 0, err
    rid = json.loads(bad_answer_file.read_text())[1]["problem_id"]
    assert f"skipped record {rid}" in err and BAD_ANSWER in err
    (run,) = runs_of("train-rl")
    assert run["summary"]["skipped"] == 1


def test_sft_and_annotate_loaders_skip_a_bad_answer_record(tiny_model_dir, synth_world, tmp_path):
    from pipelines.config import load_config
    from pipelines.models import load_processor
    from pipelines.sft import SKIP_KEY, SftDataset

    recs = json.loads(Path(synth_world["sft"]).read_text())[:3]
    recs[2] = dict(recs[2], problem_type="multiple choice", options=["A. yes", "B. no"], solution="<answer>Z</answer>")
    f = tmp_path / "cot.json"
    f.write_text(json.dumps(recs))
    cfg = load_config(shortcuts={"model.name_or_path": str(tiny_model_dir), "data.file": str(f)})
    ds = SftDataset(f, cfg, load_processor(tiny_model_dir), synth_world["root"])
    assert SKIP_KEY not in ds[0]
    rid, reason, detail = ds[2][SKIP_KEY]
    assert reason == "data" and f"{f}, record 2, field 'solution': answer 'Z'" in detail
    # annotate: the record is written with its error (never sent to the teacher), the others are annotated
    out = tmp_path / "ann"
    r = run_cli("annotate", "--data", f, "--root", synth_world["root"], "--teacher", tiny_model_dir, "--backend",
                "hf", "--out", out, "--set", "annotate.max_new_tokens=8", "--set", "data.max_skip_fraction=0.5")
    got = [json.loads(x) for x in Path(f"{out}.jsonl").read_text().splitlines()]
    assert [bool(x.get("error")) for x in got] == [False, False, True]
    assert "record 2, field 'solution'" in got[2]["error"] and r.exit_code == 0


def test_sft_dataset_names_the_file_index_after_shuffling(tiny_model_dir, synth_world, tmp_path):
    from pipelines.config import load_config
    from pipelines.models import load_processor
    from pipelines.records import load_records
    from pipelines.sft import SftDataset

    cfg = load_config(shortcuts={"model.name_or_path": str(tiny_model_dir), "data.file": synth_world["sft"]})
    ds = SftDataset(synth_world["sft"], cfg, load_processor(tiny_model_dir), synth_world["root"], max_samples=5,
                    shuffle_seed=3)
    ref = load_records(synth_world["sft"]).shuffle(seed=3).select(range(5))  # the order training always used
    assert list(ds.ds["problem_id"]) == list(ref["problem_id"])
    full = load_records(synth_world["sft"])["problem_id"]
    assert [full[i] for i in ds.file_index] == list(ds.ds["problem_id"])


# ---------------------------------------------------------------------------------------------------------------------
# 3. Empty and cut videos: caught, one clean line per file
def _records(tmp_path, names):
    recs = [{"problem_id": i, "problem": f"q{i}", "data_type": "video", "problem_type": "multiple choice",
             "options": ["A. x", "B. y"], "solution": "<answer>A</answer>", "path": n if n.startswith("/") else f"./{n}"}
            for i, n in enumerate(names)]
    f = tmp_path / "recs.json"
    f.write_text(json.dumps(recs))
    return f


def test_validate_flags_a_zero_byte_video_without_decode(tmp_path, synth_world):
    import shutil

    shutil.copy(Path(synth_world["root"]) / "videos" / sorted(os.listdir(Path(synth_world["root"]) / "videos"))[0],
                tmp_path / "good.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    r = run_cli("data", "validate", _records(tmp_path, ["good.mp4", "empty.mp4"]), check=False)
    assert r.exit_code == 1, r.output
    assert f"record 1: {tmp_path / 'empty.mp4'}: empty file (0 bytes)" in r.output
    assert "empty_media" in r.output


def test_validate_decode_prints_one_clean_line_per_cut_video(tmp_path, synth_world):
    src = Path(synth_world["root"]) / "videos" / sorted(os.listdir(Path(synth_world["root"]) / "videos"))[0]
    data = src.read_bytes()
    (tmp_path / "head.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: gone
    (tmp_path / "tail.mp4").write_bytes(data[len(data) // 3:])
    r = run_cli("data", "validate", _records(tmp_path, ["head.mp4", "tail.mp4"]), "--decode", check=False)
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.strip().startswith("record ")]
    assert len(lines) == 2 and all("cannot decode video (pyav: " in x for x in lines), r.output
    for noise in (".cc:", ".cpp:", "Errno", "moov atom", "@ 0x", "avcodec_"):
        assert noise not in r.output


def test_validate_decode_names_a_broken_image_in_one_clean_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png at all" * 10)
    f = tmp_path / "recs.json"
    f.write_text(json.dumps([{"problem_id": 0, "problem": "q", "data_type": "image", "problem_type": "free-form",
                              "solution": "<answer>a</answer>", "path": "./x.png"}]))
    r = run_cli("data", "validate", f, "--decode", check=False)
    assert r.exit_code == 1
    assert f"record 0: {tmp_path / 'x.png'}: cannot decode image (cannot identify image file)" in r.output, r.output


def test_clean_reason_strips_decoder_noise():
    from pipelines.video import clean_reason

    raw = ("[14:08:33] /github/workspace/src/video/video_reader.cc:151: Check failed: st_nb >= 0 (-1381 vs. 0) "
           "ERROR cannot find video stream with wanted index: -1")
    assert clean_reason(RuntimeError(raw)) == "cannot find video stream with wanted index: -1"
    raw = "[Errno 1094995529] Invalid data found when processing input: 'avcodec_receive_frame()'"
    assert clean_reason(RuntimeError(raw)) == "invalid data found when processing input"
    raw = "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d1c2a0] moov atom not found"
    assert clean_reason(RuntimeError(raw)) == "moov atom not found"


# ---------------------------------------------------------------------------------------------------------------------
# 17. A hung decoder is stopped and named; decord is opt-in
def test_a_hung_decode_is_stopped_and_named(tmp_path, synth_world, monkeypatch):
    from pipelines import video as V

    release = threading.Event()

    def hang(self, indices):
        release.wait(60)  # a decoder that never returns (released at the end of the test)
        raise RuntimeError("released")
        yield  # noqa: unreachable - makes this a generator like the real one

    monkeypatch.setattr(V._PyAVReader, "frames", hang)
    V.clear_lru()  # an earlier test may have decoded this clip: the in-process cache would answer without decoding
    video = sorted((Path(synth_world["root"]) / "videos").iterdir())[0]
    f = _records(tmp_path, [str(video)])
    try:
        r = run_cli("data", "validate", f, "--decode", "--set", "video.decode_timeout_s=0.5", check=False)
    finally:
        release.set()
    assert r.exit_code == 1, r.output
    assert f"record 0: {video}: decoding did not finish within video.decode_timeout_s = 0.5 s (pyav)" in r.output, \
        r.output


def test_decord_is_opt_in(synth_world, monkeypatch):
    import sys

    from pipelines import video as V
    from pipelines.config import VideoConfig
    from pipelines.errors import VideoR1Error

    video = sorted((Path(synth_world["root"]) / "videos").iterdir())[0]
    assert V.sample_video(video, VideoConfig(), use_cache=False).meta["backend"] == "pyav"
    monkeypatch.setitem(sys.modules, "decord", None)  # as without the [decord] extra
    with pytest.raises(VideoR1Error, match=r"video.backend = decord, but decord cannot be imported"):
        V.sample_video(video, VideoConfig(backend="decord"), use_cache=False)


# ---------------------------------------------------------------------------------------------------------------------
# 4. A model path that does not exist fails at once, naming it
@pytest.mark.parametrize("name", ["nosuchdir", "./nosuchdir", "~/nosuchdir", "runs/a/b"])
def test_missing_local_model_fails_at_once(name, synth_world, tmp_path):
    r = run_cli("train", "sft", "--model", name, "--data", synth_world["sft"], "--root", synth_world["root"],
                "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1
    assert error_line(r.output) == f"error: model directory not found: {name}"


def test_hub_id_offline_says_offline(synth_world, tmp_path):
    r = run_cli("eval", "--bench", "synthetic", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--data",
                synth_world["test"], "--out", tmp_path / "eval", "--limit", "2", check=False)
    assert r.exit_code == 1
    line = error_line(r.output)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in line and "offline" in line


def test_hub_id_unreachable_says_offline_in_seconds(monkeypatch):
    from huggingface_hub import constants

    from pipelines.errors import VideoR1Error
    from pipelines.models import check_model_path

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(VideoR1Error, match=r"'Org/model' is not a local directory .* cannot be reached \(offline\?\)"):
        check_model_path("Org/model")


# ---------------------------------------------------------------------------------------------------------------------
# 13. Eval resume says what was done; two identical evals at once: the second refuses
def test_eval_resume_says_how_many_were_done(tiny_model_dir, synth_world, tmp_path):
    args = ["eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", synth_world["test"], "--out",
            tmp_path / "eval", "--limit", "2", *EVAL_SMALL]
    first = run_cli(*args)
    assert "resuming" not in first.output
    again = run_cli(*args)
    assert "resuming synthetic: 2 of 2 samples already done" in again.output and "0 to generate" in again.output


def test_second_identical_eval_refuses_while_the_first_runs(tiny_model_dir, synth_world, tmp_path):
    from pipelines.evaluate.runner import eval_lock

    out = tmp_path / "eval"
    with eval_lock(out):  # the first eval, still running
        r = run_cli("eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", synth_world["test"],
                    "--out", out, "--limit", "2", *EVAL_SMALL, check=False)
    assert r.exit_code == 1
    assert error_line(r.output) == f"error: {out} is being evaluated by another process right now"
    assert not (out / "synthetic.samples.jsonl").exists() and not runs_of("eval")
