"""`videor1 train sft`: assistant-only labels, batching of mixed media, visual inputs in the loss forward, skips,
registry lineage, resume, and learning on the synthetic world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def cot_world(tmp_path_factory):
    """A synthetic world with 64 gold-CoT records: 48 to train on, 16 held out (same media root)."""
    from pipelines.synth import synthesize

    out = tmp_path_factory.mktemp("cot-world")
    w = synthesize(out, train=4, test=4, seed=1, sft=64)
    recs = json.loads(Path(w["sft"]).read_text())
    (out / "train.json").write_text(json.dumps(recs[:48]))
    (out / "heldout.json").write_text(json.dumps(recs[48:]))
    return {"root": str(out), "train": str(out / "train.json"), "heldout": str(out / "heldout.json"), "records": recs}


def _cfg(model_dir, data, **sets):
    from pipelines.config import load_config

    sc = {"model.name_or_path": str(model_dir), "data.file": str(data)}
    sc.update(sets)
    return load_config(shortcuts=sc)


def _dataset(cfg, processor):
    from pipelines.sft import SftDataset

    return SftDataset(cfg.data.file, cfg, processor, cfg.data_root())


# ---------------------------------------------------------------------------------------------------------------------
def test_labels_cover_exactly_the_assistant_turn(tiny_model_dir, cot_world):
    from pipelines.models import load_processor
    from pipelines.prompts import build_messages

    proc = load_processor(tiny_model_dir)
    tok = proc.tokenizer
    cfg = _cfg(tiny_model_dir, cot_world["train"])
    ds = _dataset(cfg, proc)
    kinds = set()
    for i in range(len(ds)):
        rec = ds.record(i)
        if rec["data_type"] in kinds:
            continue
        kinds.add(rec["data_type"])
        ex = ds[i]
        ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
        target = rec["process"] + "\n" + rec["solution"]
        n_lab = sum(1 for x in labels if x != -100)
        # exactly a suffix is labelled, and it is the assistant content + <|im_end|>
        assert all(x == -100 for x in labels[: len(ids) - n_lab]) and labels[len(ids) - n_lab:] == ids[len(ids) - n_lab:]
        assert tok.decode(ids[len(ids) - n_lab:]) == target + "<|im_end|>"
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        # the unlabelled part is system + user (with every media token) + the assistant header
        prompt = tok.decode(ids[: len(ids) - n_lab])
        assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        pad = "<|video_pad|>" if rec["data_type"] == "video" else "<|image_pad|>"
        pad_id = tok.convert_tokens_to_ids(pad)
        n_media = ids.count(pad_id)
        assert n_media > 1 and all(labels[k] == -100 for k, t in enumerate(ids) if t == pad_id)
        # the whole sequence is the chat template's rendering (placeholder expanded), minus the trailing "\n"
        full = proc.apply_chat_template(build_messages(rec, "video-r1", "sft"), tokenize=False)
        assert tok.decode(ids) + "\n" == full.replace(pad, pad * n_media)
        mm = ex["mm_token_type_ids"].tolist()
        assert sum(1 for t in mm if t) == n_media and len(mm) == len(ids)
    assert kinds == {"video", "image"}


def test_collator_pads_right_and_concatenates_visual_inputs(tiny_model_dir, cot_world):
    from pipelines.models import load_processor
    from pipelines.sft import SftCollator, skip_marker

    proc = load_processor(tiny_model_dir)
    ds = _dataset(_cfg(tiny_model_dir, cot_world["train"]), proc)
    vids = [i for i in range(len(ds)) if ds.record(i)["data_type"] == "video"][:2]
    imgs = [i for i in range(len(ds)) if ds.record(i)["data_type"] == "image"][:1]
    items = [ds[vids[0]], ds[imgs[0]], skip_marker(77, "media", "gone"), ds[vids[1]]]
    pad_id = proc.tokenizer.pad_token_id
    b = SftCollator(pad_id)(items)
    assert b["skipped"] == [("77", "media", "gone")]
    kept = [items[0], items[1], items[3]]
    width = max(len(it["input_ids"]) for it in kept)
    assert b["input_ids"].shape == (3, width) == b["labels"].shape == b["mm_token_type_ids"].shape
    for row, it in enumerate(kept):
        n = len(it["input_ids"])
        assert torch.equal(b["input_ids"][row, :n], it["input_ids"]) and (b["input_ids"][row, n:] == pad_id).all()
        assert torch.equal(b["labels"][row, :n], it["labels"]) and (b["labels"][row, n:] == -100).all()
        assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
        assert (b["mm_token_type_ids"][row, n:] == 0).all()
    assert torch.equal(b["pixel_values_videos"], torch.cat([items[0]["pixel_values_videos"],
                                                            items[3]["pixel_values_videos"]]))
    assert b["video_grid_thw"].shape == (2, 3) and b["second_per_grid_ts"].shape == (2,)
    assert b["image_grid_thw"].shape == (1, 3) and torch.equal(b["pixel_values"], items[1]["pixel_values"])
    # the batch is a valid forward: the loss equals the mean of the per-sample losses weighted by label counts
    from pipelines.models import load_model

    model = load_model(_cfg(tiny_model_dir, cot_world["train"]).model)
    fwd = {k: v for k, v in b.items() if k != "skipped"}
    with torch.no_grad():
        batched = model(**fwd).loss
        per, counts = [], []
        for it in kept:
            one = SftCollator(pad_id)([it])
            one.pop("skipped")
            per.append(model(**one).loss)
            counts.append(int((it["labels"][1:] != -100).sum()))
    expect = sum(p * c for p, c in zip(per, counts)) / sum(counts)
    assert torch.allclose(batched, expect, atol=1e-4)


def test_all_skipped_batch_is_empty_but_countable():
    from pipelines.sft import SftCollator, skip_marker

    b = SftCollator(0)([skip_marker(1, "too_long"), None])
    assert b["input_ids"].numel() == 0 and b["labels"].ne(-100).sum() == 0 and len(b["skipped"]) == 2


def test_visual_inputs_reach_the_loss_forward(tiny_model_dir, cot_world, tmp_path, monkeypatch):
    """Forward hook on the model: every training forward gets pixel_values_videos + video_grid_thw (and labels)."""
    import pipelines.models as M
    from pipelines.sft import run_sft

    seen: list[dict] = []
    real = M.load_model

    def hooked(*a, **kw):
        model = real(*a, **kw)

        def pre(module, args, kwargs):
            if module.training:
                seen.append({k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in kwargs.items()
                             if k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "labels",
                                      "pixel_values", "mm_token_type_ids")})

        model.register_forward_pre_hook(pre, with_kwargs=True)
        return model

    monkeypatch.setattr(M, "load_model", hooked)
    cfg = _cfg(tiny_model_dir, cot_world["train"], **{"sft.max_steps": 2, "sft.per_device_batch_size": 8,
                                                      "sft.save_steps": 100, "sft.logging_steps": 1,
                                                      "data.shuffle": False})
    res = run_sft(cfg, None, output_dir=tmp_path / "out")
    assert res.global_step == 2 and len(seen) == 2
    for kw in seen:
        assert kw["pixel_values_videos"][0] > 0 and kw["video_grid_thw"][1] == 3 and "labels" in kw
        assert kw["second_per_grid_ts"] == (kw["video_grid_thw"][0],)
        assert "mm_token_type_ids" in kw


def test_cli_sft_skips_broken_records_and_records_lineage(tiny_model_dir, cot_world, tmp_path):
    """Missing media and an over-long sample are skipped and counted (never replaced); the model artifact's lineage
    names the records and the base model; the saved model loads and generates."""
    from pipelines.registry import Registry

    recs = json.loads(Path(cot_world["train"]).read_text())[:10]
    recs[2] = dict(recs[2], path="./videos/nope.mp4", data_type="video")
    recs[5] = dict(recs[5], process="<think>" + "very long " * 400 + "</think>")
    data = tmp_path / "cot.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "model"
    r = run_cli("train", "sft", "--model", tiny_model_dir, "--data", data, "--root", cot_world["root"],
                "--max-steps", "2", "--out", out, "--set", "sft.per_device_batch_size=5",
                "--set", "sft.max_length=600", "--set", "sft.logging_steps=1", "--set", "data.shuffle=false",
                "--set", "data.max_skip_fraction=0.5", "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert "train sft" in r.output
    reg = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db")
    run = reg.list_runs(kind="train-sft")[0]
    assert run["status"] == "finished"
    s = run["summary"]
    assert s["skipped"]["train"] == {"media": 1, "too_long": 1} and s["steps"] == 2
    m = reg.metrics(run["id"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "skipped"} <= set(m)
    arts = reg.artifacts_of(run["id"])
    model_art = [a for a in arts["outputs"] if a.kind == "model"]
    assert len(model_art) == 1 and Path(model_art[0].path) == out.resolve()
    inputs = {(a.kind, a.path) for a in arts["inputs"]}
    assert ("external:records", str(data.resolve())) in inputs
    assert ("external:model", str(Path(tiny_model_dir).resolve())) in inputs
    _loads_and_generates(out, cot_world)


def test_cli_sft_stops_when_most_samples_are_skipped(tiny_model_dir, cot_world, tmp_path):
    """Record paths resolved against the wrong folder: every sample is skipped. Training must stop with one readable
    line naming the records file, the count and the first failing record, and save no model (it would have learned
    nothing); the run is recorded as failed."""
    from pipelines.registry import Registry

    data = tmp_path / "cot.json"  # copied away from its media: ./videos/... now resolve against tmp_path
    data.write_text(Path(cot_world["train"]).read_text())
    out = tmp_path / "model"
    r = run_cli("train", "sft", "--model", tiny_model_dir, "--data", data, "--max-steps", "10", "--out", out,
                "--set", "sft.per_device_batch_size=16", "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1
    text = " ".join(r.output.split())
    assert "Traceback" not in r.output
    assert f"{data}: skipped 48 of 48 training samples so far (e.g. record " in text  # judged once all 48 are seen
    assert "more than data.max_skip_fraction = 0.1" in text and "cannot read media" in text
    assert "data.max_skip_fraction=1" in text  # the hint says how to go on anyway
    assert not (out / "model.safetensors").exists()
    run = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db").list_runs(kind="train-sft")[0]
    assert run["status"] == "failed" and "max_skip_fraction" in run["error"]


def test_cli_sft_lora_trains_the_language_model_and_saves_merged_weights(tiny_model_dir, cot_world, tmp_path):
    """model.lora.enabled in SFT: adapters on the language model's projections only (the vision MLPs share their names
    and are excluded), merged into plain weights with the base's keys, loadable and generating without peft."""
    from safetensors.torch import load_file

    out = tmp_path / "model"
    run_cli("train", "sft", "--model", tiny_model_dir, "--data", cot_world["train"], "--root", cot_world["root"],
            "--max-steps", "3", "--out", out, "--set", "sft.per_device_batch_size=4", "--set", "sft.learning_rate=0.01",
            "--set", "sft.warmup_ratio=0", "--set", "model.lora.enabled=true", "--set", "model.lora.r=4",
            "--set", "model.lora.alpha=8", "--set", "model.lora.dropout=0.0",
            "--set", f"run.output_dir={tmp_path / 'runs'}")
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all("visual" not in k and any(t in k for t in targets) for k in changed), sorted(changed)
    _loads_and_generates(out, cot_world)


def _loads_and_generates(model_dir, world):
    from pipelines.config import load_config
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.models import decode_media, load_model, load_processor
    from pipelines.prompts import build_messages

    cfg = load_config(shortcuts={"model.name_or_path": str(model_dir)})
    proc = load_processor(model_dir)
    backend = HFBackend(load_model(cfg.model), proc)
    rec = json.loads(Path(world["heldout"]).read_text())[0]
    prompt = proc.apply_chat_template(build_messages(rec, "video-r1", "eval"), tokenize=False,
                                      add_generation_prompt=True)
    out = backend.generate([prompt], [decode_media(rec, cfg, world["root"])], Sampling(max_new_tokens=8,
                                                                                      temperature=0))
    assert len(out[0][0].token_ids) >= 1
    return out[0][0].text


# ---------------------------------------------------------------------------------------------------------------------
def test_sft_lowers_heldout_loss_then_annotate_and_sft_chain(tiny_model_dir, cot_world, tmp_path):
    """SFT on the synthetic world (fixed seed) lowers the held-out loss by a wide margin; the model is then a teacher
    whose kept traces (annotate, hf backend) train a second SFT that loads and generates."""
    from pipelines.registry import Registry

    first = tmp_path / "sft"
    runs = f"run.output_dir={tmp_path / 'runs'}"
    run_cli("train", "sft", "--model", tiny_model_dir, "--data", cot_world["train"], "--root", cot_world["root"],
            "--eval-data", cot_world["heldout"], "--max-steps", "30", "--out", first,
            "--set", "sft.per_device_batch_size=8", "--set", "sft.learning_rate=3e-3", "--set", "sft.save_steps=1000",
            "--set", runs)
    reg = Registry(os.environ["VIDEOR1_HOME"] + "/registry.db")
    s = reg.list_runs(kind="train-sft")[0]["summary"]
    assert s["eval_loss_end"] < s["eval_loss_start"] - 1.5, s  # measured: 6.55 -> 2.81 in 40 steps
    ev = reg.metrics(reg.list_runs(kind="train-sft")[0]["id"])["eval_loss"]
    assert ev[0][0] == 0 and len(ev) >= 2

    # A teacher: the model above, fitted to 4 records (so that it answers some of them right), annotates them.
    four = tmp_path / "four.json"
    four.write_text(json.dumps(cot_world["records"][:4]))
    teacher = tmp_path / "teacher"
    run_cli("train", "sft", "--model", first, "--data", four, "--root", cot_world["root"], "--max-steps", "60",
            "--out", teacher, "--set", "sft.per_device_batch_size=4", "--set", "sft.learning_rate=5e-3",
            "--set", "sft.warmup_ratio=0.1", "--set", "sft.save_steps=1000", "--set", runs)
    # annotate asks with the template's eval wording (Video-R1's CoT script); a 0.2 M-param teacher only answers the
    # exact wording it was fitted on, so this test uses a template whose eval copy is the train copy.
    import yaml

    from pipelines.prompts import PROMPT_DIR

    tpl = yaml.safe_load((PROMPT_DIR / "video-r1.yaml").read_text())
    tpl.pop("eval_question_template")
    tpl["name"] = "video-r1-one-wording"
    (tmp_path / "tpl.yaml").write_text(yaml.safe_dump(tpl))
    ann = tmp_path / "ann" / "cot"
    run_cli("annotate", "--data", four, "--root", cot_world["root"], "--teacher", teacher,
            "--backend", "hf", "--out", ann, "--set", "annotate.temperature=0", "--set", "annotate.max_new_tokens=40",
            "--set", f"prompt.template={tmp_path / 'tpl.yaml'}", "--set", runs)
    cot = json.loads(Path(str(ann) + ".cot.json").read_text())
    assert len(cot) >= 1, Path(str(ann) + ".jsonl").read_text()
    student = tmp_path / "student"
    run_cli("train", "sft", "--model", tiny_model_dir, "--data", str(ann) + ".cot.json", "--root", cot_world["root"],
            "--max-steps", "2", "--out", student, "--set", "sft.per_device_batch_size=4", "--set", runs)
    _loads_and_generates(student, cot_world)
    # lineage: student <- COT file (annotate run) <- teacher model (first SFT run)
    student_run = reg.list_runs(kind="train-sft")[0]["id"]
    up = json.dumps(reg.lineage(student_run), default=str)
    assert '"kind": "annotate"' in up and up.count('"kind": "train-sft"') >= 3  # student, teacher, first


def test_dataloader_workers_start_once_from_a_forkserver(tmp_path):
    # forkserver: a fork of a threaded process can inherit a held lock and hang; persistent: a forkserver worker
    # costs seconds of imports, and the quickstart's SFT is 72 epochs of 300 records (new workers every epoch ran it
    # 3x slower on 2 cores).
    from pipelines.config import load_config
    from pipelines.sft import training_arguments

    args = training_arguments(load_config(overrides=["data.num_workers=1"]), tmp_path, has_eval=False)
    assert args.dataloader_multiprocessing_context == "forkserver" and args.dataloader_persistent_workers
    inline = training_arguments(load_config(overrides=["data.num_workers=0"]), tmp_path, has_eval=False)
    assert inline.dataloader_multiprocessing_context is None and not inline.dataloader_persistent_workers


def test_persistent_forkserver_workers_train_the_same_weights_as_inline_loading(tiny_model_dir, cot_world, tmp_path):
    # Three epochs of 16 records: the workers outlive each epoch and must hand over the batches loading in the
    # training process would (the quickstart's SFT, 72 epochs, runs with one worker).
    from safetensors.torch import load_file

    weights = {}
    for workers in (0, 1):
        out = tmp_path / f"w{workers}"
        run_cli("train", "sft", "--model", tiny_model_dir, "--data", cot_world["train"], "--root", cot_world["root"],
                "--max-steps", "6", "--out", out, "--set", "data.max_samples=16", "--set", "sft.per_device_batch_size=8",
                "--set", f"data.num_workers={workers}", "--set", "sft.save_steps=1000",
                "--set", f"run.output_dir={tmp_path / 'runs'}")
        weights[workers] = load_file(out / "model.safetensors")
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    tiny = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(tiny[k], weights[1][k]) for k in tiny)  # it trained
