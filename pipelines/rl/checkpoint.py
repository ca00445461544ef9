"""Checkpoints: save / find / restore for `train rl`, and the completeness check that `train sft` shares.

What a `train rl` checkpoint holds (``<run dir>/checkpoints/step-N``; written to ``.step-N.tmp`` and renamed once every
rank has written its part, so a run killed mid-save never leaves a directory that `--resume` would pick up):

  trainer_state.json    step, epoch and position in this epoch's shard (the data position), total steps, skipped count,
                        world size, algo, LoRA or full, DeepSpeed ZeRO stage, the base model's path and fingerprint
                        (the frozen reference IS the base model: another base would change every KL), the records'
                        identity (count, shuffle, seed, max_samples: the order the position indexes), the file list
  model.safetensors + config + processor (full fine-tuning) | adapter_model.safetensors + adapter_config (LoRA)
  optimizer.pt          AdamW state (DDP / one process: rank 0's, the replicas are identical)
  accelerate/           DeepSpeed instead: the engine's checkpoint (weights, every rank's optimizer partition)
  scheduler.pt          the LR schedule
  rng-rank{R}.pt        per rank: the Python, NumPy, torch (CPU and CUDA) generators, the frame-shuffle generator and
                        this rank's skip counters (data.max_skip_fraction is judged over the whole run)

Nothing else carries over from one step to the next: the temporal and length bonuses are pure functions of a step's
groups (rl/advantages.py), the reference is the frozen base model (fingerprinted above), and the rollout engine starts
from the restored policy. Not restorable: the vLLM engine's own sampler state (a resumed vLLM run samples the same
policy with another random stream; with the HF backend sampling draws from the torch generator restored above).

Restore order: `check_rl_checkpoint` before anything is loaded (refuses with CheckpointError a checkpoint missing a
file, or written by another number of ranks / base model / LoRA layout / ZeRO stage / record order), then the
weights (the trainer's setup loads them), optimizer, scheduler, RNG and data position, and last `verify_weights`:
the policy's weights, laid out the way `save_pretrained` writes them, must equal the checkpoint's tensors exactly.

`train sft` checkpoints are transformers.Trainer's ``checkpoint-N``. transformers 5.20 resumes them with a plain
``model.load_state_dict(strict=False)`` of the keys `save_pretrained` wrote in the hub layout (``model.layers.*``,
``visual.*``) where the model's own are ``model.language_model.*``, ``model.visual.*``: nothing matches, nothing is
loaded, and training goes on from the base weights (upstream huggingface/transformers#43701, open). `load_hf_weights`
loads such a checkpoint into the live model through transformers' own conversion rules (those `from_pretrained`
applies, MoE expert fusion included), in place, refusing any key left over or missing; `verify_weights` checks it.
`check_sft_checkpoint` is SFT's completeness check (files of every rank, from the manifest `videor1_checkpoint.json`
the SFT trainer writes into each checkpoint once every rank has saved).

Written here because no library does it: the Trainer's resume is the bug above, and accelerate's save_state /
load_state cover weights, optimizer and RNG but neither the data position, the record order, the skip counters nor
the check that a restore is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import CheckpointError, storage_errors

log = logging.getLogger("videor1.checkpoint")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
SFT_MANIFEST = "videor1_checkpoint.json"
FORMAT = 2
ADAPTERS = "adapter_model.safetensors"
# What a resume must find unchanged; anything else in the config may change (e.g. more max_steps).
_IDENTITY_KEYS = ("world_size", "lora", "zero_stage", "sequence_parallel")


def _say(msg: str, warn: bool = False) -> None:
    (log.warning if warn else log.info)(msg)
    if warn or os.environ.get("VIDEOR1_QUIET") != "1":
        print(("warning: " if warn else "") + msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Identities: the base model (the reference) and the record order (what the data position indexes)
def model_fingerprint(path: str | os.PathLike) -> str | None:
    """sha256 over config.json and samples of the weight files (size, the safetensors header, 16 blocks of 64 KiB
    spread over each file): two models of one architecture differ in every block (random or trained weights), and a
    7B model is fingerprinted without reading its 15 GB. None for a hub id (its name is its identity)."""
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p.glob("model*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))
    for f in [p / "config.json", *files]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        block = 1 << 16
        with open(f, "rb") as fh:
            if f.suffix == ".json":
                h.update(fh.read())
                continue
            for i in range(16):
                fh.seek(max(0, (size - block) * i // 15))
                h.update(fh.read(block))
    return h.hexdigest()


def base_model_identity(cfg) -> dict[str, Any]:
    name = cfg.model.name_or_path
    resolved = str(Path(name).resolve()) if Path(name).exists() else name
    return {"path": resolved, "fingerprint": model_fingerprint(name)}


def records_identity(cfg, n_records: int) -> dict[str, Any]:
    return {"records": int(n_records), "shuffle": bool(cfg.data.shuffle), "seed": int(cfg.run.seed),
            "max_samples": cfg.data.max_samples}


def _same_base(saved: dict | None, now: dict) -> bool:
    if not saved:
        return True  # a checkpoint written before base models were recorded
    if saved.get("fingerprint") and now.get("fingerprint"):
        return saved["fingerprint"] == now["fingerprint"]
    return saved.get("path") == now.get("path")


def _check_identity(path: Path, saved: dict, expect: dict, *, resume_hint: str, reference: bool = False) -> None:
    """Refuse a checkpoint written by another set-up (what it holds cannot be restored into this one)."""
    problems = []

    def said(key: str, value: Any) -> str:
        if key == "world_size":
            return f"{value} rank{'s' if int(value) != 1 else ''}"
        if key == "lora":
            return "LoRA adapters" if value else "full fine-tuning"
        if key == "sequence_parallel":  # the data shards and RNG streams are per data-parallel rank
            return f"distributed.sequence_parallel={value}"
        return f"DeepSpeed ZeRO-{value}" if value else "no DeepSpeed"

    for key in _IDENTITY_KEYS:
        if key in saved and key in expect and saved[key] != expect[key]:
            problems.append(f"{said(key, saved[key])} (this run: {said(key, expect[key])})")
    if "base_model" in expect and not _same_base(saved.get("base_model"), expect["base_model"]):
        problems.append(f"base model {saved['base_model'].get('path')} (this run: {expect['base_model']['path']}"
                        + ("; it is also the frozen reference)" if reference else ")"))
    if saved.get("records") and expect.get("records"):
        diff = [k for k in ("records", "shuffle", "seed", "max_samples") if saved["records"].get(k) !=
                expect["records"].get(k)]
        if diff:
            problems.append("record order (" + ", ".join(f"{k} {saved['records'].get(k)} -> {expect['records'].get(k)}"
                                                         for k in diff) + ")")
    if problems:
        raise CheckpointError(f"cannot resume from {path}: it was written with " + "; ".join(problems),
                              hint=resume_hint)


# ---------------------------------------------------------------------------------------------------------------------
# Weights: transformers' on-disk layout <-> the live model
def tied_names(model) -> set[str]:
    """Second names of tied parameters (lm_head.weight when it IS embed_tokens.weight)."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def saved_layout(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's own keys) the way `save_pretrained` writes it: tied duplicates dropped, transformers'
    weight conversion reverted (hub key names, MoE experts split)."""
    from transformers.core_model_loading import revert_weight_conversion

    tied = tied_names(model)
    return revert_weight_conversion(model, {k: v for k, v in state.items() if k not in tied})


def weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [ckpt / n for n in names]
    single = ckpt / "model.safetensors"
    return [single] if single.is_file() else []


def read_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained checkpoint (single file or sharded), on the CPU, keyed as on disk."""
    from safetensors.torch import load_file

    files = weight_files(Path(ckpt))
    if not files:
        raise CheckpointError(f"{ckpt}: no model.safetensors (or index) to load weights from")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with storage_errors(f, "checkpoint weights", "read"):
            out.update(load_file(str(f)))
    return out


def to_model_layout(model, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint tensors (as save_pretrained wrote them) -> the model's own state-dict keys, through the conversion
    rules from_pretrained applies (transformers.conversion_mapping); returns (converted, checkpoint keys that match
    nothing)."""
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    own = model.state_dict()
    todo: dict[str, Any] = {}
    unexpected: list[str] = []
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if new not in own and key in own:
            new, pattern = key, None
        if new not in own:
            unexpected.append(key)
            continue
        if pattern is not None:
            transform = todo.setdefault(new, deepcopy(by_pattern[pattern]))
        else:
            transform = todo.setdefault(new, WeightRenaming(key, new))
            pattern = key
        transform.add_tensor(new, key, pattern, tensor)
    out: dict[str, torch.Tensor] = {}
    for first, transform in todo.items():
        for name, value in transform.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out, unexpected


def load_hf_weights(model, ckpt: str | os.PathLike) -> None:
    """Load a full-model checkpoint (save_pretrained layout) into `model` in place (the Parameter objects stay, so an
    optimizer built on them keeps them); every model weight must come from the checkpoint and every checkpoint
    tensor must land (CheckpointError otherwise), then `verify_weights`."""
    ckpt = Path(ckpt)
    converted, unexpected = to_model_layout(model, read_weights(ckpt))
    own = model.state_dict()
    tied = tied_names(model)
    missing = sorted(k for k in own if k not in converted and k not in tied
                     and not k.endswith(("inv_freq", "position_ids")))  # non-persistent in some families
    shapes = sorted(k for k, t in converted.items() if tuple(t.shape) != tuple(own[k].shape))
    if unexpected or missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model weight(s) not in the checkpoint (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensor(s) the model has no place for (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(converted[shapes[0]].shape)} vs "
                         f"{tuple(own[shapes[0]].shape)})")
        raise CheckpointError(f"cannot resume from {ckpt}: its weights do not fit this model: " + "; ".join(parts),
                              hint="resume with the model (model.name_or_path, family, model.lora) the checkpoint "
                              "was trained from")
    with torch.no_grad():
        for k, t in converted.items():
            own[k].copy_(t.to(device=own[k].device, dtype=own[k].dtype))
    verify_weights(model, ckpt)


def weight_mismatches(model, ckpt: str | os.PathLike, state: dict[str, torch.Tensor] | None = None, *,
                      adapters: bool = False) -> list[str]:
    """What differs between the model's weights (``state``: its state dict, e.g. gathered from DeepSpeed; default its
    own) saved the way the checkpoint was saved, and the checkpoint's tensors: keys missing either side, or values
    not bit-identical (compared in the file's dtype). Empty: the model holds exactly the checkpoint."""
    from safetensors import safe_open

    ckpt = Path(ckpt)
    state = model.state_dict() if state is None else state
    if adapters:
        from peft import get_peft_model_state_dict

        mine = get_peft_model_state_dict(model, state_dict=state)
        files = [ckpt / ADAPTERS]
    else:
        mine = saved_layout(model, state)
        files = weight_files(ckpt)
    if not files or not all(f.is_file() for f in files):
        return [f"no {'adapter' if adapters else 'model'} weights in {ckpt}"]
    out: list[str] = []
    seen: set[str] = set()
    for f in files:
        with storage_errors(f, "checkpoint weights", "read"), safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                seen.add(k)
                if k not in mine:
                    out.append(f"{k}: in the checkpoint, not in the model")
                    continue
                want = fh.get_tensor(k)
                got = mine[k].detach().to("cpu")
                if got.shape != want.shape:
                    out.append(f"{k}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
                elif not torch.equal(got.to(want.dtype), want):
                    diff = (got.float() - want.float()).abs().max().item()
                    out.append(f"{k}: differs (max |diff| {diff:.3g}; model {got.dtype}, checkpoint {want.dtype})")
    out += [f"{k}: in the model, not in the checkpoint" for k in sorted(set(mine) - seen)]
    return out


def verify_weights(model, ckpt: str | os.PathLike, state: dict[str, torch.Tensor] | None = None, *,
                   adapters: bool = False) -> None:
    bad = weight_mismatches(model, ckpt, state, adapters=adapters)
    if bad:
        raise CheckpointError(f"resume from {ckpt} did not restore the weights it holds: {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}", hint="the checkpoint does not fit this model/settings; resume with the "
                              "settings it was written with (model.dtype, model.lora, the same family)")


# ---------------------------------------------------------------------------------------------------------------------
# train rl: list, find, check
def checkpoint_steps(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Saved checkpoints of a run dir, oldest first (in-progress ones are named .step-N.tmp and never listed)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    out = []
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists():
                try:
                    out.append((int(p.name[5:]), p))
                except ValueError:
                    pass
    return sorted(out)


def find_rl_checkpoint(resume: str | None, cfg, run_id: str | None = None) -> Path | None:
    """`--resume PATH` (a step-N dir, or a run dir: its latest checkpoint) or `auto`: the latest checkpoint of the
    newest other train-rl run in the registry (falling back to a scan of run.output_dir). None = start fresh."""
    if not resume:
        return None
    if resume != "auto":
        p = Path(resume)
        if (p / STATE_FILE).exists():
            return p
        steps = checkpoint_steps(p)
        if steps:
            return steps[-1][1]
        raise CheckpointError(f"--resume {resume}: no checkpoint there",
                              hint="pass a <run dir>/checkpoints/step-N directory, a run directory, or 'auto'")
    candidates: list[Path] = []
    try:
        from pipelines.registry import Registry

        for r in Registry(cfg.registry_path()).list_runs(kind="train-rl"):
            if r.get("id") != run_id and r.get("run_dir"):
                candidates.append(Path(r["run_dir"]))
    except Exception:  # noqa: BLE001 - the registry is a convenience here; fall back to the directory scan
        pass
    out_dir = Path(cfg.run.output_dir)
    if out_dir.is_dir():
        candidates += sorted((p for p in out_dir.glob("train-rl-*") if run_id is None or run_id not in p.name),
                             key=lambda p: p.stat().st_mtime, reverse=True)
    best: tuple[float, Path] | None = None
    for d in candidates:
        steps = checkpoint_steps(d)
        if steps:
            mt = (steps[-1][1] / STATE_FILE).stat().st_mtime
            if best is None or mt > best[0]:
                best = (mt, steps[-1][1])
    return best[1] if best else None


def rl_expectations(trainer) -> dict[str, Any]:
    """What a checkpoint must have been written with to be restorable into this trainer."""
    from pipelines.launch import deepspeed_zero_stage

    return {"world_size": trainer.world, "lora": bool(trainer.lora), "zero_stage": deepspeed_zero_stage(trainer.cfg),
            "sequence_parallel": int(trainer.cfg.distributed.sequence_parallel),
            "base_model": base_model_identity(trainer.cfg),
            "records": records_identity(trainer.cfg, len(trainer.records))}


def rl_checkpoint_files(state: dict[str, Any]) -> list[str]:
    """The files a complete train-rl checkpoint holds (relative paths), from its trainer_state.json."""
    files = [STATE_FILE, "scheduler.pt"]
    files += [f"rng-rank{r}.pt" for r in range(int(state.get("world_size", 1)))]
    if state.get("lora"):
        files += [ADAPTERS, "adapter_config.json"]
    else:
        files += ["config.json"]
    files += ["accelerate"] if state.get("zero_stage") or state.get("deepspeed") else ["optimizer.pt"]
    return files


def check_rl_checkpoint(path: str | os.PathLike, expect: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, or CheckpointError (before anything is loaded) when it cannot be fully restored."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: {STATE_FILE} unreadable ({e})",
                              hint="pass another checkpoint (--resume DIR)") from None
    if "lora" not in state:  # format 1: no layout recorded; infer it from the files
        state["lora"] = (path / ADAPTERS).is_file()
        state["zero_stage"] = 1 if (path / "accelerate").is_dir() else 0
    elif "zero_stage" not in state:
        state["zero_stage"] = 0
    missing = [f for f in rl_checkpoint_files(state) if not (path / f).exists()]
    if not state["lora"] and not weight_files(path):
        missing.append("model.safetensors")
    if missing:
        raise CheckpointError(f"cannot resume from {path}: incomplete checkpoint, missing {', '.join(missing)}",
                              hint="resume from an earlier complete checkpoint (--resume <run dir>/checkpoints/step-N)")
    saved = dict(state)
    if saved.get("format", 1) < 2 and (saved["zero_stage"] > 0) == (expect.get("zero_stage", 0) > 0):
        saved["zero_stage"] = expect.get("zero_stage", 0)  # format 1 recorded DeepSpeed on/off only
    hint = (f"resume with the set-up it was written with (--nproc {saved.get('world_size')}, the same --model, "
            "model.lora and distributed.deepspeed)")
    if not saved.get("lora"):  # a full fine-tuning checkpoint is a model
        hint += f"; to train on from its weights in another set-up, start a new run with --model {path}"
    _check_identity(path, saved, expect, resume_hint=hint, reference=True)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# train rl: save
def model_state_dict(trainer):
    """The policy's full state dict (collective under ZeRO-3: every rank calls it; rank 0 gets the tensors)."""
    return trainer.accelerator.get_state_dict(trainer.model)


def save_model(trainer, out: Path, merge_lora: bool = False) -> None:
    """HF model (or LoRA adapters) + processor into `out` (rank 0 writes; every rank takes part)."""
    if trainer.lora and merge_lora and getattr(trainer, "zero3", False):
        return _save_merged_lora_zero3(trainer, out)
    state = model_state_dict(trainer)
    if state is not None and not trainer.lora:
        tied = tied_names(trainer.unwrapped)
        state = {k: v for k, v in state.items() if k not in tied}
    if trainer.is_main:
        with storage_errors(out, "model"):
            out.mkdir(parents=True, exist_ok=True)
            model = trainer.unwrapped
            if trainer.lora and merge_lora:
                model = model.merge_and_unload()
                model.save_pretrained(out)
            else:
                model.save_pretrained(out, state_dict=state, safe_serialization=True)
            trainer.processor.save_pretrained(out)


def _save_merged_lora_zero3(trainer, out: Path) -> None:
    save_merged_lora_zero3(trainer.unwrapped, trainer.processor, out, is_main=trainer.is_main)


def save_merged_lora_zero3(model, processor, out: Path, *, is_main: bool) -> None:
    """A PEFT model under ZeRO-3, saved with its adapters merged (every rank calls it; rank 0 writes).

    ZeRO-3 partitions every weight: peft's merge_and_unload on one rank would merge shards ("size of tensor a (0)
    must match ..."). All ranks gather the weights (collective); inside, the adapters are merged into the base
    weights, rank 0 copies them out under the base model's names, and the merge is undone before the gather ends."""
    from pipelines.generation.vllm import gathered

    base = model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    with gathered(list(model.parameters())):
        model.merge_adapter()
        try:
            if is_main:
                for name, p in base.named_parameters():
                    if "lora_" in name:
                        continue
                    state[name.replace(".base_layer.", ".")] = p.detach().to("cpu").clone()
        finally:
            model.unmerge_adapter()
    if is_main:
        with storage_errors(out, "model"):
            out.mkdir(parents=True, exist_ok=True)
            base.save_pretrained(out, state_dict=state, safe_serialization=True)
            processor.save_pretrained(out)


def _rank_state(trainer) -> dict[str, Any]:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "shuffle": trainer.shuffle_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rows_seen": trainer._rows_seen, "rows_skipped": trainer._rows_skipped, "skip_example": trainer._skip_example,
    }


def save_rl_checkpoint(trainer) -> Path:
    """<run dir>/checkpoints/step-N (see the module docstring). Older ones beyond rl.save_total_limit are deleted."""
    acc, rl = trainer.accelerator, trainer.cfg.rl
    root = trainer.run_dir / CHECKPOINT_DIR
    final = root / f"step-{trainer.step}"
    tmp = root / f".step-{trainer.step}.tmp"
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        with storage_errors(tmp, "checkpoint"):
            tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_model(trainer, tmp)
    with storage_errors(tmp, "checkpoint"):
        if trainer.deepspeed:
            acc.save_state(str(tmp / "accelerate"))
        elif trainer.is_main:
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rank_state(trainer), tmp / f"rng-rank{trainer.rank}.pt")
        if trainer.is_main:
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            expect = rl_expectations(trainer)
            state = {"format": FORMAT, "step": trainer.step, "epoch": trainer.epoch, "position": trainer.position,
                     "total_steps": trainer.total_steps, "skipped": trainer.skipped_total,
                     "config_hash": trainer.cfg.hash(), "run_id": getattr(trainer.run, "id", None),
                     "algo": rl.algo, **expect}
            state["files"] = rl_checkpoint_files(state)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    acc.wait_for_everyone()
    if trainer.is_main:
        with storage_errors(final, "checkpoint"):
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        if rl.save_total_limit:
            for _, old in checkpoint_steps(trainer.run_dir)[: -rl.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------------
# train rl: restore
def restore_rl_checkpoint(trainer, path: str | os.PathLike) -> None:
    """Optimizer, scheduler, RNG streams, data position and skip counters (the weights were loaded from `path` in
    setup, after `check_rl_checkpoint`), then the weights are verified against the checkpoint's."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    trainer.step, trainer.epoch, trainer.position = int(state["step"]), int(state["epoch"]), int(state["position"])
    trainer.skipped_total = int(state.get("skipped", 0))
    if trainer.deepspeed:
        trainer.accelerator.load_state(str(path / "accelerate"))
    else:
        # map_location="cpu", not the accelerator's device: a CPU rank's device is "cpu:0", which torch.load cannot
        # restore to ("don't know how to restore data location ... tagged with cpu:0"); load_state_dict moves the
        # state onto each parameter's device anyway.
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        if trainer.step > 0 and not opt.get("state"):
            raise CheckpointError(f"cannot resume from {path}: optimizer.pt holds no optimizer state",
                                  hint="resume from another checkpoint")
        trainer.optimizer.load_state_dict(opt)
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng = torch.load(path / f"rng-rank{trainer.rank}.pt", map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    trainer.shuffle_gen.set_state(rng["shuffle"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer._rows_seen = int(rng.get("rows_seen", 0))
    trainer._rows_skipped = int(rng.get("rows_skipped", 0))
    trainer._skip_example = rng.get("skip_example", "") or ""
    verify_policy(trainer, path)
    if trainer.is_main:
        _say(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch}, position {trainer.position})")


def verify_policy(trainer, path: Path) -> None:
    """The restored policy's weights equal the checkpoint's (all ranks raise together: under DeepSpeed the gather is
    collective, so rank 0 compares and tells the others)."""
    if trainer.deepspeed:
        state = model_state_dict(trainer)
        bad = weight_mismatches(trainer.unwrapped, path, state, adapters=trainer.lora) if trainer.is_main else []
        if trainer.world > 1:
            import torch.distributed as dist

            box = [bad]
            dist.broadcast_object_list(box, src=0)
            bad = box[0]
    else:
        bad = weight_mismatches(trainer.unwrapped, path, adapters=trainer.lora)
    if bad:
        raise CheckpointError(f"resume from {path} did not restore the weights it holds: {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}", hint="resume with the settings the checkpoint was written with")


# ---------------------------------------------------------------------------------------------------------------------
# train sft: the completeness check on transformers.Trainer checkpoints
def sft_expectations(cfg, world_size: int) -> dict[str, Any]:
    from pipelines.launch import deepspeed_zero_stage

    return {"world_size": int(world_size), "lora": bool(cfg.model.lora.enabled),
            "zero_stage": deepspeed_zero_stage(cfg), "sequence_parallel": int(cfg.distributed.sequence_parallel),
            "base_model": base_model_identity(cfg)}


def write_sft_manifest(ckpt: str | os.PathLike, expect: dict[str, Any], global_step: int) -> None:
    """Rank 0, once every rank has written its part of checkpoint-N: what it holds and was written with."""
    ckpt = Path(ckpt)
    manifest = {"format": FORMAT, "global_step": int(global_step), **expect}
    manifest["files"] = sft_checkpoint_files(manifest, ckpt)
    with storage_errors(ckpt / SFT_MANIFEST, "checkpoint manifest"):
        (ckpt / SFT_MANIFEST).write_text(json.dumps(manifest, indent=2))


def _deepspeed_tag(ckpt: Path) -> str | None:
    latest = ckpt / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    tags = sorted(p.name for p in ckpt.glob("global_step*") if p.is_dir())
    return tags[-1] if tags else None


def sft_checkpoint_files(manifest: dict[str, Any], ckpt: Path) -> list[str]:
    world = int(manifest.get("world_size", 1))
    files = ["trainer_state.json", "scheduler.pt"]
    files += ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
    files += [ADAPTERS] if manifest.get("lora") else []
    if manifest.get("zero_stage"):  # DeepSpeed's engine checkpoint: every rank's optimizer partition
        tag = _deepspeed_tag(ckpt) or "global_step?"
        files += [f"{tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    else:
        files += ["optimizer.pt"]
    return files


def sft_checkpoint_problems(ckpt: str | os.PathLike, expect: dict[str, Any] | None = None) -> list[str]:
    """Why checkpoint-N cannot be fully restored (empty: complete). Without a manifest (a checkpoint of an older
    videor1, or a save killed before it) the files are checked for the expected set-up."""
    ckpt = Path(ckpt)
    manifest: dict[str, Any] = {}
    if (ckpt / SFT_MANIFEST).is_file():
        try:
            manifest = json.loads((ckpt / SFT_MANIFEST).read_text())
        except (OSError, ValueError):
            return [f"{SFT_MANIFEST} unreadable"]
    if not (ckpt / "trainer_state.json").is_file():
        return ["trainer_state.json missing (a save that did not finish)"]
    layout = dict(expect or {}, **{k: v for k, v in manifest.items() if k in _IDENTITY_KEYS})
    if not manifest:
        rngs = sorted(ckpt.glob("rng_state_*.pth"))
        layout["world_size"] = len(rngs) if rngs else 1
        layout["lora"] = (ckpt / ADAPTERS).is_file()
        layout["zero_stage"] = (expect or {}).get("zero_stage", 0) if _deepspeed_tag(ckpt) else 0
        if _deepspeed_tag(ckpt) and not layout["zero_stage"]:
            layout["zero_stage"] = 1
    missing = [f for f in sft_checkpoint_files(layout, ckpt) if not (ckpt / f).exists()]
    # Under DeepSpeed the engine's checkpoint holds the module too (ZeRO-3 without stage3_gather_16bit_weights_on_
    # model_save writes no model.safetensors); elsewhere the weights file is the only copy.
    if not layout.get("lora") and not weight_files(ckpt) and not layout.get("zero_stage"):
        missing.append("model.safetensors")
    return [f"missing {', '.join(missing)}"] if missing else []


def check_sft_checkpoint(ckpt: str | os.PathLike, expect: dict[str, Any]) -> None:
    """CheckpointError unless checkpoint-N is complete and was written by this set-up (ranks, LoRA, ZeRO stage,
    base model)."""
    ckpt = Path(ckpt)
    problems = sft_checkpoint_problems(ckpt, expect)
    if problems:
        raise CheckpointError(f"cannot resume from {ckpt}: incomplete checkpoint ({'; '.join(problems)})",
                              hint="resume from an earlier checkpoint (--resume <output dir>/checkpoint-N)")
    saved: dict[str, Any] = {}
    if (ckpt / SFT_MANIFEST).is_file():
        saved = json.loads((ckpt / SFT_MANIFEST).read_text())
    else:
        rngs = sorted(ckpt.glob("rng_state_*.pth"))
        saved = {"world_size": len(rngs) if rngs else 1, "lora": (ckpt / ADAPTERS).is_file()}
    _check_identity(ckpt, saved, expect, resume_hint=(
        f"resume with the set-up it was written with (--nproc {saved.get('world_size')}, the same --model, "
        "model.lora and distributed.deepspeed)" + ("" if saved.get("lora") else
                                                   f"; or start a new run from its weights with --model {ckpt}")))

