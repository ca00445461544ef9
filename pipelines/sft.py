"""Supervised cold start (`videor1 train sft`): assistant-only labels, batched mixed media, transformers.Trainer.

Why `transformers.Trainer` with our own dataset + collator (not TRL's SFTTrainer)
--------------------------------------------------------------------------------
TRL's SFTTrainer carries video only through workarounds (frames injected by ``set_transform`` plus an empty
``images`` column) and tokenises the conversation itself, which is where Video-R1's two SFT bugs came from (loss on
the system/user prompt, #40/#91; a batch-1-only collator, #71). Here the project owns the two pieces that matter and
the Trainer does the rest (optimizer, schedule, grad accumulation, DDP/DeepSpeed, checkpoints, resume):

- `SftDataset.__getitem__` (runs in DataLoader workers): record -> frames (`pipelines.models.decode_media`, the
  project's sampler) -> ONE sample's tensors via `encode_example`. A broken record (missing media, no ``process``,
  longer than ``sft.max_length``) comes back as a *skip marker* naming its id and the reason; it is never replaced
  by another sample.
- `SftCollator`: right-pads text (``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` and
  ``mm_token_type_ids`` with 0), concatenates ``pixel_values`` / ``pixel_values_videos`` and the per-item
  ``image_grid_thw`` / ``video_grid_thw`` / ``second_per_grid_ts`` in sample order, and carries the skip markers in
  ``batch["skipped"]`` so the main process counts and logs them (workers cannot share a counter).
- `SftTrainer.compute_loss` pops the markers, counts tokens for tokens/s, and hands the rest to the model forward
  (``pixel_values_videos`` and ``video_grid_thw`` included: tests/test_sft.py proves it with a forward hook).

The label span
--------------
The sequence is ``prompt_ids + target_ids`` where ``prompt_ids`` is the processor's encoding of the chat template
rendered with ``add_generation_prompt=True`` (system, user with media, ``<|im_start|>assistant\\n``) and
``target_ids = tokenize(process + "\\n" + solution) + [<|im_end|>]``. Exactly ``target_ids`` are labelled; every
system, user, media and padding token is -100. The chat template's trailing ``"\\n"`` after ``<|im_end|>`` is not
part of the sequence: it is never generated (generation stops at ``<|im_end|>``) and, being last, it would only be
an input whose prediction has no label, so it changes nothing. Tokenising the target on its own (rather than the
whole rendered string) is also what inference sees: the prompt ends at ``assistant\\n`` and the model generates the
answer tokens after it. `encode_example` checks that the template renders the conversation as prompt + target +
``<|im_end|>`` (a template that rewrites assistant turns, e.g. one that strips ``<think>``, is refused).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipelines.errors import DataError, VideoR1Error, check_skip_rate

log = logging.getLogger("videor1.sft")

IGNORE_INDEX = -100
EOS_TOKEN = "<|im_end|>"
SKIP_KEY = "skipped"
VISUAL_CAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


# ---------------------------------------------------------------------------------------------------------------------
# One sample
def split_conversation(processor, messages: list[dict]) -> tuple[str, str]:
    """(prompt text ending in the assistant header, assistant target text) of an SFT conversation.

    Raises DataError when the chat template does not render the conversation as prompt + target + <|im_end|>.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT conversation must end with the assistant turn")
    content = messages[-1]["content"]
    target = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(messages, tokenize=False)
    if not (full.startswith(prompt) and full[len(prompt):].startswith(target + EOS_TOKEN)):
        raise VideoR1Error(
            "the model's chat template does not render an assistant turn as prompt + content + <|im_end|>",
            hint="SFT labels need a Qwen2.5-VL style chat template (the processor's chat_template)",
        )
    return prompt, target


def encode_example(processor, messages: list[dict], media, eos_id: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one SFT sample: input_ids, labels (-100 outside the assistant span), attention_mask,
    mm_token_type_ids and the visual inputs of its image/video (see the module docstring for the span)."""
    from pipelines.models import encode_batch

    import dataclasses

    import numpy as np

    prompt, target = split_conversation(processor, messages)
    tok = processor.tokenizer
    # Frames may come read-only from the frame cache; torch warns on non-writable arrays.
    media = dataclasses.replace(
        media, video=None if media.video is None else np.require(media.video, requirements="W"),
        image=None if media.image is None else np.require(media.image, requirements="W"))
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN) if eos_id is None else eos_id
    enc = encode_batch(processor, [prompt], [media], padding_side="right")
    n = int(enc["attention_mask"][0].sum())
    prompt_ids = enc["input_ids"][0, :n]
    target_ids = torch.tensor(tok(target, add_special_tokens=False)["input_ids"] + [eos_id], dtype=prompt_ids.dtype)
    out: dict[str, torch.Tensor] = {
        "input_ids": torch.cat([prompt_ids, target_ids]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), target_ids]),
    }
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in enc:
        tt = enc["mm_token_type_ids"][0, :n]
        out["mm_token_type_ids"] = torch.cat([tt, torch.zeros_like(target_ids, dtype=tt.dtype)])
    for k in VISUAL_CAT_KEYS:
        if k in enc:
            out[k] = enc[k]
    return out


def skip_marker(record_id: Any, reason: str, detail: str = "") -> dict[str, Any]:
    return {SKIP_KEY: (str(record_id), reason, detail)}


# ---------------------------------------------------------------------------------------------------------------------
class SftDataset(torch.utils.data.Dataset):
    """Video-R1-COT records (Arrow-backed, `pipelines.records.load_records`); media decoded lazily per item."""

    def __init__(self, file: str | os.PathLike, cfg, processor, root: str | os.PathLike | None = None, *,
                 max_samples: int | None = None, shuffle_seed: int | None = None, max_length: int | None = None):
        from pipelines.prompts import load_template
        from pipelines.records import default_root, json_columns, load_records

        self.file = str(file)
        ds = load_records(file)
        if "process" not in ds.column_names:
            raise DataError("no record has a 'process' (the reasoning trace SFT trains on)", file=self.file,
                            field="process", hint="SFT reads Video-R1-COT records; make them with `videor1 annotate`")
        self.file_index = list(range(len(ds)))  # row -> record index in the file, for error messages
        if max_samples is not None and max_samples < len(ds):
            if shuffle_seed is not None:  # the permutation ds.shuffle(seed=...) draws, kept to name file indices
                import numpy as np

                self.file_index = [int(x) for x in np.random.default_rng(shuffle_seed).permutation(len(ds))]
            self.file_index = self.file_index[:max_samples]
            ds = ds.select(self.file_index)
        self.ds = ds
        self.json_cols = json_columns(ds)
        self.cfg = cfg
        self.processor = processor
        self.root = Path(root) if root else default_root(file)
        self.template = load_template(cfg.prompt.template)
        self.max_length = max_length
        self.eos_id = processor.tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> dict[str, Any]:
        from pipelines.records import record_dict

        return record_dict(self.ds[int(i)], self.json_cols)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from pipelines.models import decode_media
        from pipelines.models.families import adapter_for
        from pipelines.prompts import build_messages
        from pipelines.validate import check_record

        rec = self.record(i)
        rid = rec.get("problem_id", f"#{i}")
        try:
            check_record(rec, self.file, self.file_index[int(i)])
            messages = build_messages(rec, self.template, mode="sft")
            media = decode_media(rec, self.cfg, self.root, factor=adapter_for(self.processor).factor)
            ex = encode_example(self.processor, messages, media, self.eos_id)
        except VideoR1Error as e:
            return skip_marker(rid, "media" if type(e).__name__ == "MediaError" else "data", str(e))
        except (OSError, ValueError, RuntimeError) as e:  # a processor that chokes on one sample's media
            return skip_marker(rid, "error", f"{type(e).__name__}: {e}")
        n = int(ex["input_ids"].numel())
        if self.max_length is not None and n > self.max_length:
            return skip_marker(rid, "too_long", f"{n} tokens > sft.max_length {self.max_length}")
        return ex


@dataclass
class SftCollator:
    """Right-pads a list of `encode_example` dicts into one batch; skip markers go to ``batch["skipped"]``."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        skipped = [it[SKIP_KEY] for it in items if it is not None and SKIP_KEY in it]
        skipped += [("?", "none", "dataset returned None") for it in items if it is None]
        ok = [it for it in items if it is not None and SKIP_KEY not in it]
        batch: dict[str, Any] = {SKIP_KEY: skipped}
        if not ok:
            # Keep the keys the Trainer counts (labels) so an all-skipped micro-batch counts 0 label tokens.
            empty = torch.zeros((0, 0), dtype=torch.long)
            batch.update(input_ids=empty, attention_mask=empty.clone(), labels=empty.clone())
            return batch
        width = max(int(it["input_ids"].numel()) for it in ok)

        def pad(key: str, value: int) -> torch.Tensor:
            rows = []
            for it in ok:
                t = it[key]
                rows.append(torch.cat([t, torch.full((width - t.numel(),), value, dtype=t.dtype)]))
            return torch.stack(rows)

        batch["input_ids"] = pad("input_ids", self.pad_token_id)
        batch["attention_mask"] = pad("attention_mask", 0)
        batch["labels"] = pad("labels", IGNORE_INDEX)
        if all("mm_token_type_ids" in it for it in ok):
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        for k in VISUAL_CAT_KEYS:
            parts = [it[k] for it in ok if k in it]
            if parts:
                batch[k] = torch.cat(parts, dim=0)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SkipStats:
    """Samples skipped by reason (train and eval separately), with the first ids of each for the log."""

    counts: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    example: str = ""  # the first skip, for the error when too many are skipped

    def add(self, rid: str, reason: str, keep: int = 20, detail: str = "") -> None:
        if not self.example:
            self.example = f"record {rid}: {detail or reason}"
        self.counts[reason] = self.counts.get(reason, 0) + 1
        lst = self.ids.setdefault(reason, [])
        if len(lst) < keep:
            lst.append(rid)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _trainer_cls():
    from transformers import Trainer

    from pipelines.zero3 import deepspeed_lockstep, drop_tied_duplicates, text_dummy_forward

    class SftTrainer(Trainer):
        """transformers.Trainer that counts skipped samples and tokens; forward gets every visual input."""

        def __init__(self, *args: Any, on_skip: Callable[[str, str, str, bool], None] | None = None,
                     max_skip_fraction: float = 1.0, records_file: str | None = None, sequence_parallel=None,
                     **kw: Any):
            super().__init__(*args, **kw)
            self.sp = sequence_parallel  # pipelines.parallel.Topology; its groups read one data shard each
            self.max_skip_fraction, self.records_file = max_skip_fraction, records_file
            self.skips = {"train": SkipStats(), "eval": SkipStats()}
            self.tokens_seen = 0  # non-pad tokens (text + visual placeholders) of this process's training batches
            self.samples_seen = 0
            self._on_skip = on_skip
            self._lockstep = deepspeed_lockstep(self.model, bool(getattr(self.args, "deepspeed", None)))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            skipped = inputs.pop(SKIP_KEY, None) or []
            split = "train" if model.training else "eval"
            for rid, reason, detail in skipped:
                self.skips[split].add(rid, reason, detail=detail)
                if self._on_skip is not None:
                    self._on_skip(rid, reason, detail, split == "train")
            if split == "train" and skipped:
                st = self.skips["train"]
                check_skip_rate(st.total, st.total + self.samples_seen + int(inputs["input_ids"].shape[0]),
                                self.max_skip_fraction, dataset_size=len(self.train_dataset),
                                file=self.records_file, example=st.example)
            if inputs["input_ids"].numel() == 0 and self._lockstep is not None:
                # All skipped under DeepSpeed: join the other ranks' forward (and vision-tower calls) with a zero loss.
                with self._lockstep.active():
                    out = text_dummy_forward(model, self.processing_class.tokenizer.pad_token_id,
                                             inputs["input_ids"].device)
                loss = out.logits.float().sum() * 0.0
                return (loss, None) if return_outputs else loss
            if inputs["input_ids"].numel() == 0:
                # Every sample of this micro-batch was skipped: a zero loss that still touches every trainable
                # parameter, so DDP/DeepSpeed ranks stay in step.
                loss = sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad),
                           torch.zeros((), device=inputs["input_ids"].device))
                return (loss, None) if return_outputs else loss
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
                self.samples_seen += int(inputs["input_ids"].shape[0])
            with self._lockstep.active() if self._lockstep is not None else nullcontext():
                if self.sp is not None and self.sp.enabled:  # the sequence split over the group, loss gathered
                    from pipelines import parallel

                    loss = parallel.lm_loss(model, inputs)
                    return (loss, {"loss": loss}) if return_outputs else loss
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        # -- checkpoints: saved by transformers, restored through pipelines.rl.checkpoint and checked complete --------
        checkpoint_identity: dict[str, Any] | None = None  # written into each checkpoint's manifest (run_sft sets it)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # transformers 5.20 loads a full model's checkpoint with load_state_dict(strict=False) on keys in the hub
            # layout: nothing matches and the run goes on from the base weights. Adapters (peft) load by their own
            # names; FSDP/DeepSpeed have their own loaders. All are verified in _load_optimizer_and_scheduler.
            from transformers.trainer import _is_peft_model

            from pipelines.rl import checkpoint as C

            model = self.model if model is None else model
            if _is_peft_model(model) or self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            C.load_hf_weights(model, resume_from_checkpoint)

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:
                self._verify_restored(checkpoint)

        def _verify_restored(self, checkpoint) -> None:
            """After every loader ran: the weights equal the checkpoint's (laid out as saved) and the optimizer
            state is there. Every rank raises together (DeepSpeed's gather is collective; rank 0 compares)."""
            from transformers.trainer import _is_peft_model

            from pipelines.errors import CheckpointError
            from pipelines.rl import checkpoint as C

            lora = _is_peft_model(self.model)
            if self.is_deepspeed_enabled:
                if not lora and not C.weight_files(Path(checkpoint)):
                    return  # only DeepSpeed's engine checkpoint holds the weights: its strict load restored them
                state = self.accelerator.get_state_dict(self.deepspeed)
                bad = C.weight_mismatches(self.model, checkpoint, state, adapters=lora) \
                    if self.is_world_process_zero() else []
                if self.args.world_size > 1:
                    import torch.distributed as dist

                    box = [bad]
                    dist.broadcast_object_list(box, src=0)
                    bad = box[0]
            else:
                bad = C.weight_mismatches(self.model, checkpoint, adapters=lora)
                if not bad and not self.optimizer.state_dict().get("state"):
                    bad = ["optimizer.pt: no optimizer state was loaded"]
            if bad:
                raise CheckpointError(f"resume from {checkpoint} did not restore what it holds: {len(bad)} "
                                      f"problem(s), e.g. {bad[0]}",
                                      hint="resume with the settings the checkpoint was written with")

        def _save_rng_state(self, output_dir):
            # Called on every rank after its weights/optimizer/RNG parts: once all are written, rank 0 writes the
            # manifest (before trainer_state.json, the Trainer's last file): a checkpoint with both is complete.
            from pipelines.rl import checkpoint as C

            super()._save_rng_state(output_dir)
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero() and self.checkpoint_identity is not None:
                C.write_sft_manifest(output_dir, self.checkpoint_identity, self.state.global_step)

        def _save_checkpoint(self, model, trial):
            from pipelines.errors import storage_errors

            with storage_errors(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}", "checkpoint"):
                return super()._save_checkpoint(model, trial)

        def get_train_dataloader(self):
            from pipelines import parallel

            return parallel.shard_dataloader(super().get_train_dataloader(), self.sp or parallel.Topology())

        def get_eval_dataloader(self, eval_dataset=None):
            from pipelines import parallel

            return parallel.shard_dataloader(super().get_eval_dataloader(eval_dataset), self.sp or parallel.Topology())

        def evaluation_loop(self, *args, **kwargs):
            if self.sp is not None and self.sp.enabled:  # a group's ranks hold the same batch: count it once
                import functools

                from pipelines import parallel

                self.gather_function = functools.partial(parallel.gather_leaders, self.accelerator, self.sp)
            return super().evaluation_loop(*args, **kwargs)

        def _save(self, output_dir=None, state_dict=None):
            # DeepSpeed ZeRO-1/2 hand over a cloned state dict, where a tied lm_head no longer shares storage with
            # embed_tokens and would be written a second time.
            if state_dict is not None:
                state_dict = drop_tied_duplicates(self.model, state_dict)
            return super()._save(output_dir, state_dict=state_dict)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if inputs.get("input_ids") is not None and inputs["input_ids"].numel() == 0:
                for rid, reason, _detail in inputs.get(SKIP_KEY) or []:
                    self.skips["eval"].add(rid, reason)
                if self._lockstep is not None:  # ZeRO-3: the other ranks' eval forward gathers parameters
                    with torch.no_grad(), self._lockstep.active():
                        text_dummy_forward(model, self.processing_class.tokenizer.pad_token_id,
                                           inputs["input_ids"].device)
                return None, None, None
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    return SftTrainer


# ---------------------------------------------------------------------------------------------------------------------
# Callbacks: registry metrics (rank 0) and a rich progress bar
def _callbacks():
    from transformers import TrainerCallback

    class RegistryCallback(TrainerCallback):
        """Trainer logs -> registry metrics: loss, lr, grad_norm, tokens_per_s, samples_per_s, eval_loss, skipped."""

        RENAME = {"learning_rate": "lr", "eval_loss": "eval_loss", "loss": "loss", "grad_norm": "grad_norm",
                  "epoch": "epoch"}

        def __init__(self, run, trainer_ref: Callable[[], Any]):
            self.run = run
            self.trainer_ref = trainer_ref
            self._t = None
            self._tokens = 0
            self._samples = 0
            self.last: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kw):
            tr = self.trainer_ref()
            self._t, self._tokens, self._samples = time.perf_counter(), tr.tokens_seen, tr.samples_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            tr = self.trainer_ref()
            vals: dict[str, float] = {}
            for k, v in logs.items():
                if k in self.RENAME and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    vals[self.RENAME[k]] = float(v)
            if "loss" in logs and self._t is not None:
                now = time.perf_counter()
                dt = max(now - self._t, 1e-9)
                vals["tokens_per_s"] = (tr.tokens_seen - self._tokens) / dt
                vals["samples_per_s"] = (tr.samples_seen - self._samples) / dt
                self._t, self._tokens, self._samples = now, tr.tokens_seen, tr.samples_seen
            vals["skipped"] = float(tr.skips["train"].total)
            self.last.update(vals)
            if self.run is not None:
                self.run.log_metrics(state.global_step, vals)

    class RichProgressCallback(TrainerCallback):
        """Optimizer steps as a rich progress bar on stderr (rank 0), with the last loss."""

        def __init__(self):
            self.progress = None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero or os.environ.get("VIDEOR1_QUIET") == "1":
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            from pipelines.progress import progress_bar

            self.progress = progress_bar("sft", TextColumn("sft"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                         console=Console(stderr=True), transient=False, unit="steps")
            self.progress.start()
            self.task = self.progress.add_task("sft", total=state.max_steps, completed=state.global_step, info="")

        def on_step_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.progress is not None and logs:
                parts = [f"{k} {logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance(logs.get(k), (int, float))]
                if parts:
                    self.progress.update(self.task, info=" ".join(parts))

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return RegistryCallback, RichProgressCallback


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-N` sub-directory with the largest N, or None. An incomplete one (a save killed
    half-way: no trainer_state.json, a rank's file missing) is passed over, with a warning when it is the newest."""
    from pipelines.rl.checkpoint import sft_checkpoint_problems

    d = Path(directory)
    if not d.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for p in d.glob("checkpoint-*"):
        try:
            found.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    for _n, p in sorted(found, reverse=True):
        problems = sft_checkpoint_problems(p)
        if not problems:
            return p
        if (p / "trainer_state.json").is_file():  # a finished-looking save that lacks a file: say so
            import sys

            msg = f"passing over incomplete checkpoint {p} ({'; '.join(problems)})"
            log.warning(msg)
            print(f"warning: {msg}", file=sys.stderr, flush=True)
    return None


def find_resume_checkpoint(resume: str | None, cfg, registry=None) -> Path | None:
    """What `--resume` means: None (fresh), a checkpoint dir, an output dir (its latest checkpoint), or 'auto'.

    auto: the latest checkpoint in ``sft.output_dir`` when set; else in the directory of the most recent train-sft
    run of the registry that did not finish and trained the same model on the same data. No checkpoint: a fresh
    start (auto never fails).
    """
    if not resume:
        return None
    if resume != "auto":
        p = Path(resume)
        if (p / "trainer_state.json").is_file():
            return p
        ck = latest_checkpoint(p)
        if ck is None:
            raise VideoR1Error(f"--resume {resume}: no checkpoint-N directory with trainer_state.json there",
                               hint="pass a checkpoint directory, a training output directory, or 'auto'")
        return ck
    if cfg.sft.output_dir:
        return latest_checkpoint(cfg.sft.output_dir)
    if registry is None:
        return None
    import json

    want_data = str(Path(cfg.data.file).resolve()) if cfg.data.file else None
    for r in registry.list_runs(kind="train-sft"):
        if r.get("status") == "finished" or not r.get("run_dir"):
            continue
        try:
            c = json.loads(r.get("config") or "{}")
        except ValueError:
            continue
        data = c.get("data", {}).get("file")
        if data and want_data and str(Path(data).resolve()) != want_data:
            continue
        if c.get("model", {}).get("name_or_path") != cfg.model.name_or_path:
            continue
        ck = latest_checkpoint(r["run_dir"])
        if ck is not None:
            return ck
    return None


# ---------------------------------------------------------------------------------------------------------------------
def training_arguments(cfg, output_dir: str | os.PathLike, *, has_eval: bool):
    """TrainingArguments from the `sft` / `data` / `run` / `distributed` sections."""
    from transformers import TrainingArguments

    from pipelines.models import resolve_device

    s = cfg.sft
    device = resolve_device(cfg.model.device)
    ds_path = None
    if cfg.distributed.deepspeed:
        from pipelines.launch import deepspeed_config_path

        ds_path = str(deepspeed_config_path(cfg.distributed.deepspeed))
    eval_strategy = "steps" if (has_eval and s.eval_steps) else "no"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=s.per_device_batch_size,
        per_device_eval_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        num_train_epochs=s.num_train_epochs,
        max_steps=s.max_steps,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=min(float(s.warmup_ratio), 0.999),  # a float < 1 is a ratio of the total steps
        weight_decay=s.weight_decay,
        adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2,
        max_grad_norm=s.max_grad_norm,
        bf16=s.bf16,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=s.eval_steps if eval_strategy == "steps" else None,
        prediction_loss_only=True,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        train_sampling_strategy="random" if cfg.data.shuffle else "sequential",
        dataloader_num_workers=cfg.data.num_workers,
        # Workers start from a forkserver, not a fork of this process: a fork copies whatever lock another thread
        # holds at that moment (pyarrow's jemalloc thread, library pools, a caller's threads when the stage runs
        # in-process as in `bench tgrpo` or tests) and the worker can hang on it for good (seen on a clean install).
        dataloader_multiprocessing_context="forkserver" if cfg.data.num_workers > 0 else None,
        # ... and live for the whole run: a forkserver worker imports torch and the model code before its first
        # batch (seconds of CPU), and without this the DataLoader starts new ones every epoch (the quickstart's
        # 675 steps are 72 epochs of 300 records: SFT ran 3x slower on 2 cores).
        dataloader_persistent_workers=cfg.data.num_workers > 0,
        dataloader_pin_memory=device.type == "cuda",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=list(cfg.run.report_to) or "none",
        run_name=cfg.run.name,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        deepspeed=ds_path,
        ddp_timeout=cfg.distributed.timeout_minutes * 60,
        gradient_checkpointing=False,  # load_model already enabled it (non-reentrant) when configured
    )


def _end_skip_check(trainer, cfg, resumed: bool) -> None:
    """data.max_skip_fraction judged on every training sample of the run, summed over ranks: the in-loop check
    waits for 64 samples, so a short run that skipped all of them would end at loss 0.0 as a saved model."""
    st = trainer.skips["train"]
    counts = torch.tensor([float(st.total), float(trainer.samples_seen)], dtype=torch.float64)
    if trainer.args.world_size > 1:
        counts = trainer.accelerator.reduce(counts.to(trainer.args.device), reduction="sum").cpu()
    skipped, used = (int(x) for x in counts.tolist())
    if resumed and skipped + used == 0:
        return  # resumed at the last step: nothing left to read is not a failure
    check_skip_rate(skipped, skipped + used, cfg.data.max_skip_fraction, dataset_size=len(trainer.train_dataset),
                    file=str(cfg.data.file), example=st.example, what="training samples", final=True)


def _forget_eval_preparation(trainer) -> None:
    """An evaluation before `train()` makes accelerate mark the model prepared (without a DDP wrapper: evaluation mode),
    and `train()` then skips the wrapper: the ranks' gradients were never averaged (accelerate 1.16 + transformers
    5.20; DeepSpeed prepares its engine in `train()` either way). Unmark it, so `train()` wraps it."""
    model = trainer.model
    if trainer.is_deepspeed_enabled or trainer.args.world_size <= 1:
        return
    if model.__dict__.pop("_is_accelerate_prepared", None) and model in trainer.accelerator._models:
        trainer.accelerator._models.remove(model)


@dataclass
class SftResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss_start: float | None
    eval_loss_end: float | None
    skipped: dict[str, dict[str, int]]
    samples: int
    eval_samples: int
    tokens_per_s: float | None
    seconds: float
    resumed_from: str | None
    metrics: dict[str, float]


def run_sft(cfg, run=None, *, output_dir: str | os.PathLike, resume_from: str | os.PathLike | None = None,
            on_skip: Callable[[str, str, str, bool], None] | None = None) -> SftResult:
    """Train on `cfg.data.file` (Video-R1-COT records); save model + processor to `output_dir` (rank 0)."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging

    from pipelines.models import apply_lora, load_model, load_processor, resolve_device

    if not cfg.data.file:
        raise DataError("no SFT records given", hint="pass --data FILE (Video-R1-COT format)")
    hf_logging.set_verbosity_error()
    from pipelines.threads import apply_torch_threads

    apply_torch_threads(cfg)  # run.torch_threads, or this process's share of the cores
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = load_processor(cfg.model.name_or_path, revision=cfg.model.revision)
    root = cfg.data_root()
    train_ds = SftDataset(cfg.data.file, cfg, processor, root, max_samples=cfg.data.max_samples,
                          shuffle_seed=cfg.run.seed if cfg.data.shuffle else None, max_length=cfg.sft.max_length)
    eval_ds = None
    if cfg.sft.eval_file:
        eval_ds = SftDataset(cfg.sft.eval_file, cfg, processor, None, max_length=cfg.sft.max_length)
    from pipelines.launch import init_deepspeed_distributed

    init_deepspeed_distributed(cfg)  # ZeRO-3's zero.Init (in from_pretrained) partitions over DeepSpeed's world
    from pipelines import parallel

    if cfg.distributed.sequence_parallel > 1:
        from pipelines.launch import init_distributed

        init_distributed(cfg)  # the groups are made before the Trainer (which joins an initialised process group)
    topo = parallel.setup(cfg.distributed.sequence_parallel)
    args = training_arguments(cfg, out, has_eval=eval_ds is not None)  # before the model: ZeRO-3 init needs it
    from pipelines.rl import checkpoint as C

    identity = C.sft_expectations(cfg, args.world_size)
    if resume_from is not None:  # refused before anything is loaded when it cannot be restored in full
        C.check_sft_checkpoint(resume_from, identity)
    device = resolve_device(cfg.model.device)
    if device.type == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    from transformers import set_seed

    # LoRA's initial adapters are drawn here, before the Trainer seeds: from run.seed, not from whatever the
    # DeepSpeed set-up happened to draw first (two identical ZeRO-2 LoRA runs started from different adapters).
    set_seed(cfg.run.seed)
    model = load_model(cfg.model, device=device, for_training=True)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    parallel.install(model, topo)
    RegistryCallback, RichProgressCallback = _callbacks()
    trainer_box: list[Any] = []
    reg_cb = RegistryCallback(run, lambda: trainer_box[0])
    trainer = _trainer_cls()(
        model=model,
        args=args,
        data_collator=SftCollator(processor.tokenizer.pad_token_id),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        callbacks=[reg_cb, RichProgressCallback()],
        on_skip=on_skip,
        max_skip_fraction=cfg.data.max_skip_fraction,
        records_file=str(cfg.data.file),
        sequence_parallel=topo,
    )
    trainer.checkpoint_identity = identity
    trainer_box.append(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    eval_start = eval_end = None
    if eval_ds is not None and resume_from is None:
        eval_start = trainer.evaluate().get("eval_loss")
        _forget_eval_preparation(trainer)
        if run is not None and trainer.is_world_process_zero() and eval_start is not None:
            run.log_metrics(0, {"eval_loss": eval_start})
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if eval_ds is not None:
        eval_end = trainer.evaluate().get("eval_loss")
    # Final model: merged weights (LoRA folded in) + processor, loadable by every other command.
    from pipelines.errors import storage_errors
    from pipelines.launch import deepspeed_zero_stage

    final = trainer.model
    zero3_lora = cfg.model.lora.enabled and deepspeed_zero_stage(cfg) == 3
    if cfg.model.lora.enabled and hasattr(final, "merge_and_unload") and not zero3_lora:
        final = final.merge_and_unload()
    with storage_errors(out, "model"):
        if zero3_lora:  # partitioned weights: gathered, merged, written by rank 0
            from pipelines.rl.checkpoint import save_merged_lora_zero3

            save_merged_lora_zero3(final, processor, out, is_main=trainer.is_world_process_zero())
        elif trainer.is_world_process_zero():
            if cfg.model.lora.enabled:
                final.save_pretrained(out)
            else:
                trainer.save_model(str(out))
            processor.save_pretrained(out)
        else:
            trainer.save_model(str(out))  # collective under DeepSpeed; writes nothing on other ranks
    skipped = {k: dict(v.counts) for k, v in trainer.skips.items()}
    for split, st in trainer.skips.items():
        for reason, ids in st.ids.items():
            log.warning("skipped %d %s sample(s) (%s), first ids: %s", st.counts[reason], split, reason,
                        ", ".join(ids))
    _end_skip_check(trainer, cfg, resumed=resume_from is not None)  # after saving: nothing done is lost
    metrics = dict(result.metrics)
    return SftResult(
        output_dir=out, global_step=trainer.state.global_step, train_loss=metrics.get("train_loss"),
        eval_loss_start=eval_start, eval_loss_end=eval_end, skipped=skipped, samples=len(train_ds),
        eval_samples=len(eval_ds) if eval_ds is not None else 0, tokens_per_s=reg_cb.last.get("tokens_per_s"),
        seconds=time.perf_counter() - t0, resumed_from=str(resume_from) if resume_from else None, metrics=metrics,
    )
