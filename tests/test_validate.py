"""pipelines.validate and `videor1 data validate` / `videor1 data stats`: every error kind, report, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from pipelines.registry import Registry
from pipelines.validate import check_semantics, compute_stats, extract_answer, option_letter, validate_file


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run dirs (videor1-runs/ under the cwd) land in the test's tmp dir, not the repo."""
    monkeypatch.chdir(tmp_path)


def write_mp4(path: Path, frames: int = 6, size: int = 32) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), i * 30, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def write_png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    return path


def rec(i, **kw):
    base = {"problem_id": i, "problem": f"question {i}", "data_type": "video", "problem_type": "multiple choice",
            "options": ["A. red", "B. blue", "C. green"], "solution": "<answer>B</answer>",
            "path": "./videos/good.mp4", "data_source": "synthetic"}
    base.update(kw)
    return base


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "root"
    write_mp4(root / "videos" / "good.mp4")
    write_mp4(root / "videos" / "other.mp4", frames=4)
    write_png(root / "images" / "a.png")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    records = [
        rec(0),                                                                       # ok
        rec(1, problem="q1", path="./videos/other.mp4"),                              # ok
        rec(2, data_type="image", path="./images/a.png", problem_type="numerical", options=[],
            solution="<answer>3</answer>"),                                           # ok
        rec(3, problem_type="essay"),                                                 # schema
        rec(4, problem="q4", path="./videos/missing.mp4"),                            # missing_media
        rec(5, problem="q5", path="./videos/broken.mp4"),                             # undecodable (with --decode)
        rec(6, problem="q6", options=[]),                                             # mc_without_options
        rec(7, problem="q7", solution="<answer>E</answer>"),                          # answer_not_in_options
        rec(8, problem="q8", solution="B"),                                           # missing_answer_tags
        rec(0, problem="q9"),                                                         # duplicate_id
        rec(10, problem="question 0"),                                                # duplicate_question (of 0)
        rec(11, problem="q11", data_type="image"),                                    # data_type_mismatch
        rec(12, problem="q12", problem_type="numerical", solution="<answer>2</answer>"),  # options_on_non_mc (w)
        rec(13, problem="q13", options=["red", "B. blue"]),                           # unparsed_option (w)
        rec(14, problem="q14", path="./videos/clip.xyz"),                             # unknown_extension (w) + missing
    ]
    f = tmp_path / "records" / "train.json"
    f.parent.mkdir()
    f.write_text(json.dumps(records, indent=1))
    return {"root": root, "file": f, "records": records}


EXPECTED = {
    (3, "schema", "problem_type"),
    (4, "missing_media", "path"),
    (6, "mc_without_options", "options"),
    (7, "answer_not_in_options", "solution"),
    (8, "missing_answer_tags", "solution"),
    (9, "duplicate_id", "problem_id"),
    (10, "duplicate_question", "problem"),
    (11, "data_type_mismatch", "data_type"),
    (12, "options_on_non_mc", "options"),
    (13, "unparsed_option", "options.0"),
    (14, "unknown_extension", "path"),
    (14, "missing_media", "path"),
}


def test_every_kind_found(world):
    rep = validate_file(world["file"], world["root"])
    assert {(i.index, i.kind, i.field) for i in rep.issues} == EXPECTED
    assert rep.records == 15
    warn = {i.kind for i in rep.warnings}
    assert warn == {"options_on_non_mc", "unparsed_option", "unknown_extension"}
    dup = next(i for i in rep.issues if i.kind == "duplicate_id")
    assert dup.problem_id == 0 and "record 0" in dup.message
    assert next(i for i in rep.issues if i.kind == "duplicate_question").message.endswith("record 0")
    assert rep.counts()["missing_media"] == 2
    assert rep.media_checked == 6  # good, other, a.png, missing, broken, clip.xyz: each checked once
    d = rep.to_dict()
    assert d["errors"] == 9 and d["warnings"] == 3
    assert set(d["issues"][0]) == {"index", "problem_id", "kind", "field", "message", "severity"}


def test_decode_finds_undecodable_media(world):
    rep = validate_file(world["file"], world["root"], decode=True)
    kinds = {(i.index, i.kind) for i in rep.issues}
    assert (5, "undecodable_media") in kinds
    assert {(i.index, i.kind, i.field) for i in rep.issues if i.kind != "undecodable_media"} == EXPECTED
    assert all(i.kind != "undecodable_media" or i.index == 5 for i in rep.issues)  # good mp4 and png decode


def test_root_independent_of_cwd(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "records")  # media are not next to the records file nor in the cwd
    rep = validate_file(world["file"], world["root"])
    assert sum(i.kind == "missing_media" for i in rep.issues) == 2
    rep = validate_file(world["file"], tmp_path / "records")  # the wrong root: everything is missing
    assert sum(i.kind == "missing_media" for i in rep.issues) == 15


def test_invalid_json_is_reported(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(rec(0)) + "\n{oops\n")
    rep = validate_file(f, tmp_path)
    assert rep.issues[-1].kind == "invalid_json" and rep.issues[-1].index == 1


def test_pure_helpers():
    assert extract_answer("<think>x</think> <answer> B </answer>") == "B"
    assert extract_answer("B") is None
    assert [option_letter(o) for o in ["A. x", "(B) y", "c) z", "D: w", "no letter"]] == ["A", "B", "C", "D", None]
    assert check_semantics(rec(0)) == []
    assert check_semantics(rec(0, path="./a.gif")) == []  # gif: image or video
    assert [k for k, *_ in check_semantics(rec(0, data_type="image", path="./x.PNG"))] == []


def test_cli_validate_report_and_exit_codes(world, tmp_path):
    report = tmp_path / "out" / "report.json"
    res = run_cli("data", "validate", world["file"], "--root", world["root"], "--report", report, check=False)
    assert res.exit_code == 1
    assert "missing_media" in res.output and "9 errors, 3 warnings" in res.output
    data = json.loads(report.read_text())
    assert data["by_kind"]["missing_media"] == 2 and data["records"] == 15
    assert {(i["index"], i["kind"], i["field"]) for i in data["issues"]} == EXPECTED
    res = run_cli("data", "validate", world["file"], "--root", world["root"], "--allow-errors")
    assert res.exit_code == 0
    reg = Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")
    runs = reg.list_runs(kind="data-validate")
    assert len(runs) == 2 and runs[0]["summary"]["errors"] == 9
    m = reg.metrics_summary(runs[0]["id"])
    assert m["errors"]["last"] == 9 and m["issues/duplicate_id"]["last"] == 1
    arts = reg.artifacts_of(runs[0]["id"])
    assert "validation-report" in [a.kind for a in arts["outputs"]]
    assert any(a.kind == "external:records" for a in arts["inputs"])


def test_cli_validate_clean_file_and_default_root(tmp_path):
    root = tmp_path / "data"
    write_png(root / "img" / "a.png")
    f = root / "clean.jsonl"
    f.write_text(json.dumps(rec(0, data_type="image", path="./img/a.png")) + "\n")
    res = run_cli("data", "validate", f)  # root defaults to the file's directory
    assert res.exit_code == 0 and "0 errors" in res.output
    res = run_cli("data", "validate", "--data", f, "--decode")
    assert res.exit_code == 0 and "decoded" in res.output
    res = run_cli("data", "validate", check=False)
    assert res.exit_code == 1 and "no records file" in res.output


def test_stats_numbers(world, tmp_path):
    recs = [r for r in world["records"] if r["problem_type"] != "essay"]
    s = compute_stats(recs)
    assert s["records"] == 14
    assert s["by_data_type"] == {"video": 12, "image": 2}
    assert s["by_problem_type"] == {"multiple choice": 12, "numerical": 2}
    assert s["by_data_source"] == {"synthetic": 14}
    # videos: good.mp4 x8 (records 0 6 7 8 9 10 12 13), other, missing, broken, clip.xyz; record 11 is an 'image'
    video_paths = [r["path"] for r in recs if r["data_type"] == "video"]
    counts = {p: video_paths.count(p) for p in set(video_paths)}
    assert s["videos"]["unique"] == len(counts) == 5
    assert s["videos"]["questions_per_item_max"] == max(counts.values()) == 8
    assert s["videos"]["questions_per_item_mean"] == round(12 / 5, 4)
    assert s["images"] == {"unique": 2, "questions": 2, "questions_per_item_mean": 1.0, "questions_per_item_max": 1}
    assert s["unique_media"] == 7

    f = tmp_path / "ok.json"
    f.write_text(json.dumps(recs))
    res = run_cli("data", "stats", f, "--json")
    assert json.loads(res.output) == s
    res = run_cli("data", "stats", "--data", f)
    assert "multiple choice" in res.output and "85.7%" in res.output and "14 records, 7 unique media" in res.output


def test_stats_on_malformed_file_names_record(world):
    res = run_cli("data", "stats", world["file"], check=False)
    assert res.exit_code == 1 and "record 3" in res.output and "problem_type" in res.output
