"""DeepSpeed support, the parts that run in one process (default suite): the accelerator that keeps the DeepSpeed
plugin on the CPU, the ZeRO-3 vision lockstep (exact zero contribution, right call counts), the error printer, the tied
lm_head on save. The 2-rank DeepSpeed runs are in tests/test_deepspeed.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import load_config

# The lockstep tests need no DeepSpeed (the vision hooks and the dummy call are plain torch); these do.
NO_DEEPSPEED = "DeepSpeed is not installed (pip install -e '.[deepspeed]'; CI installs it)"


@pytest.fixture(scope="module")
def mixed_batch(tiny_model_dir, tmp_path_factory):
    """Processor inputs of one image prompt and one video prompt (a batch with both modalities), and of each alone."""
    import numpy as np

    from pipelines.models import Media, encode_batch, load_processor

    proc = load_processor(tiny_model_dir)
    rng = np.random.default_rng(0)
    img = Media(video=None, image=rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), fps=None)
    vid = Media(video=rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8), image=None, fps=2.0)
    texts = {"image": "<|vision_start|><|image_pad|><|vision_end|>what colour?",
             "video": "<|vision_start|><|video_pad|><|vision_end|>what moves?"}

    def enc(kinds):
        media = [img if k == "image" else vid for k in kinds]
        return dict(encode_batch(proc, [texts[k] for k in kinds], media))

    return {"both": enc(["image", "video"]), "image": enc(["image"]), "video": enc(["video"]),
            "pad": proc.tokenizer.pad_token_id}


def _model(tiny_model_dir):
    from pipelines.models import load_model

    torch.manual_seed(0)
    m = load_model(load_config(shortcuts={"model.name_or_path": str(tiny_model_dir)}).model, for_training=True)
    m.config.use_cache = False
    return m


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    loss = out.logits.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("local", ["image", "video"])
def test_lockstep_dummy_call_is_an_exact_zero(tiny_model_dir, mixed_batch, local):
    """Another rank has both modalities: this rank runs one dummy vision-tower call, and its loss and every gradient
    are bit-for-bit those of its real samples (the vision tower's included)."""
    from pipelines.zero3 import VisionLockstep

    model = _model(tiny_model_dir)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    ref_loss, ref_grads = _loss_and_grads(model, mixed_batch[local])
    assert len(calls) == 1
    lock = VisionLockstep(model, reduce_max=lambda flags: torch.ones_like(flags))  # the others hold both
    calls.clear()
    with lock.active():
        loss, grads = _loss_and_grads(model, mixed_batch[local])
    assert len(calls) == 2 and lock.dummy_calls == 1
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    # outside active(): no agreement, no dummy (generation is left alone)
    calls.clear()
    _loss_and_grads(model, mixed_batch[local])
    assert len(calls) == 1 and lock.dummy_calls == 1


def test_lockstep_call_counts_follow_the_agreed_modalities(tiny_model_dir, mixed_batch):
    from pipelines.zero3 import VisionLockstep, text_dummy_forward

    model = _model(tiny_model_dir)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    seen = []

    def agree(flags):  # record what this rank says; the others have only videos
        seen.append(flags.tolist())
        return torch.maximum(flags, torch.tensor([0.0, 1.0]))

    lock = VisionLockstep(model, reduce_max=agree)
    with lock.active(), torch.no_grad():
        model(**mixed_batch["both"], use_cache=False)  # 2 real calls, none missing
        assert len(calls) == 2 and lock.dummy_calls == 0
        model(**mixed_batch["image"], use_cache=False)  # video missing here: 1 real + 1 dummy
        assert len(calls) == 4 and lock.dummy_calls == 1
        text_dummy_forward(model, mixed_batch["pad"], "cpu")  # nothing to train: the others' video call
        assert len(calls) == 5 and lock.dummy_calls == 2
    assert seen == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


class _OutputGrads(torch.autograd.Function):
    """Identity whose backward records that a vision output received a gradient: what DeepSpeed's ZeRO-3 pre-backward
    hook does on every tensor a module returns (each firing fetches the module's parameters again, and the order of
    fetches must be the same on every rank)."""

    @staticmethod
    def forward(ctx, t, call, log):
        ctx.call, ctx.log = call, log
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.call)
        return grad, None, None


def _wrap_outputs(out, call, log):
    if torch.is_tensor(out):
        return _OutputGrads.apply(out, call, log) if out.requires_grad else out
    if isinstance(out, dict):
        for k in list(out.keys()):
            out[k] = _wrap_outputs(out[k], call, log)
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap_outputs(v, call, log) for v in out)
    return out


@pytest.fixture(scope="module")
def family_model_dirs(tmp_path_factory):
    from pipelines.models.families import ADAPTERS

    root = tmp_path_factory.mktemp("lockstep-families")
    return lambda family: ADAPTERS[family].build_tiny(root / family, seed=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_lockstep_dummy_call_feeds_backward_like_a_real_call(family, family_model_dirs):
    """A rank without images runs the dummy image call; in backward it must look like a real image call of another
    rank: the same number of tower outputs receive a gradient (Qwen3-VL: the merged features AND each deepstack
    feature; the dummy kept only the merged one and ZeRO-3 aborted with a collective mismatch) and the same vision
    parameters get a gradient (the deepstack mergers included), an exact zero."""
    import numpy as np

    from pipelines.config import load_config
    from pipelines.models import Media, encode_batch, load_model, load_processor
    from pipelines.models.families import adapter_for
    from pipelines.zero3 import VisionLockstep, text_dummy_forward

    path = family_model_dirs(family)
    torch.manual_seed(0)
    model = load_model(load_config(shortcuts={"model.name_or_path": str(path)}).model, for_training=True)
    proc = load_processor(path)
    side = 2 * adapter_for(model).factor
    img = Media(image=np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    image = dict(encode_batch(proc, ["<|vision_start|><|image_pad|><|vision_end|>what colour?"], [img]))
    visual = adapter_for(model).vision_tower(model)
    calls, fired = [], []
    visual.register_forward_hook(lambda m, a, out: _wrap_outputs(out, len(calls) - 1, fired))
    visual.register_forward_pre_hook(lambda m, a: calls.append(1))

    def backward(run) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        calls.clear(), fired.clear()
        run().logits.float().square().mean().backward()
        return {n: p.grad for n, p in visual.named_parameters() if p.grad is not None}

    real = backward(lambda: model(**image, use_cache=False))
    per_real_call = len(fired)
    assert len(calls) == 1 and per_real_call >= 1
    lock = VisionLockstep(model, reduce_max=lambda flags: torch.maximum(flags, torch.tensor([1.0, 0.0])))
    with lock.active():  # nothing to train here; another rank has an image
        dummy = backward(lambda: text_dummy_forward(model, proc.tokenizer.pad_token_id, "cpu"))
    assert lock.dummy_calls == 1 and len(calls) == 1
    assert len(fired) == per_real_call, f"{family}: {len(fired)} tower outputs in backward, a real call has " \
                                        f"{per_real_call}"
    assert dummy.keys() == real.keys()
    assert all(not g.any() for g in dummy.values())


# ---------------------------------------------------------------------------------------------------------------------
# 1: the RL trainer's accelerator keeps DeepSpeed on the CPU
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_rl_accelerator_keeps_deepspeed_without_a_gpu(tiny_model_dir, tmp_path, monkeypatch, stage):
    """Accelerator(cpu=True) silently drops a DeepSpeed plugin (DDP ran; TRL's prepare_deepspeed then failed): without
    CUDA the RL trainer's accelerator is built with cpu=False, the plugin and a named gloo backend (a real 2-rank run
    of it: tests/test_deepspeed.py)."""
    pytest.importorskip("deepspeed", reason=NO_DEEPSPEED)  # accelerate's DeepSpeedPlugin imports it
    import accelerate

    from pipelines.rl.trainer import RLTrainer

    built = {}

    def capture(**kw):
        built.update(kw)
        return "accelerator"

    monkeypatch.setattr(accelerate, "Accelerator", capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"distributed.deepspeed={stage}"])
    assert RLTrainer(cfg, None, tmp_path)._accelerator() == "accelerator"
    assert built["cpu"] is False
    plugin = built["deepspeed_plugin"]
    assert plugin is not None and plugin.zero_stage == int(stage[-1])
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1
    init = [h for h in built["kwargs_handlers"] if type(h).__name__ == "InitProcessGroupKwargs"]
    assert [h.backend for h in init] == ["gloo"]
    built.clear()
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}"])
    RLTrainer(cfg, None, tmp_path)._accelerator()  # plain DDP on the CPU stays cpu=True
    assert built["cpu"] is True and built["deepspeed_plugin"] is None


# ---------------------------------------------------------------------------------------------------------------------
# 4: the CLI's error line is text, not rich markup
def test_error_line_prints_bracketed_library_messages_verbatim(capsys):
    """gloo's "[enforce fail at /__w/...]" and "[/__w/...]" made rich raise MarkupError, hiding the real error."""
    from videor1_cli.app import _fail

    msg = ("[enforce fail at /__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:464] op.preamble.length"
           " <= op.nbytes. 37632 vs 64 [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545]")
    with pytest.raises(SystemExit) as e:
        _fail(RuntimeError(msg), 1, "see [bold]the workers[/bold] output")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: " + msg in " ".join(err.split("\n"))
    assert "hint: see [bold]the workers[/bold] output" in err


# ---------------------------------------------------------------------------------------------------------------------
# 5: no second lm_head.weight for tied embeddings
def test_sft_save_of_a_cloned_state_dict_keeps_embeddings_tied(tiny_model_dir, tmp_path):
    """DeepSpeed ZeRO-2 hands Trainer._save a cloned state dict (deepspeed's clone_tensors_for_torch_save), whose
    lm_head no longer shares storage with embed_tokens: it must not be saved a second time."""
    pytest.importorskip("deepspeed", reason=NO_DEEPSPEED)
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, TrainingArguments

    from pipelines.sft import _trainer_cls

    model = _model(tiny_model_dir)
    assert model.config.tie_word_embeddings
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    trainer = _trainer_cls()(model=model, args=args)
    trainer._save(str(tmp_path / "out"), state_dict=clone_tensors_for_torch_save(model.state_dict()))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("lm_head") for k in keys), keys
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()


def test_drop_tied_duplicates_keeps_everything_else(tiny_model_dir):
    from pipelines.zero3 import drop_tied_duplicates

    model = _model(tiny_model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kept = drop_tied_duplicates(model, state)
    assert set(state) - set(kept) == {"lm_head.weight"}


# ---------------------------------------------------------------------------------------------------------------------
# 2: DeepSpeed's distributed layer is up before ZeRO-3's zero.Init builds the model
def test_sft_inits_deepspeed_distributed_before_building_the_model(tiny_model_dir, tmp_path, monkeypatch):
    """zero.Init (inside from_pretrained once TrainingArguments hold a ZeRO-3 config) partitions over DeepSpeed's
    world, which was 1 (`train_batch_size 4 != 2 * 1 * 1`) unless deepspeed.init_distributed ran first."""
    import pipelines.launch as L
    import pipelines.sft as S

    order = []

    class Stop(Exception):
        pass

    def fake_init(cfg):
        order.append("init_deepspeed_distributed")
        return True

    def fake_args(*a, **k):
        order.append("training_arguments")
        raise Stop

    monkeypatch.setattr(L, "init_deepspeed_distributed", fake_init)
    monkeypatch.setattr(S, "training_arguments", fake_args)
    cot = tmp_path / "cot.json"
    cot.write_text(json.dumps([{"problem_id": 1, "problem": "q", "process": "p", "solution": "<answer>A</answer>",
                                "data_type": "image", "path": "x.png", "problem_type": "free-form"}]))
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={cot}",
                                 "distributed.deepspeed=zero3"])
    with pytest.raises(Stop):
        S.run_sft(cfg, None, output_dir=tmp_path / "out")
    assert order == ["init_deepspeed_distributed", "training_arguments"]


# ---------------------------------------------------------------------------------------------------------------------
# Qwen3-VL-MoE's fused experts load and save under ZeRO-3 as without it
def test_zero3_expert_conversions_compare_with_the_full_shape():
    """transformers' `Transpose(check_dims=True)` keeps a tensor already in the model's layout (load) and its reverse
    keeps one already in the model's layout (save); under ZeRO-3 the parameter is an empty partition (its shape is
    `ds_shape`), so transformers alone transposed the model's own layout both ways (a size mismatch, or silently
    transposed square experts). The real 2-rank runs: tests/test_deepspeed_families.py (Qwen3-VL-MoE under ZeRO-3
    equals DDP, weights included)."""
    from transformers.core_model_loading import Transpose

    from pipelines.zero3 import full_shape_transpose

    class Partitioned(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(0))
            self.w.ds_shape = torch.Size(shape)

    ours_convert = full_shape_transpose(Transpose.convert)

    def run(convert, op, shape, tensor):
        return convert(op, {"w": tensor}, ["w"], ["w"], full_layer_name="w", model=Partitioned(shape))["w"]

    load, save = Transpose(1, 2, check_dims=True), Transpose(2, 1, check_dims=True)
    mine = torch.randn(4, 64, 32)  # the model's layout (what transformers 5 saves without ZeRO-3)
    released = mine.transpose(1, 2).contiguous()  # the released checkpoints' layout
    square = torch.randn(4, 64, 64)
    assert torch.equal(run(ours_convert, load, (4, 64, 32), mine), mine)
    assert torch.equal(run(ours_convert, load, (4, 64, 32), released), mine)
    assert torch.equal(run(ours_convert, load, (4, 64, 64), square), square)
    assert torch.equal(run(ours_convert, save, (4, 64, 32), mine), mine)
    assert torch.equal(run(ours_convert, save, (4, 64, 64), square), square)
    if not getattr(Transpose.convert, "_videor1_full_shape", False):  # transformers alone (not installed here)
        assert torch.equal(run(Transpose.convert, load, (4, 64, 64), square), square.transpose(1, 2))
        assert torch.equal(run(Transpose.convert, save, (4, 64, 32), mine), released)
