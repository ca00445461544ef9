"""Encode once (issue 22): each media item through the vision tower once per forward, exactly the repeated path.

- per family (tiny models of all six, the real transformers classes): per-token log-probs, loss, KL and every
  parameter's gradient of the shared path equal the repeated path (float32, 1e-5) for video, image and mixed
  batches at G = 2 and 8; the tower runs as often as before but on 1/G of the rows;
- HF generation: the G ordered and G~ shuffled rows of a prompt share one encoder call (two items: the shuffled copy
  is its own), with the same greedy tokens;
- the trainer: `vision/patches_encoded` / `vision/patches_distinct` per step; features reused across the reference
  and num_iterations passes only with a frozen tower (freeze_vision, LoRA), with the same losses;
- done-means: a 3-step T-GRPO run (G 8, HF, beta > 0, num_iterations 2) with rl.encode_once true / false.
DDP and ZeRO-3 runs of both paths are in tests/test_deepspeed.py (slow)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from pipelines.models import QWEN_SPECIAL_TOKENS
from pipelines.models.families import ADAPTERS, FAMILIES, TowerCounter

TOL = 1e-5


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eo-families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = ADAPTERS[family].build_tiny(root / family, seed=0)
        return built[family]

    return get


def _samples(proc, adapter, kinds: str, seed: int = 0):
    """One Sample per letter: v = video (two sizes, two fps, odd frame count included), i = image."""
    from pipelines.models import Media
    from pipelines.rl.rollout import Sample

    rng = np.random.default_rng(seed)
    f = adapter.factor
    videos = [(4, 2 * f, 2 * f, 2.0), (5, 3 * f, 2 * f, 1.0)]
    out = []
    for k, ch in enumerate(kinds):
        if ch == "v":
            n, h, w, fps = videos[sum(c == "v" for c in kinds[:k]) % 2]
            media = Media(video=rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8), fps=fps,
                          indices=list(range(0, 2 * n, 2)), video_fps=2 * fps)
        else:
            media = Media(image=rng.integers(0, 255, (2 * f, 3 * f, 3), dtype=np.uint8))
        msg = [{"role": "user", "content": [{"type": "video" if ch == "v" else "image"},
                                            {"type": "text", "text": "Which colour?"}]}]
        prompt = proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        out.append(Sample(k, {}, media, prompt))
    return out


def _completions(n_rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(QWEN_SPECIAL_TOKENS), 200, (n_rows, 6), generator=g)  # no placeholder ids
    mask = torch.ones_like(ids)
    for r in range(0, n_rows, 3):  # ragged completions
        mask[r, 2 + r % 4:] = 0
    return ids, mask


def _step(model, ref, proc, samples, G, ids, mask, share: bool, counter: TowerCounter):
    """Reference log-probs, policy log-probs, loss and KL, then the backward: what one RL update computes."""
    from pipelines.rl import losses as L
    from pipelines.rl import rollout as R

    inputs = R.policy_inputs(proc, samples, G, ids, mask, share_vision=share)
    with torch.no_grad():
        ref_logp = R.completion_logprobs(ref, inputs, ids)
    model.zero_grad(set_to_none=True)
    counter.reset()
    logp = R.completion_logprobs(model, inputs, ids)
    adv = torch.linspace(-1.0, 1.0, ids.shape[0])
    out = L.policy_loss(logp, adv, mask, ref_logp=ref_logp, beta=0.04, max_completion_length=ids.shape[1])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logp": logp.detach(), "ref": ref_logp, "loss": out.loss.detach(), "kl": out.kl.detach(),
            "grads": grads, "tower": counter.reset(), "inputs": inputs}


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_vision_equals_the_repeated_path(family, family_models):
    from pipelines.config import load_config
    from pipelines.models import load_model, load_processor
    from pipelines.models.families import VISION_PLAN_KEY

    path = family_models(family)
    adapter = ADAPTERS[family]
    proc = load_processor(path)
    torch.manual_seed(0)
    model = load_model(load_config(overrides=[f"model.name_or_path={path}"]).model, for_training=True)
    ref = copy.deepcopy(model).eval()  # a reference that differs (KL > 0)
    assert ref.model.get_video_features.__self__ is ref.model  # the binding follows the copy, not the original
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    counter = TowerCounter().attach(adapter.vision_tower(model))
    deep = hasattr(adapter.vision_tower(model), "deepstack_merger_list")
    for kinds in ("vv", "ii", "viv"):
        samples = _samples(proc, adapter, kinds)
        for G in (2, 8):
            ids, mask = _completions(len(samples) * G, seed=G)
            a = _step(model, ref, proc, samples, G, ids, mask, share=False, counter=counter)
            b = _step(model, ref, proc, samples, G, ids, mask, share=True, counter=counter)
            where = f"{family} {kinds} G={G}"
            assert VISION_PLAN_KEY not in a["inputs"] and VISION_PLAN_KEY in b["inputs"], where
            for key in ("logp", "ref", "loss", "kl"):
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=TOL, msg=f"{where}: {key}")
            assert float(a["kl"]) > 0, where
            assert a["grads"].keys() == b["grads"].keys(), where
            assert any(k.startswith("model.visual") for k in b["grads"]), where  # the tower is trained through it
            if deep:
                assert any("deepstack" in k for k in b["grads"]), where  # deepstack features reach the loss
            for n in a["grads"]:
                torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=0, atol=TOL, msg=f"{where}: {n}")
            # the same tower calls (one per modality present), on 1/G of the rows
            (calls_a, rows_a), (calls_b, rows_b) = a["tower"], b["tower"]
            assert calls_a == calls_b == len(set(kinds)), where
            assert rows_b * G == rows_a, where
            assert rows_b == sum(adapter.patch_rows(s.media) for s in samples), where
            # positions are the repeated path's: per-row grids, ids and masks are unchanged
            for k, v in a["inputs"].items():
                if k not in ("pixel_values_videos", "pixel_values"):
                    assert torch.equal(v, b["inputs"][k]), (where, k)


def test_select_rows_keeps_repeat_each_and_checks_the_plan(tiny_model_dir):
    from pipelines.models import encode_batch, load_model, load_processor, select_rows
    from pipelines.models.families import adapter_for, share_vision
    from pipelines.config import load_config
    from pipelines.rl.rollout import repeat_each

    proc = load_processor(tiny_model_dir)
    samples = _samples(proc, adapter_for(proc), "vivv")
    media = [s.media for s in samples]
    batch = dict(encode_batch(proc, [s.prompt for s in samples], media))
    rows = [i for i in range(4) for _ in range(3)]
    old, (new, plan) = repeat_each(batch, 3), select_rows(batch, rows, media)
    assert plan is None and old.keys() == new.keys()
    for k in old:
        assert torch.equal(old[k], new[k]), k
    shared, plan = select_rows(batch, [2, 0, 2, 1], media, share_vision=True)  # any order, items reused
    assert plan.index == {"video": [1, 0, 1], "image": [0]}
    assert torch.equal(shared["pixel_values_videos"], batch["pixel_values_videos"])
    model = load_model(load_config(overrides=[f"model.name_or_path={tiny_model_dir}"]).model)
    with pytest.raises(ValueError, match="plan's distinct grids"):  # a plan that does not describe the rows
        bad = dict(shared, video_grid_thw=shared["video_grid_thw"].flip(0) * torch.tensor([[1, 1, 2]]))
        with torch.no_grad(), share_vision(model, plan):
            model(**bad)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_hf_generation_encodes_each_item_once(family, family_models):
    """The G ordered and G~ shuffled rows of a prompt: 2 encoder items (the shuffled copy is its own), the same
    greedy tokens as encoding every row."""
    from pipelines.config import load_config
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.models import load_model, load_processor, shuffled

    path = family_models(family)
    adapter = ADAPTERS[family]
    proc = load_processor(path)
    model = load_model(load_config(overrides=[f"model.name_or_path={path}"]).model)
    samples = _samples(proc, adapter, "vi")
    shuf = shuffled(samples[0].media, torch.Generator().manual_seed(1))
    G, G_shuf = 4, 2
    prompts = [s.prompt for s in samples for _ in range(G)] + [samples[0].prompt] * G_shuf
    media = [s.media for s in samples for _ in range(G)] + [shuf] * G_shuf
    counter = TowerCounter().attach(adapter.vision_tower(model))
    out = {}
    for once in (False, True):
        counter.reset()
        backend = HFBackend(model, proc, batch_size=64, encode_once=once)
        out[once] = ([c[0].token_ids for c in backend.generate(prompts, media, Sampling(max_new_tokens=4, n=1,
                                                                                        temperature=0.0))],
                     counter.reset())
    assert out[True][0] == out[False][0]
    distinct = 2 * adapter.patch_rows(samples[0].media) + adapter.patch_rows(samples[1].media)
    assert out[True][1] == (2, distinct)  # one call per modality, each item once
    assert out[False][1][1] == G * distinct - (G - G_shuf) * adapter.patch_rows(samples[0].media)


def _trainer_step(tiny_model_dir, data, root, tmp_path, *overrides):
    from pipelines.config import load_config
    from pipelines.registry import Registry
    from pipelines.rl.trainer import RLTrainer

    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={data}", f"data.root={root}",
                                 "rl.num_generations=3", "rl.max_completion_length=6", "rl.per_device_prompts=2",
                                 "rl.max_steps=1", "data.shuffle=false", "rl.num_iterations=2", "rl.beta=0.04",
                                 "rl.rewards=[format,test_eo_length]", "rl.learning_rate=0.01",
                                 f"run.output_dir={tmp_path}", *overrides])
    with Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db").run("train-rl", cfg) as run:
        tr = RLTrainer(cfg, run, tmp_path / f"run-{len(list(tmp_path.iterdir()))}")
        tr.setup()
        torch.manual_seed(0)
        m = tr.train_step()
    return tr, m


@pytest.fixture
def eo_length_reward():
    from pipelines import rewards

    rewards.REWARDS["test_eo_length"] = lambda completions, **_: [min(1.0, len(c) / 20.0) for c in completions]
    yield
    rewards.REWARDS.pop("test_eo_length", None)


@pytest.mark.parametrize("setting", ["trained", "freeze_vision", "lora"])
def test_features_are_reused_across_passes_only_with_a_frozen_tower(setting, tiny_model_dir, synth_world, tmp_path,
                                                                    eo_length_reward):
    """GRPO, num_iterations 2, beta > 0: the reference and both policy passes encode each ordered item once each
    (trained tower) or once in all (frozen tower: freeze_vision, or LoRA whose reference is the policy with its
    adapters off); the loss, KL and reward equal the repeated path's."""
    extra = {"trained": [], "freeze_vision": ["model.freeze_vision=true"],
             "lora": ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]}[setting]
    recs = json.loads(Path(synth_world["rl"]).read_text())
    data = tmp_path / "vi.json"
    data.write_text(json.dumps([next(r for r in recs if r["data_type"] == "video"),
                                next(r for r in recs if r["data_type"] == "image")]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    once, m_once = _trainer_step(tiny_model_dir, data, synth_world["root"], tmp_path / "a", "rl.algo=grpo", *extra)
    rep, m_rep = _trainer_step(tiny_model_dir, data, synth_world["root"], tmp_path / "b", "rl.algo=grpo",
                               "rl.encode_once=false", *extra)
    frozen = setting != "trained"
    assert once.reuse_policy is frozen and once.reuse_reference is frozen
    assert not rep.reuse_policy and not rep.reuse_reference
    distinct = m_once["vision/patches_distinct"]
    assert distinct == m_rep["vision/patches_distinct"] > 0
    # generation 1 x distinct; then reference + 2 policy passes: 3 x distinct, or 1 x when the features are reused
    assert m_once["vision/patches_encoded"] == distinct * (2 if frozen else 4)
    assert m_rep["vision/patches_encoded"] == distinct * 3 * 4  # every one of G = 3 rows in all four
    for key in ("loss", "kl", "reward", "grad_norm"):
        assert m_once[key] == pytest.approx(m_rep[key], rel=1e-5, abs=1e-7), key
    assert m_once["grad_norm"] > 0


def test_tgrpo_three_steps_encode_once_against_repeated(tiny_model_dir, synth_world, tmp_path, eo_length_reward):
    """Done-means of issue 22: `train rl --algo tgrpo`, G 8, HF backend, beta > 0, num_iterations 2, 3 steps."""
    from pipelines.registry import Registry

    reg = Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")
    mu = 2
    metrics = {}
    for once in ("true", "false"):
        run_cli("train", "rl", "--model", tiny_model_dir, "--data", synth_world["rl"], "--algo", "tgrpo",
                "--max-steps", "3", "--set", "rl.num_generations=8", "--set", "rl.max_completion_length=8",
                "--set", "rl.per_device_prompts=2", "--set", f"rl.num_iterations={mu}", "--set", "rl.beta=0.04",
                "--set", "rl.backend=hf", "--set", "rl.rewards=[accuracy,format,test_eo_length]",
                "--set", "rl.learning_rate=0.01", "--set", f"rl.encode_once={once}", "--set", "rl.save_steps=100",
                "--set", f"run.output_dir={tmp_path / once}", "--set", f"run.name=eo-{once}")
        run = next(r for r in reg.list_runs(kind="train-rl") if r.get("name") == f"eo-{once}")
        metrics[once] = reg.metrics(run["id"])
        lines = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if "vision/patches_encoded" in r] == [1, 2, 3]
    on, off = metrics["true"], metrics["false"]
    for step in range(3):
        distinct = on["vision/patches_distinct"][step][1]
        assert distinct > 0 and off["vision/patches_distinct"][step][1] == distinct
        assert on["vision/patches_encoded"][step][1] <= distinct * (mu + 2)
        assert off["vision/patches_encoded"][step][1] >= 4 * on["vision/patches_encoded"][step][1]
        for key in ("loss", "kl", "reward"):
            assert on[key][step][1] == pytest.approx(off[key][step][1], abs=1e-4), (key, step + 1)
    assert any(v > 0 for _, v in on["kl"]) and any(v != 0 for _, v in on["loss"])
