"""VLLMBackend's request building and bookkeeping, driven by a stand-in engine that records requests and answers with
objects shaped like vLLM's RequestOutput / CompletionOutput. These run in the default suite (no vLLM needed) and are
NOT evidence that the engine path works: the real engine is driven by tests/test_vllm_engine.py and
tests/test_vllm_commands.py (marked `vllm`, run in the vLLM CPU venv)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.errors import VideoR1Error
from pipelines.generation import Sampling, make_backend
from pipelines.generation import vllm as V
from pipelines.models import CHAT_TEMPLATE, Media, shuffled, train_tiny_tokenizer

VIDEO_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Which colour comes first?<|im_end|>\n"
                "<|im_start|>assistant\n")
IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
                "<|im_start|>assistant\n")
TEXT_PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"  # not readable offline: its family comes from its name, with a warning


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


class FakeModel:
    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded.extend((n, t.detach().clone()) for n, t in weights)


class FakeLLM:
    """Stand-in for vllm.LLM: the attributes VLLMBackend touches, with vLLM's shapes."""

    def __init__(self, tokenizer, finish="stop", eos_in_ids=True, in_process=True):
        self.tok = tokenizer
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls: list[tuple[list[dict], object]] = []
        self.events: list[tuple] = []
        self.finish, self.eos_in_ids = finish, eos_in_ids
        self.model = FakeModel()
        self.rpc: list = []
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.events.append(("reset_encoder_cache",)))
        if in_process:  # vLLM sets llm_engine.model_executor only for an engine in this process
            self.llm_engine.model_executor = SimpleNamespace()

    def get_tokenizer(self):
        return self.tok

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.calls.append((list(requests), sampling_params))
        self.events.append(("generate",))
        outs = []
        for i, _ in enumerate(requests):
            comps = []
            for j in range(sampling_params.n):
                ids = [100 + i, 200 + j] + ([self.eos] if self.eos_in_ids else [])
                comps.append(SimpleNamespace(index=j, text=f"r{i}s{j}", token_ids=tuple(ids), cumulative_logprob=None,
                                             finish_reason=self.finish, stop_reason=None))
            outs.append(SimpleNamespace(request_id=str(i), prompt=requests[i].get("prompt"), outputs=comps,
                                        finished=True))
        return outs

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        """Only `reload_weights` (a method NAME: callables do not cross process boundaries), as vLLM's worker does."""
        assert method == "reload_weights" and not args
        self.rpc.append((method, dict(kwargs)))
        if kwargs.get("weights_iterator") is not None:
            self.model.load_weights(kwargs["weights_iterator"])
        else:
            from safetensors.torch import load_file

            self.model.load_weights(load_file(f"{kwargs['weights_path']}/model.safetensors").items())
        return [None]


class FakeSamplingParams(SimpleNamespace):
    pass


def backend(tokenizer, **kw):
    fake = kw.pop("llm", None) or FakeLLM(tokenizer)
    return V.VLLMBackend(HUB_ID, llm=fake, sampling_params_cls=FakeSamplingParams, **kw), fake


def video(t=8, h=56, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Requests
def test_video_request_carries_the_frames_fps_and_no_resample(tokenizer):
    b, fake = backend(tokenizer)
    frames = video()
    b.generate([VIDEO_PROMPT], [Media(video=frames, fps=1.5)], Sampling(n=1))
    (req,), _ = fake.calls[0]
    assert req["prompt"] == VIDEO_PROMPT  # one unexpanded placeholder; vLLM expands it
    got, meta = req["multi_modal_data"]["video"]
    assert got.dtype == np.uint8 and got.shape == (8, 56, 56, 3)
    assert np.array_equal(got, frames)
    assert meta["fps"] == 1.5 and meta["total_num_frames"] == 8
    assert meta["frames_indices"] == list(range(8)) and meta["do_sample_frames"] is False
    assert meta["duration"] == pytest.approx(8 / 1.5)
    assert req["mm_processor_kwargs"] == {"fps": 1.5, "do_resize": False, "do_sample_frames": False}


def test_shuffled_request_carries_the_shuffled_frames(tokenizer):
    """Video-R1 #72: its vLLM trainer sent the ordered video with the shuffled prompt, so T-GRPO did nothing."""
    b, fake = backend(tokenizer)
    frames = video(t=16)
    ordered = Media(video=frames, fps=2.0)
    shuf = shuffled(ordered, torch.Generator().manual_seed(3))
    assert not np.array_equal(shuf.video, frames)
    b.generate([VIDEO_PROMPT, VIDEO_PROMPT], [ordered, shuf], Sampling(n=2))
    reqs, _ = fake.calls[0]
    assert np.array_equal(reqs[0]["multi_modal_data"]["video"][0], frames)
    assert np.array_equal(reqs[1]["multi_modal_data"]["video"][0], shuf.video)
    assert not np.array_equal(reqs[1]["multi_modal_data"]["video"][0], frames)
    assert reqs[1]["multi_modal_data"]["video"][1]["frames_indices"] == list(range(16))  # no resampling/reorder


def test_image_and_text_requests(tokenizer):
    from PIL import Image

    b, fake = backend(tokenizer)
    img = video(t=1)[0]
    b.generate([IMAGE_PROMPT, TEXT_PROMPT], [Media(image=img), Media()], Sampling())
    reqs, _ = fake.calls[0]
    pil = reqs[0]["multi_modal_data"]["image"]
    assert isinstance(pil, Image.Image) and np.array_equal(np.asarray(pil), img)
    assert reqs[0]["mm_processor_kwargs"] == {"do_resize": False}
    assert "fps" not in reqs[0]["mm_processor_kwargs"]
    assert reqs[1] == {"prompt": TEXT_PROMPT}


def test_prompt_rendered_with_the_chat_template_is_accepted(tokenizer):
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    prompt = tokenizer.apply_chat_template(msgs, chat_template=CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
    req = V.build_request(prompt, Media(video=video(), fps=2.0))
    assert req["prompt"].count(V.VIDEO_PLACEHOLDER) == 1


@pytest.mark.parametrize("prompt,media", [
    (TEXT_PROMPT, Media(video=video(), fps=2.0)),  # video without placeholder
    (VIDEO_PROMPT.replace("<|video_pad|>", "<|video_pad|><|video_pad|>"), Media(video=video(), fps=2.0)),  # expanded
    (VIDEO_PROMPT, Media(image=video(t=1)[0])),  # placeholder of the wrong kind
    (IMAGE_PROMPT, Media()),
])
def test_placeholder_mismatch_is_an_error(prompt, media):
    with pytest.raises(ValueError):
        V.build_request(prompt, media)


def test_prompts_and_media_must_pair(tokenizer):
    b, _ = backend(tokenizer)
    with pytest.raises(ValueError):
        b.generate([TEXT_PROMPT, TEXT_PROMPT], [Media()], Sampling())


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and outputs
def test_sampling_mapping_greedy(tokenizer):
    b, fake = backend(tokenizer)
    b.generate([TEXT_PROMPT], [Media()], Sampling(temperature=0.0, top_p=0.001, max_new_tokens=33))
    sp = fake.calls[0][1]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sp.temperature == 0.0 and sp.top_p == 1.0 and sp.n == 1 and sp.max_tokens == 33
    assert sp.stop_token_ids == [eos] and sp.skip_special_tokens is True
    assert not hasattr(sp, "seed")


def test_sampling_mapping_sampled_n_and_seed(tokenizer):
    b, fake = backend(tokenizer)
    out = b.generate([TEXT_PROMPT, TEXT_PROMPT], [Media(), Media()],
                     Sampling(temperature=1.0, top_p=0.95, n=4, seed=7, max_new_tokens=768))
    sp = fake.calls[0][1]
    assert (sp.temperature, sp.top_p, sp.n, sp.seed, sp.max_tokens) == (1.0, 0.95, 4, 7, 768)
    assert [len(g) for g in out] == [4, 4]
    assert [c.token_ids[:2] for c in out[1]] == [[101, 200 + j] for j in range(4)]  # groups stay with their prompt
    assert out[1][0].text == tokenizer.decode(out[1][0].token_ids, skip_special_tokens=True)  # decoded as HF does


def test_special_tokens_other_than_eos_are_suppressed(tokenizer):
    b, fake = backend(tokenizer)
    b.generate([TEXT_PROMPT], [Media()], Sampling())
    bias = fake.calls[0][1].logit_bias
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert bias[tokenizer.convert_tokens_to_ids("<|video_pad|>")] == -100.0
    assert bias[tokenizer.convert_tokens_to_ids("<|image_pad|>")] == -100.0
    assert eos not in bias
    b2, fake2 = backend(tokenizer, suppress_special_tokens=False)
    b2.generate([TEXT_PROMPT], [Media()], Sampling())
    assert not hasattr(fake2.calls[0][1], "logit_bias")


def test_completion_ids_end_at_eos_and_finished(tokenizer):
    b, _ = backend(tokenizer)
    eos = b.eos_id
    (c,), = b.generate([TEXT_PROMPT], [Media()], Sampling())
    assert c.token_ids == [100, 200, eos] and c.finished
    assert c.text == tokenizer.decode([100, 200], skip_special_tokens=True)
    # ids after the first EOS are dropped
    c = V.to_completion(SimpleNamespace(text="x", token_ids=[5, eos, 6, eos], finish_reason="stop"), eos)
    assert c.token_ids == [5, eos] and c.finished
    # cut by max_tokens: not finished, ids untouched
    c = V.to_completion(SimpleNamespace(text="x", token_ids=[5, 6, 7], finish_reason="length"), eos)
    assert c.token_ids == [5, 6, 7] and not c.finished
    # stopped without the stop token in token_ids: EOS appended so the completion mask covers it
    c = V.to_completion(SimpleNamespace(text="x", token_ids=(5, 6), finish_reason="stop"), eos)
    assert c.token_ids == [5, 6, eos] and c.finished


def test_truncated_outputs_are_unfinished(tokenizer):
    b, _ = backend(tokenizer, llm=FakeLLM(tokenizer, finish="length", eos_in_ids=False))
    (c,), = b.generate([TEXT_PROMPT], [Media()], Sampling())
    assert not c.finished and c.token_ids == [100, 200]


def test_colocated_tensor_parallel_keeps_own_share(tokenizer, monkeypatch):
    b, fake = backend(tokenizer)
    b.tensor_parallel_size = 2
    monkeypatch.setenv("RANK", "1")
    other = [{"prompt": TEXT_PROMPT}] * 3  # what TP peer rank 0 sends
    b._all_gather_object = lambda mine: [other, mine]
    out = b.generate([TEXT_PROMPT, TEXT_PROMPT], [Media(), Media()], Sampling())
    assert len(fake.calls[0][0]) == 5  # the engine ran the whole TP group's requests
    assert [g[0].token_ids[0] for g in out] == [103, 104]  # ...and this rank keeps its own two


# ---------------------------------------------------------------------------------------------------------------------
# Weights and sleep mode
def test_vllm_param_name():
    assert V.vllm_param_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert V.vllm_param_name("module.model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert V.vllm_param_name("model.language_model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert V.vllm_param_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert V.vllm_param_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_sync_weights_pushes_every_parameter_by_hf_name(tokenizer, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    b, fake = backend(tokenizer)
    n = b.sync_weights(model)
    names = [nm for nm, _ in model.named_parameters()]
    assert n == len(names) + 1  # tied embeddings: lm_head.weight is pushed too
    assert [nm for nm, _ in fake.model.loaded] == names + ["lm_head.weight"]
    params = dict(model.named_parameters())
    params["lm_head.weight"] = model.get_input_embeddings().weight
    assert all(torch.equal(t, params[nm].data) for nm, t in fake.model.loaded)
    assert any(nm.startswith("model.visual.") for nm in names) and any(
        nm.startswith("model.language_model.") for nm in names)
    assert fake.rpc[0][0] == "reload_weights" and "weights_iterator" in fake.rpc[0][1]
    # vision embeddings of media seen with the old weights first, then the prefix KV blocks
    assert fake.events[-2:] == [("reset_encoder_cache",), ("reset_prefix_cache",)]


def test_sync_weights_strips_wrappers(tokenizer):
    class Wrapper(torch.nn.Module):  # DDP-style `module.` and activation-checkpoint wrappers
        def __init__(self):
            super().__init__()
            inner = torch.nn.Module()
            inner._checkpoint_wrapped_module = torch.nn.Linear(2, 2)
            self.module = inner

    b, fake = backend(tokenizer)
    b.sync_weights(Wrapper())
    assert [nm for nm, _ in fake.model.loaded] == ["weight", "bias"]


def test_sync_weights_merges_peft_adapters(tokenizer):
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    torch.manual_seed(0)
    base = Tiny()
    w0 = base.proj.weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["proj"], r=2, init_lora_weights=False))
    b, fake = backend(tokenizer)
    b.sync_weights(model)
    loaded = dict(fake.model.loaded)
    assert set(loaded) == {"proj.weight", "proj.bias"}  # no lora_A/B, no base_model.model./base_layer
    assert not torch.allclose(loaded["proj.weight"], w0)  # the merged weight was pushed
    assert torch.allclose(model.base_model.model.proj.base_layer.weight, w0, atol=1e-6)  # unmerged afterwards


def test_sync_weights_to_a_multiprocess_engine_goes_through_a_path(tokenizer, tiny_model_dir):
    fake = FakeLLM(tokenizer, in_process=False)
    b = V.VLLMBackend(tiny_model_dir, llm=fake, sampling_params_cls=FakeSamplingParams)
    lin = torch.nn.Linear(2, 2)
    assert b.sync_weights(lin) == 2
    (method, kwargs), = fake.rpc
    assert set(kwargs) == {"weights_path"}  # a string, not tensors or a callable, crosses the process boundary
    assert {nm for nm, _ in fake.model.loaded} == {"weight", "bias"}
    assert torch.equal(dict(fake.model.loaded)["weight"], lin.weight.data)
    from pathlib import Path

    folder = Path(kwargs["weights_path"])  # a complete model folder: the engine re-reads its processor from it
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert fake.events[-2:] == [("reset_encoder_cache",), ("reset_prefix_cache",)]


def test_sleep_level2_requires_sync_before_generate(tokenizer):
    b, fake = backend(tokenizer, enable_sleep_mode=True)
    b.sleep()
    assert fake.events == [("sleep", 2)] and b.sleeping
    with pytest.raises(VideoR1Error) as e:
        b.generate([TEXT_PROMPT], [Media()], Sampling())
    assert "sync_weights" in e.value.hint
    b.wake_up()  # waking does not bring discarded weights back
    with pytest.raises(VideoR1Error):
        b.generate([TEXT_PROMPT], [Media()], Sampling())
    b.sleep()
    del fake.events[1:]
    b.sync_weights(torch.nn.Linear(2, 2))
    assert fake.events[1] == ("wake_up", ("weights",))  # weights mapped before load_weights writes into them
    b.generate([TEXT_PROMPT], [Media()], Sampling())
    assert fake.events[-2:] == [("wake_up", ("kv_cache",)), ("generate",)]
    assert not b.sleeping
    b.sleep()
    assert fake.events[-1] == ("sleep", 2)


def test_sleep_level1_wakes_everything_on_generate(tokenizer):
    b, fake = backend(tokenizer, enable_sleep_mode=True, sleep_level=1)
    b.sleep()
    b.generate([TEXT_PROMPT], [Media()], Sampling())
    assert fake.events == [("sleep", 1), ("wake_up", None), ("generate",)]


def test_sleep_is_a_noop_without_sleep_mode(tokenizer):
    b, fake = backend(tokenizer)
    b.sleep()
    b.wake_up()
    assert fake.events == [] and not b.sleeping


# ---------------------------------------------------------------------------------------------------------------------
# Construction
def test_missing_vllm_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VideoR1Error) as e:
        V.VLLMBackend(HUB_ID)
    assert "videor1[vllm]" in e.value.hint and "GPU" in e.value.hint


def test_llm_constructor_arguments(monkeypatch, tokenizer):
    seen = {}

    class FakeVllmModule:
        class LLM(FakeLLM):
            def __init__(self, **kw):
                seen.update(kw)
                super().__init__(tokenizer)

        SamplingParams = FakeSamplingParams

    monkeypatch.setitem(sys.modules, "vllm", FakeVllmModule)
    from pipelines.config import load_config

    cfg = load_config(overrides=[f"model.name_or_path={HUB_ID}", "model.revision=abc123", "run.seed=3",
                                 "eval.gpu_memory_utilization=0.7", "eval.max_model_len=16384",
                                 "eval.enforce_eager=true", "eval.batch_size=5", "model.dtype=float32"])
    b = V.build_vllm_backend(cfg, "eval")
    assert seen["model"] == HUB_ID and seen["gpu_memory_utilization"] == 0.7 and seen["max_model_len"] == 16384
    assert seen["revision"] == seen["tokenizer_revision"] == "abc123"  # eval honours model.revision
    assert seen["enforce_eager"] is True and seen["enable_prefix_caching"] is True and seen["seed"] == 3
    assert seen["limit_mm_per_prompt"] == {"image": 1, "video": 1} and seen["max_num_seqs"] == 5
    assert seen["dtype"] == "float32" and seen["logprobs_mode"] == "processed_logprobs"
    assert "distributed_executor_backend" not in seen and not b.sleeping  # not colocated: engine stays awake
    b.generate([TEXT_PROMPT], [Media()], Sampling())  # default SamplingParams class comes from the vllm module

    seen.clear()
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(overrides=[f"model.name_or_path={HUB_ID}", "run.seed=10", "rl.vllm.enable_sleep_mode=true",
                                 "rl.vllm.gpu_memory_utilization=0.3"])
    b = V.build_vllm_backend(cfg, "rl", model_path="/ckpt/Qwen2.5-VL-step-5", dtype="float32")
    assert seen["distributed_executor_backend"] == "external_launcher" and seen["model"] == "/ckpt/Qwen2.5-VL-step-5"
    assert "revision" not in seen and seen["gpu_memory_utilization"] == 0.3  # a checkpoint path: no revision
    assert seen["seed"] == 11  # one seed per TP group (tp=1: per rank)
    assert b.sleeping  # colocated + sleep mode: memory goes to the trainer until the first sync


def test_one_builder_per_stage_reads_its_section():
    from pipelines.config import load_config

    cfg = load_config(overrides=["model.name_or_path=Qwen/Qwen3-VL-8B-Instruct", "model.revision=r1",
                                 "annotate.model=Qwen/Qwen2.5-VL-72B-Instruct", "annotate.max_model_len=2048",
                                 "annotate.batch_size=7", "eval.tensor_parallel_size=2", "rl.vllm.max_model_len=999",
                                 "model.dtype=bfloat16"])
    ev, ann = V.vllm_settings(cfg, "eval"), V.vllm_settings(cfg, "annotate")
    rl = V.vllm_settings(cfg, "rl", dtype="float32")
    assert ev["model_path"] == "Qwen/Qwen3-VL-8B-Instruct" and ev["revision"] == "r1" and ev["tensor_parallel_size"] == 2
    assert ev["max_model_len_key"] == "eval.max_model_len" and ev["backend_key"] == "eval.backend"
    assert ann["model_path"] == "Qwen/Qwen2.5-VL-72B-Instruct" and ann["revision"] is None
    assert ann["max_model_len"] == 2048 and ann["max_num_seqs"] == 7 and not ann["enable_sleep_mode"]
    assert rl["model_path"] == "Qwen/Qwen3-VL-8B-Instruct" and rl["revision"] == "r1" and rl["colocate"]
    assert rl["max_model_len"] == 999 and rl["dtype"] == "float32" and rl["backend_key"] == "rl.backend"
    assert ev["dtype"] == ann["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown vLLM stage"):
        V.vllm_settings(cfg, "sft")


# ---------------------------------------------------------------------------------------------------------------------
# Loud checks
class _NoEncoderReset(FakeLLM):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace())  # no reset_encoder_cache


def test_a_missing_encoder_cache_reset_raises(tokenizer):
    b, fake = backend(tokenizer, llm=_NoEncoderReset(tokenizer))
    with pytest.raises(VideoR1Error, match="reset_encoder_cache"):
        b.sync_weights(torch.nn.Linear(2, 2))


def test_a_missing_or_failed_prefix_cache_reset_raises(tokenizer):
    fake = FakeLLM(tokenizer)
    fake.reset_prefix_cache = lambda: False  # vLLM's answer while requests are running
    b, _ = backend(tokenizer, llm=fake)
    with pytest.raises(VideoR1Error, match="refused to reset its prefix cache"):
        b.reset_caches()
    del fake.reset_prefix_cache
    fake.__class__ = type("NoPrefixReset", (FakeLLM,), {"reset_prefix_cache": None})
    with pytest.raises(VideoR1Error, match="no reset_prefix_cache"):
        b.reset_caches()
    ok = FakeLLM(tokenizer)
    ok.reset_prefix_cache = lambda: True
    backend(tokenizer, llm=ok)[0].reset_caches()  # True: fine


def test_unreadable_family_is_guessed_from_the_name_with_a_warning_or_refused(tokenizer, caplog, tmp_path):
    from pipelines.models.families import FamilyError

    with caplog.at_level("WARNING"):
        b, _ = backend(tokenizer)  # HUB_ID, offline
    assert b.adapter.family == "qwen2_5_vl" and "serving it as Qwen2.5-VL" in caplog.text
    assert V.engine_adapter("org/Qwen3-VL-8B-Instruct").family == "qwen3_vl"  # timestamps, not the default's form
    assert V.engine_adapter("org/Qwen3-VL-30B-A3B-Instruct").family == "qwen3_vl_moe"
    with pytest.raises(FamilyError, match="names no supported family"):
        V.engine_adapter("org/some-model")
    with pytest.raises(FamilyError, match="names no supported family"):
        V.VLLMBackend("org/some-model", llm=FakeLLM(tokenizer), sampling_params_cls=FakeSamplingParams)
    d = tmp_path / "Qwen3-VL-local"  # a local directory: its config decides, never the name
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FamilyError, match="'llama' is not supported"):
        V.engine_adapter(str(d))


def _config_only_model(tmp_path, family):
    d = tmp_path / f"{family}-model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "%s"}' % family)
    return str(d)


@pytest.mark.parametrize("stage,key", [("eval", "eval.backend"), ("annotate", "annotate.backend")])
def test_unsupported_family_engine_fails_before_any_model_loads(stage, key, tmp_path, monkeypatch):
    """vLLM + Qwen3-VL-MoE, and Qwen3.5 on vLLM's CPU build in float32: one line naming what works, before vLLM is
    imported or any model / processor is read."""
    from pipelines.config import load_config
    from pipelines.models.families import FamilyError

    def nothing_may_load(*a, **k):
        raise AssertionError("a model or processor was loaded before the refusal")

    monkeypatch.setitem(sys.modules, "vllm", None)  # and the engine never starts
    monkeypatch.setattr("pipelines.models.load_model", nothing_may_load)
    monkeypatch.setattr("pipelines.models.load_processor", nothing_may_load)
    monkeypatch.setattr(V, "engine_device", lambda: "cpu")
    moe = _config_only_model(tmp_path, "qwen3_vl_moe")
    dense35 = _config_only_model(tmp_path, "qwen3_5")
    model_key = "annotate.model" if stage == "annotate" else "model.name_or_path"
    for path, dtype, want in ((moe, "float32", f"Qwen3-VL-MoE cannot run on the vllm engine"),
                              (dense35, "float32", "Qwen3.5 on vllm (cpu) runs in bfloat16 only, not float32")):
        cfg = load_config(overrides=[f"{model_key}={path}", f"{stage}.backend=vllm", f"model.dtype={dtype}"])
        with pytest.raises(FamilyError) as e:
            if stage == "eval":
                from pipelines.evaluate.runner import build_backend

                build_backend(cfg)
            else:
                from pipelines.annotate import make_teacher

                make_teacher(cfg)
        msg = str(e.value)
        assert want in msg and "\n" not in msg, msg
        assert f"works: " in msg and key + "=hf" in msg
    assert "model.dtype=bfloat16" in msg  # Qwen3.5: bfloat16 works too


def test_adapters_declare_engines_and_dtypes():
    from pipelines.models.families import ADAPTERS, FamilyError

    for fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe"):
        assert ADAPTERS[fam].engines == ("hf", "vllm")
    assert ADAPTERS["qwen3_vl_moe"].engines == ("hf",)
    for fam in ADAPTERS:
        ADAPTERS[fam].check_engine("hf", "float32", "cpu")  # every family runs on transformers in any dtype
    ADAPTERS["qwen3_5"].check_engine("vllm", "bfloat16", "cpu")
    ADAPTERS["qwen3_5_moe"].check_engine("vllm", "float32", "cuda")  # the CPU kernel's limit only
    ADAPTERS["qwen3_5"].check_engine("vllm", None, "cpu")  # dtype "auto": the engine's choice, not checked
    with pytest.raises(FamilyError, match="works: model.dtype=bfloat16 or rl.backend=hf"):
        ADAPTERS["qwen3_5_moe"].check_engine("vllm", "torch.float32", "cpu", backend_key="rl.backend")
    ADAPTERS["qwen2_5_vl"].check_engine("vllm", "float32", "cpu")


def test_make_backend_vllm(tokenizer):
    b = make_backend("vllm", model_path=HUB_ID, llm=FakeLLM(tokenizer), sampling_params_cls=FakeSamplingParams)
    assert isinstance(b, V.VLLMBackend)


# ---------------------------------------------------------------------------------------------------------------------
# Settings that run (pure helpers)
def test_engine_environment_fills_what_external_launcher_reads(monkeypatch):
    """Problem 4: vLLM's external_launcher reads RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, also in one process."""
    env = V.engine_environment(0, 0, 1, env={})
    assert env["RANK"] == "0" and env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    launched = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500"}
    assert V.engine_environment(0, 0, 4, env=launched) == launched  # torchrun's values win
    with pytest.raises(VideoR1Error):
        V.engine_environment(1, 1, 2, env={"RANK": "1"})  # several processes must share a port: torchrun sets it


def test_max_model_len_defaults_to_the_model_and_is_clamped(tiny_model_dir):
    """Problem 5: eval's 16384 / annotate's 8192 exceed a model's context and vLLM refuses: clamp with one line."""
    assert V.resolve_max_model_len(None, 4096) == (4096, None)
    assert V.resolve_max_model_len(2048, 4096) == (2048, None)
    value, note = V.resolve_max_model_len(16384, 4096, "eval.max_model_len")
    assert value == 4096 and note == "eval.max_model_len 16384 exceeds the model's context (4096): using 4096"
    assert V.resolve_max_model_len(16384, None) == (16384, None)
    assert V.model_text_config(tiny_model_dir)["max_position_embeddings"] == 4096


def test_unsupported_head_size_message():
    V.check_head_size(32, [32, 64], "CPU")
    with pytest.raises(VideoR1Error) as e:
        V.check_head_size(16, [32, 64, 80], "CPU")
    assert "head size 16" in str(e.value) and "hf backend" in e.value.hint


def test_sampled_token_logprobs_are_requested_and_read(tokenizer):
    assert V.sampling_kwargs(Sampling(logprobs=True), [1])["logprobs"] == 0
    assert "logprobs" not in V.sampling_kwargs(Sampling(), [1])
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lp = [{5: SimpleNamespace(logprob=-0.5)}, {6: SimpleNamespace(logprob=-1.5), 9: SimpleNamespace(logprob=-0.1)},
          {eos: SimpleNamespace(logprob=-0.25)}, {7: SimpleNamespace(logprob=-3.0)}]
    out = SimpleNamespace(text="x", token_ids=(5, 6, eos, 7), finish_reason="stop", logprobs=lp)
    c = V.to_completion(out, eos)
    assert c.token_ids == [5, 6, eos] and c.logprobs == [-0.5, -1.5, -0.25]
    c = V.to_completion(SimpleNamespace(text="x", token_ids=(5,), finish_reason="stop", logprobs=lp[:1]), eos)
    assert c.token_ids == [5, eos] and c.logprobs[0] == -0.5 and c.logprobs[1] != c.logprobs[1]  # NaN: not reported


def test_rollout_trainer_mismatch_terms():
    from pipelines.rl.trainer import mismatch_terms

    policy = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    rollout = torch.tensor([[-1.1, -2.0, float("nan")], [-0.5, -0.2, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # NaN: the engine reported none; masked: padding
    total, count, peak = mismatch_terms(policy, rollout, mask)
    assert count == 4 and total == pytest.approx(0.1 + 0.0 + 0.0 + 0.3) and peak == pytest.approx(0.3)
    assert mismatch_terms(policy, rollout, torch.zeros_like(mask)) == (0.0, 0, 0.0)


def test_stats_reduce_keeps_means_and_maxima():
    from pipelines.rl.trainer import _Stats

    acc = SimpleNamespace(device="cpu", num_processes=1)
    st = _Stats()
    st.add("rollout/logp_diff_mean", 0.4, 4)
    st.add_max("rollout/logp_diff_max", 0.3)
    st.add_max("rollout/logp_diff_max", 0.1)
    st.ensure_max("never")
    out = st.reduce(acc)
    assert out["rollout/logp_diff_mean"] == pytest.approx(0.1) and out["rollout/logp_diff_max"] == 0.3
    assert out["never"] != out["never"]  # NaN when nothing was measured


def test_rl_refuses_an_unsupported_engine_before_loading_the_policy(tmp_path, monkeypatch, synth_world):
    from pipelines.config import load_config
    from pipelines.models.families import FamilyError
    from pipelines.rl.trainer import RLTrainer

    def nothing_may_load(*a, **k):
        raise AssertionError("a model or processor was loaded before the refusal")

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr("pipelines.models.load_model", nothing_may_load)
    monkeypatch.setattr("pipelines.models.load_processor", nothing_may_load)
    monkeypatch.setattr(V, "engine_device", lambda: "cpu")
    cfg = load_config(overrides=[f"model.name_or_path={_config_only_model(tmp_path, 'qwen3_vl_moe')}",
                                 f"data.file={synth_world['rl']}", "rl.backend=vllm",
                                 f"run.output_dir={tmp_path / 'runs'}"])
    tr = RLTrainer(cfg, SimpleNamespace(id="x"), tmp_path / "run")
    with pytest.raises(FamilyError, match="works: rl.backend=hf"):
        tr.setup()
