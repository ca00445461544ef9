"""The model card of a REAL lineage: `data synth -> model tiny -> train sft -> train rl -> eval -> push --dry-run`
run through the CLI on the tiny model; what the card says is checked against the registry and the files."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import run_cli
from pipelines.registry import Registry

ABS_PATH = re.compile(r"(?<![\w.~-])/(tmp|home|work|root|Users|var|private|mnt)/")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    reg_path = d / "registry.db"
    common = ["--set", f"run.registry={reg_path}", "--set", f"run.output_dir={d / 'runs'}"]
    world = d / "world"
    run_cli("data", "synth", "--out", world, "--train", "8", "--test", "4", "--sft", "8", "--seed", "0", *common)
    run_cli("model", "tiny", "--out", d / "tiny-model", "--seed", "3", *common)
    run_cli("train", "sft", "--model", d / "tiny-model", "--data", world / "sft.json", "--root", world,
            "--max-steps", "2", "--out", d / "my-sft", "--set", "sft.per_device_batch_size=4",
            "--set", "sft.logging_steps=1", *common)
    run_cli("train", "rl", "--model", d / "my-sft", "--data", world / "rl.json", "--root", world, "--max-steps", "2",
            "--set", "rl.num_generations=2", "--set", "rl.max_completion_length=8", "--set", "rl.per_device_prompts=2",
            "--set", "rl.save_steps=1", "--set", f"rl.output_dir={d / 'my-rl'}", *common)
    run_cli("eval", "--model", d / "my-rl", "--data", world / "test.json", "--root", world, "--bench", "synthetic",
            "--set", "eval.max_new_tokens=8", *common)
    reg = Registry(reg_path)
    rl = reg.list_runs(kind="train-rl")[0]
    card = run_cli("push", rl["id"], "--repo-id", "me/tiny-r1", "--dry-run", *common).output
    return {"dir": d, "reg": reg, "card": card, "world": world, "rl": rl, "common": common}


def test_card_has_no_local_path(chain):
    card = chain["card"]
    assert str(chain["dir"]) not in card
    assert not ABS_PATH.search(card), ABS_PATH.search(card)


def test_card_base_model_is_the_first_model_no_training_run_produced(chain):
    card = chain["card"]
    base = [x for x in card.splitlines() if x.startswith("- Base model:")]
    assert len(base) == 1 and "`tiny-model`" in base[0] and "videor1 model tiny" in base[0] and "(seed 3)" in base[0]
    assert "my-sft" not in base[0]
    assert "- Model family: Qwen2.5-VL (`qwen2_5_vl`" in card


def test_card_evaluation_table_is_filled_from_the_eval_run(chain):
    reg, card = chain["reg"], chain["card"]
    ev = reg.list_runs(kind="eval")[0]
    results = json.loads(Path(ev["summary"]["results"]).read_text())["benchmarks"]["synthetic"]
    row = [x for x in card.splitlines() if x.startswith("| synthetic |")]
    assert row, card
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells == ["synthetic", f"{results['video-r1']['overall']:.4g}", f"{results['official']['overall']:.4g}",
                     f"{results['chance_overall']:.4g}", str(results["n"]), str(results["errors"])]
    assert 0 < results["chance_overall"] < 100
    assert "headline scoring: `video-r1`" in card


def test_card_lists_the_data_files_with_counts_and_hashes(chain):
    reg, card = chain["reg"], chain["card"]
    synth = reg.list_runs(kind="data-synth")[0]
    arts = {Path(a.path).name: a for a in reg.artifacts_of(synth["id"])["outputs"] if a.kind == "records"}
    for name, count in (("sft.json", 8), ("rl.json", 8), ("test.json", 4)):
        row = [x for x in card.splitlines() if x.startswith(f"| `{name}` |")]
        assert row, (name, card)
        assert f"| {count} |" in row[0] and arts[name].hash[:23] in row[0]
    assert "train-sft" in [x for x in card.splitlines() if x.startswith("| `sft.json` |")][0]
    assert "eval" in [x for x in card.splitlines() if x.startswith("| `test.json` |")][0]


def _commands(card: str) -> list[list[str]]:
    block = card.split("## Reproduce", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(c.replace("\\\n", " ")) for c in re.split(r"(?<!\\)\n", block.strip()) if c.strip()]


def test_reproduce_commands_are_self_contained_and_give_the_recorded_config(chain):
    """Each reproduce line, parsed as the CLI would, resolves (preset + --set + flags) to the recorded config of its
    stage on every recipe key; the chain runs on names only (tiny-model -> sft-model -> rl-model -> eval)."""
    from pipelines.config import load_config
    from pipelines.push import _NOT_READ, _NOT_RECIPE
    from pipelines.runs import flatten

    reg, cmds = chain["reg"], _commands(chain["card"])
    assert [c[:3] for c in cmds] == [["videor1", "model", "tiny"], ["videor1", "train", "sft"],
                                     ["videor1", "train", "rl"], ["videor1", "eval", "--preset"]]
    assert "--config" not in sum(cmds, [])
    flags = {"--model": "model.name_or_path", "--data": "data.file", "--root": "data.root", "--out": "sft.output_dir"}
    for argv, kind in zip(cmds[1:], ["train-sft", "train-rl", "eval"]):
        preset, sets, sc = None, [], {}
        i = 3 if kind != "eval" else 2
        while i < len(argv):
            if argv[i] == "--preset":
                preset = argv[i + 1]
            elif argv[i] == "--set":
                sets.append(argv[i + 1])
            else:
                sc[flags[argv[i]]] = argv[i + 1]
            i += 2
        got = flatten(load_config(preset=preset, overrides=sets, shortcuts=sc).model_dump(mode="json"))
        want = flatten(reg.get_run(reg.list_runs(kind=kind)[0]["id"])["config"])
        for k, v in want.items():
            if k in _NOT_RECIPE or k.split(".")[0] in _NOT_READ[kind]:
                continue
            assert got[k] == v, (kind, k, got[k], v)
        if kind == "train-sft":
            assert sc["model.name_or_path"] == "tiny-model" and sc["sft.output_dir"] == "sft-model"
            assert sc["data.file"] == "sft.json"
        if kind == "train-rl":
            assert sc["model.name_or_path"] == "sft-model" and "rl.output_dir=rl-model" in sets
        if kind == "eval":
            assert sc["model.name_or_path"] == "rl-model" and sc["data.file"] == "test.json"


def test_every_run_writes_metrics_jsonl_beside_it_matching_the_registry(chain):
    """metrics.jsonl in each run directory: one JSON object per log_metrics call, with step and time (EasyR1's file
    logger), the same values as the registry's SQLite rows."""
    reg = chain["reg"]
    for kind, name in (("train-sft", "loss"), ("train-rl", "reward")):
        run = reg.get_run(reg.list_runs(kind=kind)[0]["id"])
        lines = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert lines and all({"step", "time"} <= set(x) for x in lines)
        from_file = [(x["step"], x[name]) for x in lines if name in x]
        assert from_file == [(s, v) for s, v in reg.metrics(run["id"], [name])[name]], kind


def test_a_resumed_run_is_linked_to_the_run_it_continued(tiny_model_dir, synth_world, tmp_path):
    """`train rl --resume RUN_DIR`: the new run's parents include the run that wrote the checkpoint, so lineage and
    the model card list both runs (and the steps the first one made)."""
    reg_path = tmp_path / "registry.db"
    common = ["--set", f"run.registry={reg_path}", "--set", f"run.output_dir={tmp_path / 'runs'}",
              "--model", tiny_model_dir, "--data", synth_world["rl"], "--set", "rl.num_generations=2",
              "--set", "rl.max_completion_length=6", "--set", "rl.per_device_prompts=1", "--set", "rl.save_steps=1"]
    run_cli("train", "rl", "--max-steps", "2", *common)
    reg = Registry(reg_path)
    first = reg.get_run(reg.list_runs(kind="train-rl")[0]["id"])
    run_cli("train", "rl", "--max-steps", "3", "--resume", first["run_dir"], *common)
    second = [r for r in reg.list_runs(kind="train-rl") if r["id"] != first["id"]][0]
    assert reg.parents(second["id"]) == [first["id"]]
    assert [n["id"] for n in reg.lineage(second["id"])["next"]] == [first["id"]]
    card = run_cli("push", second["id"], "--repo-id", "me/x", "--dry-run", "--set", f"run.registry={reg_path}").output
    rows = [x for x in card.splitlines() if x.startswith("| train-rl")]
    assert len(rows) == 2 and f"`{first['id']}`" in rows[0] and "| 2 |" in rows[0]
    assert rows[1].startswith("| train-rl (resumed) |") and "| 3 |" in rows[1]
    assert "--resume auto" in card


def test_a_resumed_sft_run_is_linked_to_the_run_it_continued(tiny_model_dir, tmp_path):
    from pipelines.synth import synthesize

    w = synthesize(tmp_path / "w", train=4, test=2, seed=0, sft=8)
    reg_path = tmp_path / "registry.db"
    common = ["--set", f"run.registry={reg_path}", "--set", f"run.output_dir={tmp_path / 'runs'}",
              "--model", tiny_model_dir, "--data", w["sft"], "--out", tmp_path / "sft-out",
              "--set", "sft.per_device_batch_size=4", "--set", "sft.save_steps=1"]
    run_cli("train", "sft", "--max-steps", "2", *common)
    reg = Registry(reg_path)
    first = reg.list_runs(kind="train-sft")[0]["id"]
    run_cli("train", "sft", "--max-steps", "3", "--resume", "auto", *common)
    second = [r for r in reg.list_runs(kind="train-sft") if r["id"] != first][0]["id"]
    assert reg.parents(second) == [first]
