"""The synthetic world: Video-R1 record format, all problem types, decodable media, rotation, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines import synth as S

PROBLEM_TYPES = {"multiple choice", "numerical", "OCR", "free-form", "regression"}
KEYS = ["problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source"]


def _load(path) -> list[dict]:
    return json.loads(Path(path).read_text())


def _all(world) -> list[dict]:
    return _load(world["rl"]) + _load(world["sft"]) + _load(world["test"])


def _decode(path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _nearest_color(pix) -> str:
    names = list(S.COLORS)
    cols = np.array([S.COLORS[n] for n in names], dtype=int)
    return names[int(np.argmin(((cols - np.asarray(pix, dtype=int)) ** 2).sum(1)))]


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return S.synthesize(tmp_path_factory.mktemp("synth"), train=60, test=24, seed=0)


def test_return_value_and_files(synth_world, world):
    for w in (synth_world, world):
        root = Path(w["root"])
        for key in ("train", "rl", "sft", "test", "world", "media"):
            assert Path(w[key]).is_file(), key
        assert w["train"] == w["rl"] and Path(w["rl"]).name == "rl.json"
        assert json.loads(Path(w["world"]).read_text()) == w["manifest"]
        assert (root / "videos").is_dir() and (root / "images").is_dir()
    c = synth_world["counts"]
    assert (c["rl"], c["sft"], c["test"]) == (24, 6, 12)
    assert len(_load(synth_world["rl"])) == 24 and len(_load(synth_world["sft"])) == 6
    assert len(_load(synth_world["test"])) == 12


def test_record_schema(world):
    root = Path(world["root"])
    ids = set()
    for split in ("rl", "sft", "test"):
        for r in _load(world[split]):
            expect = KEYS[:5] + (["process"] if split == "sft" else []) + KEYS[5:]
            assert list(r) == expect, r
            assert isinstance(r["problem_id"], int) and r["problem_id"] not in ids
            ids.add(r["problem_id"])
            assert r["data_type"] in ("video", "image") and r["problem_type"] in PROBLEM_TYPES
            assert re.fullmatch(r"<answer>[^<>]+</answer>", r["solution"])
            assert r["path"].startswith("./") and (root / r["path"][2:]).is_file()
            assert r["path"].endswith(".mp4" if r["data_type"] == "video" else ".png")
            assert r["data_source"].startswith("synthetic/")
            ans = r["solution"][8:-9]
            if r["problem_type"] == "multiple choice":
                letters = [o.split(". ", 1)[0] for o in r["options"]]
                assert letters == list("ABCD"[: len(letters)]) and ans in letters
                assert "Options" not in r["problem"]
            else:
                assert r["options"] == []
            if r["problem_type"] in ("numerical", "regression"):
                assert re.fullmatch(r"\d+", ans)
            if split == "sft":
                assert re.fullmatch(r"<think>[^<>]+</think>", r["process"]) and len(r["process"]) < 120


def test_all_types_both_data_types_and_order_flag(synth_world, world):
    for w in (synth_world, world):
        recs = _all(w)
        assert {r["problem_type"] for r in recs} == PROBLEM_TYPES
        assert {r["data_type"] for r in recs} == {"video", "image"}
        test = _load(w["test"])
        assert {r["problem_type"] for r in test} == PROBLEM_TYPES  # a held-out set of 12 still has every type
    recs = _all(world)
    by_type = Counter((r["data_type"], r["problem_type"]) for r in recs)
    for pt in PROBLEM_TYPES:
        assert by_type[("video", pt)] + by_type[("image", pt)] > 0
    assert max(Counter(r["problem_type"] for r in recs).items(), key=lambda kv: kv[1])[0] == "multiple choice"
    sources = {r["data_source"] for r in recs}
    for src in ("synthetic/color", "synthetic/order/direction", "synthetic/order/first-color"):
        assert src in sources
    for r in recs:
        order_q = ("direction" in r["problem"] or "changes color" in r["problem"] or "Describe what" in r["problem"])
        assert ("order" in r["data_source"]) == order_q, r
        assert r["data_type"] == "video" or "order" not in r["data_source"]
    # chance levels in the manifest for every data_source used
    chance = world["manifest"]["chance"]
    assert sources <= set(chance)
    assert chance["synthetic/color"]["chance"] == 0.25 and chance["synthetic/order/direction"]["chance"] == 0.5
    assert chance["synthetic/order/first-color"]["order_blind_ceiling"] == 0.5
    assert all(chance[s]["order_dependent"] == ("order" in s) for s in chance)


def test_videos_shared_by_several_questions_and_splits_disjoint(world):
    paths = {s: [r["path"] for r in _load(world[s])] for s in ("rl", "sft", "test")}
    vids = Counter(p for p in paths["rl"] if p.endswith(".mp4"))
    assert max(vids.values()) >= 3 and sum(vids.values()) / len(vids) > 2
    assert not set(paths["rl"]) & set(paths["test"]) and not set(paths["rl"]) & set(paths["sft"])
    assert not set(paths["sft"]) & set(paths["test"])
    sft_q = {(r["problem"], r["path"]) for r in _load(world["sft"])}
    assert not sft_q & {(r["problem"], r["path"]) for r in _load(world["rl"])}


def test_video_frames_colour_and_direction(world):
    root = Path(world["root"])
    media = json.loads(Path(world["media"]).read_text())
    checked = 0
    for r in _all(world):
        if r["data_source"] not in ("synthetic/order/direction", "synthetic/color", "synthetic/order/first-color"):
            continue
        m = media[r["path"][2:]]
        frames = _decode(root / r["path"])
        assert frames.shape == (8, 56, 56, 3)
        s, y = m["square"], m["y"]
        centre = [frames[t, y + s // 2, m["xs"][t] + s // 2] for t in (0, 7)]
        colours = [_nearest_color(c) for c in centre]
        assert colours == [m["colors"][0], m["colors"][-1]]
        for c, name in zip(centre, colours):  # the colour survives H.264 almost exactly
            assert np.abs(c.astype(int) - np.array(S.COLORS[name])).max() < 25
        # the background is grey: no saturated pixel away from the square (2 px of chroma bleed at its edges)
        bg = frames[0].astype(int).copy()
        x0 = m["xs"][0]
        bg[max(0, y - 2):y + s + 2, max(0, x0 - 2):x0 + s + 2] = 128
        assert (bg.max(-1) - bg.min(-1)).max() < 60
        opt = {o[0]: o[3:] for o in r["options"]}
        ans = opt[r["solution"][8:-9]]
        if r["data_source"] == "synthetic/order/direction":
            moved_right = m["xs"][-1] > m["xs"][0]
            assert ans == ("right" if moved_right else "left")
            # find the square in the first and last decoded frame by its colour
            first_x = np.argwhere((frames[0].astype(int) - S.COLORS[colours[0]]).__abs__().max(-1) < 30)[:, 1].mean()
            last_x = np.argwhere((frames[7].astype(int) - S.COLORS[colours[1]]).__abs__().max(-1) < 30)[:, 1].mean()
            assert (last_x > first_x) == moved_right and abs(last_x - first_x) >= 7
        elif r["data_source"] == "synthetic/color":
            assert ans == colours[0] == colours[1]
        else:
            assert ans == colours[0] != colours[1]
        checked += 1
    assert checked >= 10


def test_images_and_ocr(world):
    from PIL import Image

    root = Path(world["root"])
    media = json.loads(Path(world["media"]).read_text())
    for r in _all(world):
        m = media[r["path"][2:]]
        if r["data_type"] == "image":
            img = np.asarray(Image.open(root / r["path"]))
            assert img.shape == (56, 56, 3) and img.dtype == np.uint8
        if r["problem_type"] == "OCR":
            assert r["solution"] == f"<answer>{m['word']}</answer>" and m["word"] in S.WORDS
            px = _decode(root / r["path"])[0] if r["data_type"] == "video" else img
            assert (px.max(-1) < 60).sum() > 40  # dark text drawn
        if r["data_source"] == "synthetic/image/count":
            assert r["solution"] == f"<answer>{m['n']}</answer>"
            mask = np.abs(img.astype(int) - S.COLORS[m["color"]]).max(-1) < 30
            assert mask.sum() == m["n"] * m["side"] ** 2


def test_options_rotate(world):
    recs = [r for r in _all(world) if r["problem_type"] == "multiple choice"]
    letters = Counter(r["solution"] for r in recs)
    assert len(letters) >= 3 and max(letters.values()) < 0.6 * len(recs)
    four = [r for r in recs if len(r["options"]) == 4]
    assert len({tuple(r["options"]) for r in four}) > 3  # option order itself is shuffled


def test_mix_follows_weights(tmp_path):
    w = S.synthesize(tmp_path / "w", train=200, test=10, seed=1, sft=0, image_fraction=0.25)
    c = w["manifest"]["counts"]["rl"]
    assert c["by_problem_type"] == {"OCR": 12, "free-form": 24, "multiple choice": 130, "numerical": 26,
                                    "regression": 8}
    assert c["by_data_type"] == {"image": 50, "video": 150}
    assert _load(w["sft"]) == []
    w2 = S.synthesize(tmp_path / "w2", train=20, test=0, seed=1, sft=0, mix={"OCR": 1.0}, image_fraction=0.0)
    assert {r["problem_type"] for r in _load(w2["rl"])} == {"OCR"}
    assert {r["data_type"] for r in _load(w2["rl"])} == {"video"}


def test_plan_and_pack_are_consistent():
    rng = np.random.default_rng(0)
    for n in (1, 5, 7, 33, 250):
        kinds = S.plan_kinds(n, S.DEFAULT_MIX, 0.25)
        assert sum(kinds.values()) == n
        scenes = S.pack_scenes(kinds, ("steady", "switch"), 3.35, rng)
        placed = Counter(k for _, ks in scenes for k in ks)
        for k in ("color", "direction", "first-color", "last-color", "count-frames", "describe", "distance"):
            assert placed[k] == kinds[k]
        for fam, ks in scenes:
            assert ks and len(ks) == len(set(ks)) and all(fam in S.KINDS[k].families for k in ks)
    assert S.largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}


def test_deterministic_and_seed_dependent(tmp_path):
    a = S.synthesize(tmp_path / "a", train=16, test=6, seed=5)
    b = S.synthesize(tmp_path / "b", train=16, test=6, seed=5)
    c = S.synthesize(tmp_path / "c", train=16, test=6, seed=6)
    for f in ("rl.json", "sft.json", "test.json", "world.json", "media.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")  # identical mp4 and png bytes
    assert (tmp_path / "a" / "rl.json").read_bytes() != (tmp_path / "c" / "rl.json").read_bytes()
    va = _decode(tmp_path / "a" / _load(a["rl"])[0]["path"])
    vc = _decode(tmp_path / "c" / _load(c["rl"])[0]["path"])
    assert not np.array_equal(va, vc)
    # re-synthesising into the same directory replaces the old world
    S.synthesize(tmp_path / "a", train=16, test=6, seed=5)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert b["manifest"]["seed"] == 5


def test_refuses_foreign_nonempty_dir(tmp_path):
    from pipelines.errors import VideoR1Error

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(VideoR1Error):
        S.synthesize(tmp_path / "x", train=4, test=2, seed=0)
    with pytest.raises(VideoR1Error):
        S.synthesize(tmp_path / "y", train=4, test=2, seed=0, mix={"essay": 1.0})


def test_cli_synth_registers_run(tmp_path):
    from conftest import run_cli

    from pipelines.registry import Registry

    out = tmp_path / "world"
    res = run_cli("data", "synth", "--out", out, "--train", 12, "--test", 6, "--seed", 3, "--sft", 4,
                  "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert "data synth" in res.output
    for f in ("rl.json", "sft.json", "test.json", "world.json"):
        assert (out / f).is_file()
    assert len(_load(out / "rl.json")) == 12 and len(_load(out / "sft.json")) == 4
    assert json.loads((out / "world.json").read_text())["seed"] == 3
    reg = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db")
    runs = reg.list_runs()
    assert len(runs) == 1 and runs[0]["kind"] == "data-synth" and runs[0]["status"] == "finished"
    assert runs[0]["summary"]["counts"]["records"] == 22 and runs[0]["summary"]["seed"] == 3
    arts = reg.artifacts_of(runs[0]["id"])["outputs"]
    assert [Path(a.path) for a in arts if a.kind == "dataset"] == [out.resolve()]
    assert sorted(Path(a.path).name for a in arts if a.kind == "records") == ["rl.json", "sft.json", "test.json"]
    assert reg.metrics(runs[0]["id"], ["records"])["records"][0][1] == 22
    # run.seed is the default seed; --seed overrides it
    run_cli("data", "synth", "--out", tmp_path / "w2", "--train", 12, "--test", 6, "--sft", 4,
            "--set", "run.seed=3", "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert (tmp_path / "w2" / "rl.json").read_bytes() == (out / "rl.json").read_bytes()


@pytest.mark.parametrize("frames", [128, 256])
def test_long_clips_keep_the_square_in_the_picture(tmp_path, frames):
    """At 128 / 256 frames one pixel per frame would carry the square out of a 56 px picture: it moves a whole
    number of pixels over the clip instead, and the questions stay answerable (distance = first-to-last x, counts
    and colours from the per-frame colours, direction from the positions)."""
    w = S.synthesize(tmp_path / "w", train=6, test=0, sft=2, seed=1, frames=frames)
    media = json.loads(Path(w["media"]).read_text())
    videos = {k: m for k, m in media.items() if m.get("xs")}
    assert videos
    for m in videos.values():
        assert 0 <= min(m["xs"]) and max(m["xs"]) + m["square"] <= m["size"]
        assert len(m["xs"]) == len(m["colors"]) == frames
        assert m["distance"] == abs(m["xs"][-1] - m["xs"][0]) > 0
        assert all(0 <= abs(b - a) <= 1 for a, b in zip(m["xs"], m["xs"][1:]))  # moves steadily, never jumps
        assert (m["xs"][-1] > m["xs"][0]) == (m["direction"] == "right")
    for r in _load(w["rl"]) + _load(w["sft"]):
        m = media[r["path"][2:]]
        answer = r["solution"][8:-9]
        if r["data_source"] == "synthetic/distance":
            assert int(answer) == m["distance"]
        elif r["data_source"] == "synthetic/count-frames":
            assert int(answer) == m["colors"].count(m["count_color"]) <= frames
    one = next(iter(videos))
    assert _decode(Path(w["root"]) / one).shape == (frames, 56, 56, 3)
    chance = w["manifest"]["chance"]["synthetic/distance"]["chance"]
    assert 0 < chance < 1


def test_probe_reports_visual_tokens_of_a_long_clip(tmp_path):
    from conftest import run_cli

    w = S.synthesize(tmp_path / "w", train=4, test=0, sft=0, seed=2, frames=256, image_fraction=0.0)
    clip = Path(w["root"]) / _load(w["rl"])[0]["path"]
    out = run_cli("data", "probe", clip, "--json", "--set", "video.fps=4", "--set", "video.max_frames=256",
                  "--set", "video.min_pixels=3136", "--set", "video.max_pixels=3136")
    info = json.loads(out.output)
    assert info["nframes"] == 256 and (info["resized_height"], info["resized_width"]) == (56, 56)
    assert info["visual_tokens"] == 256 // 2 * 4  # temporal patches x (56 / 14)^2 / merge^2


# -- the shortcut world (issue 25) -------------------------------------------------------------------------------------
# sha256 over rl/sft/test/world/media.json of synthesize(train=16, test=6, seed=5) as main wrote it before the shortcut
# option existed: the default world must stay byte-for-byte what it was.
DEFAULT_WORLD_DIGEST = "40bdf1a45d552aa06cdbc0b1ba59e8a5b9ac897dca0be79333e55ea55b78d1b7"


def test_default_world_is_unchanged_by_the_shortcut_option(tmp_path):
    S.synthesize(tmp_path, train=16, test=6, seed=5)
    h = hashlib.sha256()
    for f in ("rl.json", "sft.json", "test.json", "world.json", "media.json"):
        h.update((tmp_path / f).read_bytes())
    assert h.hexdigest() == DEFAULT_WORLD_DIGEST
    assert not (tmp_path / "shortcut.json").exists()
    assert "shortcut" not in json.loads((tmp_path / "world.json").read_text())


@pytest.fixture(scope="module")
def shortcut_world(tmp_path_factory):
    return S.synthesize(tmp_path_factory.mktemp("shortcut"), train=400, test=40, sft=40, seed=1, shortcut=0.75)


def test_shortcut_world_order_answers_follow_the_majority_colour(shortcut_world):
    media = _load(shortcut_world["media"])
    clips = [m for m in media.values() if m["family"] in ("steady", "switch")]
    majority = [max(dict.fromkeys(m["colors"]), key=m["colors"].count) for m in clips]
    follows = [m["direction"] == S.PREFERRED_DIRECTION[c] for m, c in zip(clips, majority)]
    switches = [m for m in clips if m["switch_at"] is not None]
    late = [m["switch_at"] > len(m["colors"]) / 2 for m in switches]
    assert all(m["switch_at"] != len(m["colors"]) / 2 for m in switches)  # never a tie
    assert 0.65 < sum(follows) / len(follows) < 0.85 and 0.6 < sum(late) / len(late) < 0.9
    # the frames show what the parameters say (first frame's colour, direction of travel)
    rec = next(r for r in _load(shortcut_world["rl"]) if r["data_source"] == "synthetic/order/first-color")
    m = media[rec["path"][2:]]
    v = _decode(Path(shortcut_world["root"]) / rec["path"])
    y, x, s = m["y"], m["xs"][0], m["square"]
    assert _nearest_color(v[0, y + s // 2, x + s // 2]) == m["colors"][0]


def test_shortcut_world_reports_the_shortcut_beside_chance(shortcut_world):
    man = shortcut_world["manifest"]
    assert man["params"]["shortcut"] == 0.75 and man["files"]["shortcut"] == "shortcut.json"
    block = man["shortcut"]["by_data_source"]
    assert set(block) == set(S.SHORTCUT_RULES)
    rows = _load(shortcut_world["shortcut"])
    recs = {str(r["problem_id"]): r for split in ("rl", "sft", "test") for r in _load(shortcut_world[split])}
    for split in ("rl", "test"):
        for src, row in block.items():
            mine = [v for v in rows[split].values() if v["data_source"] == src]
            assert row["accuracy"][split] == pytest.approx(sum(v["score"] for v in mine) / len(mine), abs=1e-4)
            assert row["chance"] == man["chance"][src]["chance"]
        # every order-dependent record of the split has its shortcut answer, and only those
        order = [r for r in _load(shortcut_world[split]) if "order" in r["data_source"]]
        assert sorted(rows[split]) == sorted(str(r["problem_id"]) for r in order)
    acc = block["synthetic/order/direction"]["accuracy"]["rl"]
    assert 0.6 < acc < 0.9 and acc > block["synthetic/order/direction"]["chance"]
    # a multiple-choice row: its gold is the option the record's solution names; score = shortcut == gold
    pid, row = next((k, v) for k, v in rows["rl"].items() if v["data_source"] == "synthetic/order/last-color")
    rec = recs[pid]
    letter = re.search(r"<answer>(.*)</answer>", rec["solution"]).group(1)
    assert f"{letter}. {row['gold']}" in rec["options"]
    assert row["score"] == float(row["shortcut"] == row["gold"])


def test_shortcut_strength_extremes_and_errors(tmp_path):
    for strength, expected in ((1.0, 1.0), (0.0, 0.0)):
        w = S.synthesize(tmp_path / str(strength), train=60, test=4, sft=4, seed=2, shortcut=strength)
        block = w["manifest"]["shortcut"]["by_data_source"]
        for src in ("synthetic/order/direction", "synthetic/order/first-color", "synthetic/order/last-color"):
            assert block[src]["accuracy"]["rl"] == expected, src
    # re-synthesising the default world into a shortcut world's directory removes its shortcut.json
    S.synthesize(tmp_path / "1.0", train=8, test=4, sft=4, seed=2)
    assert not (tmp_path / "1.0" / "shortcut.json").exists()
    from pipelines.errors import VideoR1Error

    with pytest.raises(VideoR1Error, match="probability"):
        S.synthesize(tmp_path / "bad", train=4, test=2, seed=0, shortcut=1.5)
    with pytest.raises(VideoR1Error, match="3 frames"):
        S.synthesize(tmp_path / "bad2", train=4, test=2, seed=0, shortcut=0.75, frames=2)
