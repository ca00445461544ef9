"""pipelines.records: loading JSON / JSONL through datasets, errors naming file/index/field, paths, round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.errors import DataError
from pipelines.records import (
    Record,
    default_root,
    detect_format,
    iter_raw_records,
    json_columns,
    load_records,
    record_dict,
    resolve_media,
    write_records,
)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run dirs (videor1-runs/ under the cwd) land in the test's tmp dir, not the repo."""
    monkeypatch.chdir(tmp_path)


def rec(i, **kw):
    base = {
        "problem_id": i, "problem": f"What colour is object {i}?", "data_type": "video",
        "problem_type": "multiple choice", "options": ["A. red", "B. blue"], "solution": "<answer>A</answer>",
        "path": f"./videos/v{i % 2}.mp4", "data_source": "synthetic",
    }
    base.update(kw)
    return base


RECORDS = [
    rec(0),
    rec(1, problem_type="numerical", options=[], solution="<answer>3</answer>"),
    rec(2, data_type="image", path="./images/a.png", problem_type="OCR", options=[], solution="<answer>hi</answer>",
        process="<think>read it</think>", extra_meta={"k": [1, 2]}),
    rec(3, problem_type="free-form", options=[], solution="<answer>a dog</answer>", score=1),
    rec(4, problem_type="regression", options=[], solution="<answer>2.5</answer>", score=0.5, flag=True),
]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "ds-cache"


def _write_json(path: Path, records, indent=None):
    path.write_text(json.dumps(records, indent=indent))
    return path


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "jsonl-as-json", "json-indented"])
def test_load_formats(tmp_path, cache, kind):
    if kind == "json":
        f = _write_json(tmp_path / "r.json", RECORDS)
    elif kind == "json-indented":
        f = _write_json(tmp_path / "r.json", RECORDS, indent=2)
    elif kind == "jsonl":
        f = _write_jsonl(tmp_path / "r.jsonl", RECORDS)
    else:
        f = _write_jsonl(tmp_path / "r.json", RECORDS)
    assert detect_format(f) == ("json" if kind.startswith("json-") or kind == "json" else "jsonl")
    ds = load_records(f, cache_dir=cache)
    assert len(ds) == 5
    assert ds.features["problem_id"].dtype == "int64"
    assert ds[0]["options"] == ["A. red", "B. blue"] and ds[1]["options"] == []
    assert ds[2]["process"] == "<think>read it</think>" and ds[0]["process"] is None
    assert ds[0]["data_source"] == "synthetic"
    # extra keys carried through: scalar types kept, nested values JSON-encoded
    assert ds.features["score"].dtype == "float64" and ds[4]["score"] == 0.5
    assert ds[4]["flag"] is True and ds[0]["flag"] is None
    assert json_columns(ds) == ["extra_meta"]
    assert record_dict(ds[2], json_columns(ds))["extra_meta"] == {"k": [1, 2]}


def test_round_trip_json_and_jsonl(tmp_path, cache):
    f = _write_json(tmp_path / "r.json", RECORDS)
    ds = load_records(f, cache_dir=cache)
    for name in ("out.json", "out.jsonl"):
        n = write_records(ds, tmp_path / name)
        assert n == 5
        back = [o for _, o in iter_raw_records(tmp_path / name)]
        assert back == RECORDS  # 1 == 1.0 for the int-or-float 'score' column
    assert json.loads((tmp_path / "out.json").read_text()) == RECORDS  # Video-R1's own reader sees a JSON list


def test_problem_id_types(tmp_path, cache):
    strs = [rec(0, problem_id="q-0"), rec(1, problem_id="q-1")]
    ds = load_records(_write_json(tmp_path / "s.json", strs), cache_dir=cache)
    assert ds.features["problem_id"].dtype == "string" and ds[0]["problem_id"] == "q-0"
    mixed = [rec(0, problem_id=7), rec(1, problem_id="q-1")]
    ds = load_records(_write_json(tmp_path / "m.json", mixed), cache_dir=cache)
    assert ds["problem_id"] == ["7", "q-1"]  # documented: a mixed file becomes a string column


def test_empty_options_everywhere_and_no_process(tmp_path, cache):
    recs = [rec(i, problem_type="numerical", options=[], solution="<answer>1</answer>") for i in range(3)]
    ds = load_records(_write_json(tmp_path / "r.json", recs), cache_dir=cache)
    assert ds["options"] == [[], [], []] and "process" not in ds.column_names


def test_reload_uses_cache_and_sees_changes(tmp_path, cache):
    f = _write_json(tmp_path / "r.json", RECORDS)
    assert len(load_records(f, cache_dir=cache)) == 5
    assert len(load_records(f, cache_dir=cache)) == 5
    _write_json(f, RECORDS[:2])
    os.utime(f, ns=(1, 1))  # a new mtime/size identity
    assert len(load_records(f, cache_dir=cache)) == 2


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"problem_type": "essay"}, "problem_type"),
        ({"data_type": "audio"}, "data_type"),
        ({"options": "A. red"}, "options"),
        ({"problem_id": [1]}, "problem_id"),
        ({"solution": None}, "solution"),
    ],
)
def test_malformed_record_names_file_index_field(tmp_path, cache, bad, field):
    recs = [rec(0), rec(1), rec(2, **bad)]
    f = _write_json(tmp_path / "bad.json", recs)
    with pytest.raises(DataError) as ei:
        load_records(f, cache_dir=cache)
    e = ei.value
    assert e.index == 2 and e.field == field and e.file == str(f.resolve())
    assert "record 2" in str(e) and field in str(e) and "bad.json" in str(e)


def test_missing_field_and_not_an_object(tmp_path, cache):
    r = rec(1)
    del r["path"]
    f = _write_jsonl(tmp_path / "bad.jsonl", [rec(0), r])
    with pytest.raises(DataError) as ei:
        load_records(f, cache_dir=cache)
    assert (ei.value.index, ei.value.field) == (1, "path") and "missing" in str(ei.value)
    f2 = _write_json(tmp_path / "list.json", [rec(0), [1, 2]])
    with pytest.raises(DataError) as ei:
        load_records(f2, cache_dir=cache)
    assert ei.value.index == 1


def test_invalid_json_names_record(tmp_path, cache):
    f = tmp_path / "broken.json"
    f.write_text("[" + json.dumps(rec(0)) + ",\n" + json.dumps(rec(1))[:-5] + "]")
    with pytest.raises(DataError) as ei:
        load_records(f, cache_dir=cache)
    assert ei.value.index == 1 and "broken.json" in str(ei.value)
    g = tmp_path / "broken.jsonl"
    g.write_text(json.dumps(rec(0)) + "\n{not json\n")
    with pytest.raises(DataError) as ei:
        list(iter_raw_records(g))
    assert ei.value.index == 1 and "line 2" in str(ei.value)
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.json", cache_dir=cache)


def test_streaming_parser_across_chunk_boundaries(tmp_path, monkeypatch):
    import pipelines.records as records

    monkeypatch.setattr(records, "_CHUNK", 7)  # every record crosses several chunk boundaries
    recs = [rec(i, problem="x" * (i * 13), process="<think>" + "é" * i + "</think>") for i in range(40)]
    f = _write_json(tmp_path / "r.json", recs, indent=1)
    assert [o for _, o in iter_raw_records(f)] == recs
    g = tmp_path / "nums.json"
    g.write_text("[1234567, 89]")
    assert [o for _, o in iter_raw_records(g)] == [1234567, 89]


def test_validate_false_skips_schema(tmp_path, cache):
    f = _write_json(tmp_path / "r.json", [rec(0, problem_type="essay")])
    ds = load_records(f, validate=False, cache_dir=cache)
    assert ds[0]["problem_type"] == "essay"


def test_resolve_media_against_root_not_cwd(tmp_path, monkeypatch):
    root = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = rec(0, path="./LLaVA-Video-178K/sub/x.mp4")
    assert resolve_media(r, root) == root.resolve() / "LLaVA-Video-178K" / "sub" / "x.mp4"
    assert resolve_media(r, "data") == (elsewhere / "data" / "LLaVA-Video-178K/sub/x.mp4")  # relative root
    assert resolve_media("Math/a.png", root) == root.resolve() / "Math" / "a.png"
    assert resolve_media(".\\Chart\\b.png", root) == root.resolve() / "Chart" / "b.png"
    assert resolve_media({"path": "/abs/v.mp4"}, root) == Path("/abs/v.mp4")
    assert default_root(tmp_path / "sub" / "r.json") == (tmp_path / "sub").resolve()
    with pytest.raises(DataError):
        resolve_media({"path": None}, root)


def test_write_records_from_models_and_dicts(tmp_path):
    models = [Record.model_validate(r) for r in RECORDS[:3]]
    write_records(models, tmp_path / "m.jsonl")
    back = [o for _, o in iter_raw_records(tmp_path / "m.jsonl")]
    assert back[2]["extra_meta"] == {"k": [1, 2]} and "process" not in back[0]
    write_records(iter(RECORDS), tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text()) == RECORDS
    write_records([], tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text()) == []


def test_check_skip_rate_judges_the_fraction_after_enough_samples():
    from pipelines.errors import SKIP_CHECK_MIN_SAMPLES, check_skip_rate

    big = 10_000
    # too early to judge: fewer than SKIP_CHECK_MIN_SAMPLES seen of a large set, even if all were skipped
    check_skip_rate(SKIP_CHECK_MIN_SAMPLES - 1, SKIP_CHECK_MIN_SAMPLES - 1, 0.1, dataset_size=big, file="a.json")
    # at the threshold exactly: allowed (more than, not at least)
    check_skip_rate(10, 100, 0.1, dataset_size=big, file="a.json")
    with pytest.raises(DataError) as e:
        check_skip_rate(11, 100, 0.1, dataset_size=big, file="a.json", example="record 7: gone")
    assert str(e.value) == ("a.json: skipped 11 of 100 training samples so far (e.g. record 7: gone), more than "
                            "data.max_skip_fraction = 0.1")
    assert "data.max_skip_fraction=1" in e.value.hint
    # a set smaller than the minimum is judged once all of it was seen
    check_skip_rate(3, 3, 0.1, dataset_size=4, file="a.json")
    with pytest.raises(DataError):
        check_skip_rate(3, 4, 0.1, dataset_size=4, file="a.json")
    # 1 = never stop
    check_skip_rate(500, 500, 1.0, dataset_size=big, file="a.json")
