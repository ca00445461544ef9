"""Sequence parallelism against one rank (``python -m tests._sp_probe`` under torchrun, 2 gloo ranks; tests/
test_sequence_parallel.py launches it).

Per family (env PROBE_FAMILIES, tiny models in PROBE_MODELS/<family>) and batch (a video and an image sample; the
visual tokens of both cross the shard boundary), with the policy under DDP or DeepSpeed ZeRO-3 (PROBE_ZERO3=1):

- reference: one rank's forward of the whole batch on a plain copy of the model (no collective, no SP);
- SP: the same batch split over the 2 ranks (sequence_parallel = 2, data parallelism 1) through the wrapped model.

Compared (rank 0 writes them to PROBE_OUT/<tag>.json): T-GRPO per-token log-probs of the completions, the GRPO loss
and KL of every loss type (`grpo`, `bnpo`, `dapo`, `dr_grpo`), the parameter gradients (max |diff| and the global
norm), and the SFT loss with its gradient norm. The left-padded prompts of the RL batch exercise the move to right
padding; the vision tower's frames are split over the ranks too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _records(world: str) -> tuple[list[dict], list[dict]]:
    rl = json.loads((Path(world) / "rl.json").read_text())
    sft = json.loads((Path(world) / "sft.json").read_text())
    pick = lambda rs: [next(r for r in rs if r["data_type"] == "video"),  # noqa: E731
                       next(r for r in rs if r["data_type"] == "image")]
    return pick(rl), pick(sft)


def _cfg(model_dir: str, world: str, zero3: bool):
    from pipelines.config import load_config

    over = [f"model.name_or_path={model_dir}", f"data.root={world}", "model.dtype=float32",
            "model.attn_implementation=sdpa", "model.device=cpu", "video.fps=4.0", "video.max_frames=64",
            f"video.min_pixels={112 * 112}", f"video.max_pixels={112 * 112}", f"image.min_pixels={448 * 448}",
            f"image.max_pixels={448 * 448}",
            "distributed.nproc=2", "distributed.sequence_parallel=2"]
    if zero3:
        over.append("distributed.deepspeed=zero3")
    return load_config(preset="cpu-tiny", overrides=over)


def _rl_batch(cfg, processor, records, G: int = 2, seed: int = 1):
    import torch

    from pipelines.prompts import load_template
    from pipelines.rl import rollout as R

    rows = list(enumerate(records))
    samples, skipped = R.prepare_samples(rows, cfg, processor, load_template(cfg.prompt.template), cfg.data_root(),
                                         torch.Generator().manual_seed(0), temporal=False)
    assert not skipped, skipped
    g = torch.Generator().manual_seed(seed)
    n = len(samples) * G
    lengths = [5, 9, 3, 7, 4, 6][:n]
    width = max(lengths)
    ids = torch.full((n, width), processor.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, k in enumerate(lengths):
        ids[i, :k] = torch.randint(20, len(processor.tokenizer) - 20, (k,), generator=g)
        mask[i, :k] = 1
    inputs = R.policy_inputs(processor, samples, G, ids, mask)
    adv = torch.randn(n, generator=g)
    # Old and reference log-probs: fixed values around a plausible range, so ratios leave 1 and clipping happens.
    old = -6.5 + torch.randn(n, width, generator=g) * 0.3
    ref = -6.5 + torch.randn(n, width, generator=g) * 0.3
    return inputs, ids, mask, adv, (old, ref)


def _sft_batch(cfg, processor, records):
    from pipelines.models import decode_media
    from pipelines.models.families import adapter_for
    from pipelines.prompts import build_messages, load_template
    from pipelines.sft import SftCollator, encode_example

    tpl = load_template(cfg.prompt.template)
    items = []
    for r in records:
        media = decode_media(r, cfg, cfg.data_root(), factor=adapter_for(processor).factor)
        items.append(encode_example(processor, build_messages(r, tpl, mode="sft"), media))
    batch = SftCollator(processor.tokenizer.pad_token_id)(items)
    batch.pop("skipped")
    return batch


def _grads(model) -> dict:
    import torch

    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "grad", None)
        if hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        if g is not None:
            out[name.removeprefix("module.")] = g.detach().clone().float()
        elif p.requires_grad:
            out[name.removeprefix("module.")] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    return out


def _compare_grads(ref: dict, got: dict) -> dict:
    import torch

    keys = sorted(set(ref) & set(got))
    missing = sorted(set(ref) ^ set(got))
    diff = max(float((ref[k] - got[k]).abs().max()) for k in keys)
    n_ref = float(torch.sqrt(sum((ref[k] ** 2).sum() for k in keys)))
    n_got = float(torch.sqrt(sum((got[k] ** 2).sum() for k in keys)))
    return {"grad_max_abs_diff": diff, "grad_norm_ref": n_ref, "grad_norm_sp": n_got, "grad_missing": missing}


def crossings(inputs: dict, sp: int = 2) -> list[bool]:
    """Per row: does its image/video span (in the right-padded layout the SP path uses) cross a shard boundary?"""
    from pipelines import parallel as P

    order = P.right_padding_order(inputs["attention_mask"])
    length = P.padded_length(inputs["attention_mask"].shape[1], sp)
    types = P.apply_order(inputs["mm_token_type_ids"], order, length, 0)
    bounds = [P.shard_bounds(length, sp, r)[1] for r in range(sp - 1)]
    out = []
    for row in types:
        where = (row > 0).nonzero().flatten().tolist()
        out.append(bool(where) and any(where[0] < b <= where[-1] for b in bounds))
    return out


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def _rl_step(model, batch, backward):
    from pipelines.rl import losses as L
    from pipelines.rl import rollout as R

    inputs, ids, mask, adv, old_logp, ref_logp = batch
    logp = R.completion_logprobs(model, inputs, ids)  # with SP installed, the branch in rollout.py takes the SP path
    losses = {}
    for lt in LOSS_TYPES:
        o = L.policy_loss(logp, adv, mask, old_logp=old_logp, ref_logp=ref_logp, beta=0.04, loss_type=lt,
                          max_completion_length=ids.shape[1])
        losses[lt] = (float(o.loss), float(o.kl), float(o.clip_ratio))
        if lt == "grpo":
            loss = o.loss
    backward(loss)
    return logp.detach(), losses


def reference(family: str, model_dir: str, world: str, zero3: bool) -> dict:
    """One rank's results on each whole batch, on a plain model (before any accelerator: once one holds a ZeRO-3
    config, from_pretrained partitions the weights)."""
    from pipelines.models import load_model, load_processor

    cfg = _cfg(model_dir, world, zero3)
    processor = load_processor(model_dir)
    rl_records, sft_records = _records(world)
    batches = {"mixed": _rl_batch(cfg, processor, rl_records, seed=1),  # left-padded prompts
               "video": _rl_batch(cfg, processor, rl_records[:1], seed=2),
               "image": _rl_batch(cfg, processor, rl_records[1:], seed=3)}
    batches = {k: (v[0], v[1], v[2], v[3], *v[4]) for k, v in batches.items()}
    sft_inputs = _sft_batch(cfg, processor, sft_records)
    plain = load_model(cfg.model, for_training=True)
    res = {"cfg": cfg, "batches": batches, "sft_inputs": sft_inputs, "rl": {}}
    for name, batch in batches.items():
        logp, losses = _rl_step(plain, batch, lambda loss: loss.backward())
        res["rl"][name] = {"logp": logp, "losses": losses, "grads": _grads(plain)}
        plain.zero_grad(set_to_none=True)
    sft = plain(**sft_inputs, use_cache=False).loss
    sft.backward()
    res["sft_loss"], res["grads_sft"] = float(sft), _grads(plain)
    return res


def run_family(family: str, ref: dict, zero3: bool, out: Path, acc) -> None:
    import contextlib

    import torch

    from pipelines import parallel as P
    from pipelines.models import load_model
    from pipelines.models.families import adapter_for
    from pipelines.rl import rollout as R
    from pipelines.zero3 import deepspeed_lockstep

    cfg = ref["cfg"]
    topo = P.setup(2)
    model = load_model(cfg.model, for_training=True)
    P.install(model, topo, adapter_for(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine, opt = acc.prepare(model, opt)
    lock = deepspeed_lockstep(engine, acc.unwrap_model(engine))
    active = lock.active if lock is not None else contextlib.nullcontext

    def backward(loss):
        engine.backward(loss) if zero3 else loss.backward()

    def zero_grad():
        engine.optimizer.zero_grad() if zero3 else opt.zero_grad(set_to_none=True)

    result = {"family": family, "zero3": zero3, "rank": topo.rank, "rl": {}}
    for name, batch in ref["batches"].items():
        with active():
            logp, losses = _rl_step(engine, batch, backward)
        grads = _grads(engine)
        zero_grad()
        r = ref["rl"][name]
        m = batch[2].bool()
        result["rl"][name] = {"logp_max_abs_diff": float((r["logp"] - logp)[m].abs().max()),
                              "losses_ref": r["losses"], "losses_sp": losses,
                              "grads": _compare_grads(r["grads"], grads),
                              "crossing": crossings(batch[0]), "length": int(batch[0]["input_ids"].shape[1]),
                              "left_padded": bool((batch[0]["attention_mask"][:, 0] == 0).any())}
    with active():
        sft = P.lm_loss(engine, ref["sft_inputs"])
    backward(sft)
    result["sft"] = {"loss_ref": ref["sft_loss"], "loss_sp": float(sft),
                     "grads": _compare_grads(ref["grads_sft"], _grads(engine)),
                     "crossing": crossings(ref["sft_inputs"])}
    zero_grad()
    sp = P.of(engine)
    result["counts"] = dict(sp.counts)
    # Control: the same SP forward without the move to right padding (left pads in front of real tokens are attended
    # once the mask is dropped) must NOT match: it shows the comparison can fail.
    inputs, ids, mask = ref["batches"]["mixed"][:3]
    keep_order = P.right_padding_order
    P.right_padding_order = lambda msk: torch.arange(msk.shape[1]).expand(msk.shape[0], -1)
    try:
        with torch.no_grad(), active():
            logp_left = R.completion_logprobs(engine, inputs, ids)
    finally:
        P.right_padding_order = keep_order
    result["left_padding_logp_max_abs_diff"] = float((ref["rl"]["mixed"]["logp"] - logp_left)[mask.bool()].abs().max())
    if acc.is_main_process:
        (out / f"{family}-{'zero3' if zero3 else 'ddp'}.json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    sp.remove()
    if zero3:
        acc.free_memory(engine)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    out = Path(os.environ["PROBE_OUT"])
    zero3 = os.environ.get("PROBE_ZERO3") == "1"
    from pipelines import launch as LA

    families = os.environ.get("PROBE_FAMILIES", "qwen2_5_vl").split(",")
    refs = {f: reference(f, str(Path(os.environ["PROBE_MODELS"]) / f), os.environ["PROBE_WORLD"], zero3)
            for f in families}
    cfg = refs[families[0]]["cfg"]
    if zero3:
        LA.init_deepspeed_distributed(cfg)
    acc = LA.make_accelerator(cfg, micro_batch_size=1, max_grad_norm=1.0, hidden_size=64)
    for f in families:
        run_family(f, refs[f], zero3, out, acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
