"""`RLTrainer`: GRPO / T-GRPO on Qwen2.5-VL with video and image prompts (torchtune-style recipe class).

    trainer = RLTrainer(cfg, run, run_dir, resume="auto")
    trainer.setup()          # accelerator, data shard, policy (+ frozen reference), optimizer, scheduler, backend
    summary = trainer.train()
    trainer.cleanup()

One step on each rank (``rl.per_device_prompts * rl.gradient_accumulation_steps`` prompts from this rank's shard):

1. decode media once, render prompts, shuffle frames of videos (T-GRPO)        -> rollout.prepare_samples
2. ONE generation for ordered (G) and shuffled (G~) completions                -> rollout.generate_groups
3. rewards (+ accuracy for the bonuses), temporal bonus and length bonus per group, advantages
                                                                               -> rollout.score_groups, advantages
4. reference log-probs (no grad), then ``rl.num_iterations`` optimizer updates over the rollout: each runs the
   policy log-prob forward (every group of a micro-batch in one forward, visual tensors included) and the loss
   (losses.policy_loss), with old log-probs from the first pass (ratio == 1 when num_iterations == 1); rollouts from
   another engine (vLLM) carry TRL's importance weights (losses.rollout_correction, rl.rollout_correction)
5. metrics reduced over ranks -> registry (rank 0), checkpoints every ``rl.save_steps``.

A "step" is one rollout; with num_iterations > 1 it makes that many optimizer updates (the LR schedule counts updates).
Distributed: accelerate (DDP on gloo/NCCL, or DeepSpeed ZeRO-2/3 from ``distributed.deepspeed``) under torchrun; each
rank reads a disjoint shard of the records; advantages are per group so no gather is needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.errors import DataError, TrainingError, VideoR1Error, check_skip_rate
from pipelines.generation import Sampling
from pipelines.rl import advantages as A
from pipelines.rl import checkpoint as C
from pipelines.rl.checkpoint import CHECKPOINT_DIR, STATE_FILE, checkpoint_steps  # noqa: F401 - their old home
from pipelines.rl import losses as L
from pipelines.rl import rollout as R
from pipelines.zero3 import deepspeed_lockstep, text_dummy_forward

log = logging.getLogger("videor1.rl")

# A group counts as informative for dynamic sampling when its rewards spread by more than this (float noise).
DYNAMIC_SAMPLING_EPS = 1e-6


def _warn(msg: str) -> None:
    if log.hasHandlers():  # unconfigured, logging's last-resort handler would print it a second time
        log.warning(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class RLTrainer:
    def __init__(self, cfg, run, run_dir, resume: str | None = None, backend=None,
                 on_step: Callable[[int, int, dict], None] | None = None):
        self.cfg = cfg
        self.run = run
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.on_step = on_step
        self._backend = backend  # tests / callers may inject one
        self.step = 0
        self.epoch = 0
        self.position = 0  # index into this rank's shard of the current epoch
        self.skipped_total = 0
        self._rows_seen = self._rows_skipped = 0  # this process's, for data.max_skip_fraction
        self._skip_example = ""  # this process's first skip, for the end-of-run error
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None
        self.ref_model = None
        self.local_log: list[dict[str, Any]] = []  # this rank's records and un-reduced reward per step

    # ------------------------------------------------------------------------------------------------------ setup
    def _accelerator(self):
        """pipelines.launch.make_accelerator: cpu=True without CUDA (gloo ranks under torchrun), DeepSpeed ZeRO-2/3
        from distributed.deepspeed with the "auto" values we know filled in (one micro-batch per backward)."""
        from accelerate.utils import DistributedDataParallelKwargs

        from pipelines.launch import make_accelerator, model_hidden_size

        hidden = None
        if self.cfg.distributed.deepspeed:
            from types import SimpleNamespace

            from transformers import AutoConfig

            from pipelines.models import check_model_path

            check_model_path(self.cfg.model.name_or_path, self.cfg.model.revision)  # one line, not AutoConfig's OSError

            hidden = model_hidden_size(SimpleNamespace(config=AutoConfig.from_pretrained(
                self.cfg.model.name_or_path)))
        kwargs: dict[str, Any] = {}
        if self.cfg.run.report_to:
            kwargs["log_with"] = list(self.cfg.run.report_to)
            kwargs["project_dir"] = str(self.run_dir)
        return make_accelerator(
            self.cfg, gradient_accumulation_steps=1, mixed_precision="bf16" if self.cfg.rl.bf16 else "no",
            micro_batch_size=1, max_grad_norm=self.cfg.rl.max_grad_norm, hidden_size=hidden,
            # A rank whose every record of a step was broken still joins the backward (dummy forward): its unused
            # vision tower must not stall DDP's reducer.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            **kwargs,
        )

    def setup(self) -> None:
        from pipelines.models import apply_lora, load_lora_adapters, load_model, load_processor
        from pipelines.prompts import load_template
        from pipelines.records import json_columns, load_records
        from pipelines.threads import apply_torch_threads

        cfg, rl = self.cfg, self.cfg.rl
        apply_torch_threads(cfg)  # run.torch_threads, or this process's share of the cores
        if not cfg.data.file:
            raise VideoR1Error("no RL records given", hint="pass --data FILE (a Video-R1 JSON/JSONL file)")
        self.accelerator = acc = self._accelerator()
        self.rank, self.world = acc.process_index, acc.num_processes
        # distributed.sequence_parallel: the ranks of a group share one sequence, so they read, seed and generate as
        # one data-parallel rank (data_rank of data_world).
        from pipelines import parallel

        self.sp = parallel.setup(cfg.distributed.sequence_parallel)
        self.data_rank, self.data_world = self.sp.dp_rank, self.sp.dp_size
        self.is_main = acc.is_main_process
        self.device = acc.device
        self.temporal = rl.algo == "tgrpo"
        self.G, self.G_shuf = rl.num_generations, (rl.shuffled_count if rl.algo == "tgrpo" else 0)
        # GRPO's rl.shuffled_probe: shuffled rollouts for the p~ metrics only (a separate, RNG-neutral generate call)
        self.G_probe = rl.shuffled_count if (rl.shuffled_probe and not self.temporal) else 0
        self.prompts_per_step = rl.per_device_prompts * rl.gradient_accumulation_steps
        self.deepspeed = bool(cfg.distributed.deepspeed)
        from pipelines.launch import deepspeed_zero_stage

        self.zero3 = deepspeed_zero_stage(cfg) == 3
        if self.G_probe and self.zero3 and self.world > 1:
            raise VideoR1Error("rl.shuffled_probe is not supported under ZeRO-3 on several ranks (its generate call "
                               "would have to be collective)", hint="drop rl.shuffled_probe, or use DDP / zero2")

        seed = cfg.run.seed + self.data_rank
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.data_rank)

        # data
        self.records = load_records(cfg.data.file)
        self.json_cols = json_columns(self.records)
        # Records marked order-dependent (a data_source containing "order", the synthetic world's convention that
        # `eval` groups by too): the temporal metrics are then also logged for them and the others apart.
        self.order_split = ("data_source" in self.records.column_names
                            and any("order" in str(x or "") for x in self.records["data_source"]))
        self.root = cfg.data_root()
        n = len(self.records)
        pool = list(range(n))
        if cfg.data.shuffle:
            pool = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
        if cfg.data.max_samples:
            pool = pool[: cfg.data.max_samples]
        self.pool = pool
        self.shard_len = len(pool) // self.data_world
        if self.shard_len == 0:
            raise DataError(f"{len(pool)} records cannot feed {self.data_world} ranks",
                            file=cfg.data.file,
                            hint=f"run on at most {max(1, len(pool))} rank(s) (--nproc), or give more records"
                            if self.data_world == self.world else
                            f"run on at most {max(1, len(pool))} data-parallel rank(s) (--nproc divided by "
                            "distributed.sequence_parallel), or give more records")
        from pipelines.rl.schedule import steps_per_epoch, total_steps

        self.steps_per_epoch = steps_per_epoch(len(pool), self.data_world, rl.per_device_prompts,
                                               rl.gradient_accumulation_steps)
        self.total_steps = total_steps(rl.max_steps, rl.num_epochs, self.steps_per_epoch)
        if self.total_steps < rl.max_steps and cfg.origin("rl.max_steps") != "default" and self.is_main:
            # HF's Trainer lets max_steps override the epochs; here rl.num_epochs bounds it, so say so when it bites
            _warn(f"rl.max_steps={rl.max_steps} is cut to {self.total_steps} step(s) by rl.num_epochs="
                  f"{rl.num_epochs:g} ({self.steps_per_epoch} step(s) per pass over {len(pool)} records); "
                  f"raise rl.num_epochs to run them all")

        # resume point (the policy starts from its weights; the reference from the original model)
        self.lora = cfg.model.lora.enabled
        self.resumed_from = C.find_rl_checkpoint(self.resume, cfg, getattr(self.run, "id", None))
        if self.resume == "auto" and self.resumed_from is None and self.is_main:
            _warn("--resume auto: no checkpoint found, starting from step 0")
        if self.resumed_from:  # refused here, before any of it is loaded, when it cannot be restored in full
            C.check_rl_checkpoint(self.resumed_from, C.rl_expectations(self))
        base = cfg.model.name_or_path
        policy_path = str(self.resumed_from) if self.resumed_from else base

        if rl.backend == "vllm":  # a family / dtype the engine cannot run is refused before any model loads
            from pipelines.generation.vllm import check_engine_support
            from pipelines.models import resolve_dtype

            check_engine_support(base, str(resolve_dtype(cfg.model.dtype, self.device)).removeprefix("torch."),
                                 revision=cfg.model.revision, backend_key="rl.backend")
        self.processor = load_processor(policy_path)
        self.template = load_template(cfg.prompt.template)
        # A LoRA checkpoint holds the adapters only: the policy is the base model plus the checkpoint's adapters.
        model = load_model(cfg.model, path=base if self.lora else policy_path, device=self.device, for_training=True)
        if self.lora:
            model = apply_lora(model, cfg.model.lora)
            if self.resumed_from:
                try:
                    load_lora_adapters(model, self.resumed_from)
                except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: tensor shapes (another lora.r)
                    raise C.CheckpointError(f"cannot resume from {self.resumed_from}: {e}",
                                            hint="resume a LoRA run with the same model.lora settings") from None
        parallel.install(model, self.sp)  # distributed.sequence_parallel > 1: hooks on the model core
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=rl.learning_rate, betas=(rl.adam_beta1, rl.adam_beta2),
                                      weight_decay=rl.weight_decay)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self._locks = {"policy": deepspeed_lockstep(self.unwrapped, self.deepspeed)}
        from transformers import get_scheduler

        self.scheduler = get_scheduler(rl.lr_scheduler, self.optimizer, num_warmup_steps=rl.warmup_steps,
                                       num_training_steps=self.total_steps * rl.num_iterations)
        if rl.beta > 0 and not self.lora:
            ref = load_model(cfg.model, path=base, device=self.device, for_training=False)
            for p in ref.parameters():
                p.requires_grad_(False)
            parallel.install(ref, self.sp)
            if self.deepspeed:
                from trl.models.utils import prepare_deepspeed

                ref = prepare_deepspeed(ref, acc)
                self._locks["reference"] = deepspeed_lockstep(ref, True)
            self.ref_model = ref
        self._setup_vision_sharing()
        self.backend = self._backend if self._backend is not None else self._make_backend()
        if self.resumed_from:
            self.load_checkpoint(self.resumed_from)
        if self.cfg.run.report_to:
            try:
                acc.init_trackers(cfg.run.name or "videor1-rl", config=cfg.model_dump(mode="json"))
            except Exception as e:  # noqa: BLE001 - trackers are optional extras
                _warn(f"trackers {cfg.run.report_to} not started: {e}")
        if self.is_main:
            self.run.use_path("model", base)
            self.run.use_path("records", cfg.data.file)
            if self.resumed_from and not self.run.continues(self.resumed_from):  # lineage edge to the run it continues
                self.run.use_path("checkpoint", self.resumed_from)

    def _setup_vision_sharing(self) -> None:
        """rl.encode_once: which passes may reuse another pass's vision features, and the tower-row counter.

        Each forward encodes each media item once (policy_inputs' plan). Across the passes of one rollout (reference,
        then num_iterations policy passes) the features are reused only where the tower CANNOT have changed and
        computes the same numbers: its parameters are frozen (model.freeze_vision, or LoRA, which adapts the language
        model only), and not under DeepSpeed (the ZeRO lockstep counts a modality as present and would make the other
        ranks' dummy tower calls unmatched). The reference pass hands its features on when it runs the policy's own
        tower (LoRA: adapters off) or a separate tower with bit-identical weights and no bf16 autocast difference."""
        from pipelines.models.families import TowerCounter, adapter_for

        rl = self.cfg.rl
        adapter = adapter_for(self.unwrapped)
        tower = adapter.vision_tower(self.unwrapped)
        frozen = not any(p.requires_grad for p in tower.parameters())
        self.reuse_policy = bool(rl.encode_once and frozen and not self.deepspeed)
        self.reuse_reference = False
        if self.reuse_policy and rl.beta > 0:
            if self.lora:
                self.reuse_reference = True
            elif self.ref_model is not None and not rl.bf16:
                ref_tower = adapter.vision_tower(self.ref_model)
                ref_params = dict(ref_tower.named_parameters())
                self.reuse_reference = all(n in ref_params and p.dtype == ref_params[n].dtype
                                           and torch.equal(p.detach(), ref_params[n].detach().to(p.device))
                                           for n, p in tower.named_parameters())
        self.tower_counter = TowerCounter().attach(tower)
        if self.ref_model is not None:
            self.tower_counter.attach(adapter.vision_tower(self.ref_model))

    def _make_backend(self):
        rl = self.cfg.rl
        if rl.backend == "vllm":
            from pipelines.generation.vllm import build_vllm_backend

            # A LoRA checkpoint holds adapters only; the engine starts from the base and gets the merged weights.
            start = self.cfg.model.name_or_path if self.lora else (self.resumed_from or self.cfg.model.name_or_path)
            # The engine reports each sampled token's log-prob under its sampling distribution (processed_logprobs);
            # the trainer computes its own the same way (losses.sampler_logprobs): mismatch metric and correction.
            b = build_vllm_backend(self.cfg, "rl", model_path=str(start),
                                   dtype=str(next(self.unwrapped.parameters()).dtype).removeprefix("torch."))
            b.sync_weights(self.accelerator.unwrap_model(self.model))
            return b
        from pipelines.generation.hf import HFBackend

        per_step = self.prompts_per_step * (self.G + self.G_shuf)
        return HFBackend(self.accelerator.unwrap_model(self.model), self.processor, batch_size=max(1, per_step),
                         encode_once=rl.encode_once)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # -------------------------------------------------------------------------------------------------------- data
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(self.pool)
        if self.cfg.data.shuffle and epoch > 0:
            g = torch.Generator().manual_seed(self.cfg.run.seed + 1000003 * epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        return order[self.data_rank:: self.data_world][: self.shard_len]

    def _next_rows(self) -> list[tuple[int, dict]]:
        from pipelines.records import record_dict

        if self.position >= self.shard_len:
            self.epoch += 1
            self.position = 0
        order = self._epoch_order(self.epoch)
        idx = order[self.position: self.position + self.prompts_per_step]
        self.position += len(idx)
        return [(i, record_dict(self.records[int(i)], self.json_cols)) for i in idx]

    # ----------------------------------------------------------------------------------------------------- train
    @contextmanager
    def _generation(self):
        """The model the backend generates with: ZeRO-3 parameters gathered; vLLM woken up for the rollout."""
        if hasattr(self.backend, "wake_up") and self.cfg.rl.vllm.enable_sleep_mode:
            self.backend.wake_up()
        try:
            if self.deepspeed and hasattr(self.backend, "model"):
                from trl.models.utils import unwrap_model_for_generation

                with unwrap_model_for_generation(self.model, self.accelerator) as m:
                    self.backend.model = m
                    if self.zero3 and self.world > 1 and hasattr(self.backend, "synced_gpus"):
                        self.backend.synced_gpus = True
                    yield
            else:
                if hasattr(self.backend, "model"):
                    self.backend.model = self.unwrapped
                yield
        finally:
            if hasattr(self.backend, "sleep") and self.cfg.rl.vllm.enable_sleep_mode:
                self.backend.sleep()

    @contextmanager
    def _reference(self):
        """Forward of the frozen reference: a separate copy of the starting weights, or (LoRA) the adapters off.

        Under accelerate's mixed precision (rl.bf16) the prepared policy runs inside autocast; the separate reference
        copy is not prepared, so its forward is put inside the same autocast here: otherwise step 1's KL is the
        bf16-vs-fp32 rounding difference, not 0 (a no-op without mixed precision)."""
        if self.lora:
            with self.unwrapped.disable_adapter(), self._lockstep("policy"), self.accelerator.autocast():
                yield self.model
        else:
            with self._lockstep("reference"), self.accelerator.autocast():
                yield self.ref_model

    def _lockstep(self, which: str):
        """Under DeepSpeed, forwards inside this make the same vision-tower calls on every rank (pipelines.zero3)."""
        lock = getattr(self, "_locks", {}).get(which)
        return lock.active() if lock is not None else nullcontext()

    def train(self) -> dict[str, Any]:
        rl = self.cfg.rl
        t_start = time.perf_counter()
        start_step = self.step
        while self.step < self.total_steps:
            metrics = self.train_step()
            self.step += 1
            if self.is_main:
                if self.step % rl.logging_steps == 0 or self.step == self.total_steps:
                    self.run.log_metrics(self.step, metrics)
                    if self.cfg.run.report_to:
                        try:
                            self.accelerator.log(metrics, step=self.step)
                        except Exception:  # noqa: BLE001
                            pass
                self.history.append(metrics)
            if self.on_step and self.is_main:
                self.on_step(self.step, self.total_steps, metrics)
            if self.step % rl.save_steps == 0:  # also at the last step: a finished run can be extended
                self.save_checkpoint()
        # The report first: saving merges LoRA adapters into rank 0's model in place, which would change its checksum.
        self._write_rank_report()
        failure = self._end_skip_check() if self.step > start_step else None
        out = self.save_final(register=failure is None)  # on disk either way; a 'model' artifact only on success
        elapsed = time.perf_counter() - t_start
        summary = self._summary(out, elapsed, self.step - start_step)
        if self.is_main:
            self.run.set_summary(summary)
        if failure is not None:
            raise failure
        return summary

    def _end_skip_check(self) -> DataError | None:
        """data.max_skip_fraction judged on every prompt of the run (all ranks): a short run never reaches the
        64 prompts the in-loop check waits for, and 8 of 8 skipped must not end as a saved model."""
        skipped, seen = self._sum_over_ranks(torch.tensor([self._rows_skipped, self._rows_seen],
                                                          dtype=torch.float64) * self._counts_here).tolist()
        try:
            check_skip_rate(int(skipped), int(seen), self.cfg.data.max_skip_fraction, dataset_size=len(self.records),
                            file=str(self.cfg.data.file), example=self._skip_example, what="RL prompts", final=True)
        except DataError as e:
            return e
        return None

    def parameter_checksum(self) -> str:
        """sha256 over this rank's copy of every parameter (replicas must agree after each step)."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.unwrapped.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _write_rank_report(self) -> None:
        """<run dir>/rank-R.json: parameter checksum, the records this rank trained on, its local rewards.

        A cheap end-of-run consistency check for data-parallel runs (not under ZeRO-3, whose ranks hold shards)."""
        if self.deepspeed:
            return
        report = {"rank": self.rank, "world_size": self.world, "step": self.step,
                  "checksum": self.parameter_checksum(), "steps": self.local_log}
        (self.run_dir / f"rank-{self.rank}.json").write_text(json.dumps(report))
        if self.world > 1:
            import torch.distributed as dist

            sums: list[Any] = [None] * self.world
            dist.all_gather_object(sums, report["checksum"])
            if len(set(sums)) != 1 and self.is_main:
                _warn(f"parameters differ across ranks at the end of training: {sums}")

    def _summary(self, out: Path, elapsed: float, steps_run: int) -> dict[str, Any]:
        h = self.history
        last = h[-1] if h else {}
        k = max(1, len(h) // 4)

        def avg(key, rows):
            vals = [r[key] for r in rows if key in r and r[key] == r[key]]
            return sum(vals) / len(vals) if vals else None

        return {
            "algo": self.cfg.rl.algo, "steps": self.step, "steps_run": steps_run, "world_size": self.world,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "model": str(out), "seconds": round(elapsed, 2),
            "reward_first": avg("reward", h[:k]), "reward_last": avg("reward", h[-k:]),
            "kl_last": last.get("kl"), "skipped": self.skipped_total,
            "step_time_median": float(np.median([r["step_time"] for r in h])) if h else None,
        }

    def train_step(self) -> dict[str, float]:
        rl, acc = self.cfg.rl, self.accelerator
        t0 = time.perf_counter()
        stats = _Stats()
        counter = getattr(self, "tower_counter", None)
        if counter is not None:
            counter.reset()
        rows, groups, kept = [], [], []  # kept: (base, temporal, total) rewards of the groups trained on
        gen_time, gen_tokens, rounds, generated, probe_time = 0.0, 0, 0, 0, 0.0
        # One sampling round without rl.dynamic_sampling. With it (DAPO), groups whose rewards are all equal carry no
        # advantage, only noise through the KL term and Adam's normalisation, so they are dropped and more prompts
        # are drawn until the step has prompts_per_step informative groups or max_sampling_rounds were drawn. Every
        # rank runs the same number of rounds (agreed by an all-reduce), so collectives and the data position stay in
        # step across ranks.
        while True:
            rounds += 1
            r_rows, r_groups, r_rewards, r_gen_time, r_tokens, r_probe = self._rollout_round(stats)
            rows += r_rows
            gen_time += r_gen_time
            gen_tokens += r_tokens
            probe_time += r_probe
            generated += len(r_groups)
            if rl.dynamic_sampling and r_groups:
                r_total = r_rewards[2]
                spread = r_total.max(dim=1).values - r_total.min(dim=1).values
                keep = [i for i in range(len(r_groups)) if float(spread[i]) > DYNAMIC_SAMPLING_EPS]
            else:
                keep = list(range(len(r_groups)))
            room = self.prompts_per_step - len(groups)
            keep = keep[:room]
            groups += [r_groups[i] for i in keep]
            if keep:
                kept.append(tuple(r[keep] for r in r_rewards))
            if not rl.dynamic_sampling:
                break
            need_more = len(groups) < self.prompts_per_step and rounds < rl.max_sampling_rounds
            if not self._any_rank(need_more):
                break
        if rl.dynamic_sampling:
            stats.add("dynamic/kept_groups", len(groups), 1)
            stats.add("dynamic/generated_groups", generated, 1)
            stats.add("dynamic/rounds", rounds, 1)
        for name in list(rl.rewards):
            stats.ensure(f"rewards/{name}")
        for name in ("reward", "reward_std", "completion_length", "frac_all_correct", "frac_all_wrong"):
            stats.ensure(name)
        parts = ("", "/order", "/other") if self.order_split else ("",)
        if self.temporal or self.G_probe:
            for name in ("p_ordered", "p_shuffled", "p_gap"):
                for part in parts:
                    stats.ensure(name + part)
        if self.temporal:
            for name in ("temporal_bonus_rate", "temporal_bonus_mean"):
                for part in parts:
                    stats.ensure(name + part)
            stats.ensure("temporal_adv_change")
        step_base, step_temporal, step_total = (torch.cat([k[i] for k in kept]) if groups else
                                                torch.zeros(0, self.G, dtype=torch.float64) for i in range(3))
        # What the advantage estimator sees: the bonus inside the reward (Video-R1), or not (a separate term).
        separate = self.temporal and rl.temporal_term == "advantage"
        estimated = step_base if separate else step_total
        batch_std = None
        if rl.advantage == "batch_std" and self.world > 1:
            # The batch is the whole step, every rank's groups (TRL gathers rewards before normalising); every rank
            # joins the all-reduce, also one whose samples were all skipped.
            batch_std = A.pooled_std(self._sum_over_ranks(A.reward_moments(estimated) * self._counts_here))
        if groups:
            if separate:
                adv = A.temporal_advantages(step_base, step_temporal, "advantage", rl.advantage, batch_std=batch_std)
            else:
                adv = A.compute_advantages(step_total, rl.advantage, batch_std=batch_std)
            if self.temporal:  # how much of the advantages the temporal reward still moves after normalisation
                vid = torch.tensor([g.sample.is_video and bool(g.shuffled) for g in groups])
                plain = A.compute_advantages(step_base, rl.advantage, batch_std=batch_std)
                moved, base = A.advantage_change(adv[vid], plain[vid])
                stats.add("temporal_adv_change", moved, base)
        else:
            adv = torch.zeros(0, self.G, dtype=torch.float64)

        loss_val, grad_norm, loss_counts = self._optimize(groups, adv, stats)
        if self.backend is not None and hasattr(self.backend, "sync_weights"):
            t_sync = time.perf_counter()
            self.backend.sync_weights(self.unwrapped)
            stats.add("time/weight_sync", time.perf_counter() - t_sync, 1)

        step_time = time.perf_counter() - t0 - probe_time  # the GRPO probe is bookkeeping, not the algorithm's cost
        if self.G_probe:
            stats.add("time/shuffled_probe", probe_time, 1)
        if counter is not None:  # patch rows through this rank's towers in the step (summed over ranks)
            stats.add(PATCHES_ENCODED, float(counter.reset()[1]), 0)
        stats.add("loss", loss_val, 1)
        stats.add("step_time", step_time, 1)
        stats.add("gen_time", gen_time, 1)
        stats.add("_gen_tokens", float(gen_tokens), 0)
        rs, rc = stats.d.get("reward", [0.0, 0.0])
        self.local_log.append({"step": self.step + 1, "indices": [int(i) for i, _ in rows],
                               "reward": rs / rc if rc else None,
                               "loss_counts": loss_counts,
                               "batch_std": None if batch_std is None else float(batch_std)})
        if not self.sp.leader:  # a sequence-parallel group counts once (its ranks hold the same rollouts)
            stats.zero()
        metrics = stats.reduce(acc)
        metrics["tokens_per_s"] = metrics.pop("_gen_tokens") / max(1e-9, metrics["gen_time"])
        metrics["skipped"] = metrics.pop("skipped")
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["grad_norm"] = grad_norm
        metrics["epoch"] = float(self.epoch)
        return metrics

    @property
    def _counts_here(self) -> float:
        """1 where this rank's counts enter a sum over ranks; 0 on the other ranks of a sequence-parallel group."""
        return 1.0 if self.sp.leader else 0.0

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a small float64 tensor over every rank (returned on the CPU)."""
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum").cpu()

    def _any_rank(self, flag: bool) -> bool:
        """True when `flag` holds on at least one rank (every rank gets the same answer)."""
        if self.world == 1:
            return flag
        return bool(self._sum_over_ranks(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64))[0] > 0)

    def _rollout_round(self, stats: "_Stats"):
        """Draw the next prompts, generate their groups and score them (rewards with the temporal/length bonuses).

        Returns (rows, groups, (rewards without the temporal reward, the temporal reward, the total), each (N, G),
        generation seconds, generated tokens, seconds of GRPO's shuffled probe); the rollout metrics of every
        generated group are added to `stats` (with dynamic sampling: also of the groups dropped afterwards, so the
        reward curves describe the policy, not the filter)."""
        cfg, rl = self.cfg, self.cfg.rl
        rows = self._next_rows()
        samples, skipped = R.prepare_samples(rows, cfg, self.processor, self.template, self.root,
                                             self.shuffle_gen, self.temporal or bool(self.G_probe))
        for s in skipped:
            _warn(f"step {self.step + 1}: skipped record {s.id} (rank {self.rank}): {s.reason}")
        self._record_skipped(skipped)
        stats.add("skipped", len(skipped), 1 if self.is_main else 0)  # summed, not averaged (count on rank 0)
        self._rows_seen += len(rows)
        self._rows_skipped += len(skipped)
        if skipped and not self._skip_example:
            self._skip_example = f"record {skipped[0].id}: {skipped[0].reason}"
        if skipped:
            check_skip_rate(self._rows_skipped, self._rows_seen, cfg.data.max_skip_fraction,
                            dataset_size=len(self.records), file=str(cfg.data.file),
                            example=f"record {skipped[0].id}: {skipped[0].reason}", what="RL prompts")

        sampling = Sampling(max_new_tokens=rl.max_completion_length, temperature=rl.temperature, top_p=rl.top_p,
                            logprobs=rl.backend == "vllm")
        from pipelines.generation.hf import HFBackend

        expand = isinstance(self.backend, HFBackend)
        t_gen = time.perf_counter()
        with self._generation():
            groups = R.generate_groups(self.backend, samples, sampling, self.G, self.G_shuf, expand=expand)
            if not samples and self.zero3 and self.world > 1 and expand:
                self._dummy_generate(sampling)
            probe_time = self._shuffled_probe(groups, sampling, expand) if self.G_probe else 0.0
        if self.sp.enabled:  # the group trains on its first rank's rollouts (generation need not be bit-identical)
            from pipelines import parallel

            kept = parallel.broadcast_object([(g.ordered, g.shuffled) for g in groups], self.sp)
            for g, (ordered, shuffled) in zip(groups, kept):
                g.ordered, g.shuffled = ordered, shuffled
        gen_time = time.perf_counter() - t_gen - probe_time
        # GRPO's shuffled probe (g.shuffled under rl.shuffled_probe) is bookkeeping: its tokens are not the algorithm's
        gen_tokens = sum(len(c.token_ids) for g in groups for c in g.ordered + ([] if self.G_probe else g.shuffled))
        stats.add(PATCHES_DISTINCT, float(_distinct_patch_rows(self.processor, groups)), 0)
        N = len(groups)
        empty = torch.zeros(0, self.G, dtype=torch.float64)
        if not N:
            return rows, groups, (empty, empty, empty), gen_time, gen_tokens, probe_time
        sc = R.score_groups(groups, rl, self.G, self.G_shuf or self.G_probe)
        rewards = sc.total.clone()
        temporal = torch.zeros_like(rewards)
        if self.temporal or self.G_probe:
            vid = torch.tensor([g.sample.is_video and bool(g.shuffled) for g in groups])
            agreement = None
            if self.temporal and rl.temporal_rule == "contrast":
                from pipelines.rewards import training_answer

                agreement = A.answer_agreement([[training_answer(c.text) for c in g.ordered] for g in groups],
                                               [[training_answer(c.text) for c in g.shuffled] for g in groups])
            tr = A.temporal_rule(rl.temporal_rule if self.temporal else "video_r1", sc.accuracy,
                                 sc.accuracy_shuffled, vid, agreement=agreement, mu=rl.temporal_mu,
                                 alpha=rl.temporal_alpha, threshold=rl.correct_threshold)
            order = torch.tensor(["order" in str(g.sample.record.get("data_source") or "") for g in groups])
            parts = [("", vid)]
            if self.order_split:
                parts += [("/order", vid & order), ("/other", vid & ~order)]
            for part, sel in parts:
                nv = int(sel.sum())
                stats.add("p_ordered" + part, tr.p[sel].sum().item(), nv)
                stats.add("p_shuffled" + part, tr.p_shuffled[sel].sum().item(), nv)
                stats.add("p_gap" + part, (tr.p - tr.p_shuffled)[sel].sum().item(), nv)
                if self.temporal:
                    stats.add("temporal_bonus_rate" + part, tr.fired[sel].double().sum().item(), nv)
                    stats.add("temporal_bonus_mean" + part, tr.bonus[sel].sum().item(), nv * self.G)
            if self.temporal:
                temporal = tr.bonus
        # total: Video-R1's sum in its order (accuracy + format, + temporal, + length); base: without the temporal
        total = rewards + temporal if self.temporal else rewards
        if rl.length_bonus:
            lb = A.length_bonus(sc.accuracy, sc.lengths, omega=rl.length_omega, min_len=rl.length_min,
                                max_len=rl.length_max, threshold=rl.correct_threshold)
            rewards, total = rewards + lb, total + lb
        gs = A.group_stats(total, sc.accuracy, rl.correct_threshold)
        stats.add("reward", total.sum().item(), total.numel())
        stats.add("reward_std", total.std(dim=1).sum().item(), N)
        for name, v in sc.per_reward.items():
            stats.add(f"rewards/{name}", v.sum().item(), v.numel())
        stats.add("completion_length", sc.lengths.double().sum().item(), sc.lengths.numel())
        stats.add("frac_all_correct", gs["all_correct"].double().sum().item(), N)
        stats.add("frac_all_wrong", gs["all_wrong"].double().sum().item(), N)
        return rows, groups, (rewards, temporal, total), gen_time, gen_tokens, probe_time

    def _shuffled_probe(self, groups, sampling, expand: bool) -> float:
        """rl.shuffled_probe under GRPO: G~ completions on each video's shuffled frames, only for p~ and p_gap. The
        torch RNG state is restored afterwards, so the training samples of later steps are those of a run without the
        probe (bit-identical on the hf backend). Returns its seconds."""
        vids = [g for g in groups if g.sample.shuffled_media is not None]
        if not vids:
            return 0.0
        t0 = time.perf_counter()
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            if expand:
                probe = R.generate_groups(self.backend, [g.sample for g in vids], sampling, 0, self.G_probe)
                for g, p in zip(vids, probe):
                    g.shuffled = p.shuffled
            else:
                outs = self.backend.generate([g.sample.prompt for g in vids],
                                             [g.sample.shuffled_media for g in vids],
                                             dataclasses.replace(sampling, n=self.G_probe))
                for g, c in zip(vids, outs):
                    g.shuffled = list(c)
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        return time.perf_counter() - t0

    def _record_skipped(self, skipped) -> None:
        self.skipped_total += len(skipped)
        if not skipped:
            return
        path = self.run_dir / f"skipped-rank{self.rank}.jsonl"
        with open(path, "a") as f:
            for s in skipped:
                f.write(json.dumps({"step": self.step + 1, "index": s.index, "id": s.id, "reason": s.reason},
                                   default=str) + "\n")

    def _optimize(self, groups, adv: torch.Tensor, stats: "_Stats") -> tuple[float, float, dict[str, Any]]:
        """Reference log-probs, then num_iterations updates over this rollout; returns (mean loss, grad norm, the
        step's sequence/token counts: this rank's and the normalisers passed to the loss)."""
        rl, acc = self.cfg.rl, self.accelerator
        pad_id = self.processor.tokenizer.pad_token_id
        # One forward/backward per micro-batch of rl.per_device_prompts groups (gradients summed). DeepSpeed steps its
        # engine inside backward, so there every group of the step goes through one forward.
        micro = max(1, len(groups)) if self.deepspeed else rl.per_device_prompts
        chunks = []
        total_seqs = len(groups) * self.G
        for c0 in range(0, len(groups), micro):
            gs = groups[c0: c0 + micro]
            ids, mask = R.pad_completions(gs, pad_id)
            inputs = R.policy_inputs(self.processor, [g.sample for g in gs], self.G, ids, mask,
                                     share_vision=rl.encode_once)
            inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
            chunks.append({"inputs": inputs, "ids": ids.to(self.device), "mask": mask.to(self.device),
                           "adv": adv[c0: c0 + micro].reshape(-1).to(self.device, torch.float32),
                           "rollout_logp": _rollout_logprobs(gs, ids.shape[1])})
        total_tokens = int(sum(int(c["mask"].sum()) for c in chunks))
        # The normalisers are the whole step's, over every rank: DDP and DeepSpeed average gradients over ranks, so a
        # rank divides by (global count / world size). With per-rank counts, `dapo`/`bnpo` would weight a token by
        # its rank's token count and every loss type would mis-weight ranks that kept different numbers of groups
        # (skipped samples, dynamic sampling); TRL all-reduces the token count the same way.
        num_sequences, num_tokens = float(total_seqs), float(total_tokens)
        if self.world > 1:
            counts = self._sum_over_ranks(torch.tensor([num_sequences, num_tokens], dtype=torch.float64))
            num_sequences, num_tokens = float(counts[0]) / self.world, float(counts[1]) / self.world
        norm = {"num_sequences": num_sequences, "num_tokens": num_tokens}
        if rl.beta > 0 and chunks:
            with torch.no_grad(), self._reference() as ref:
                for c in chunks:
                    c["ref"] = R.completion_logprobs(ref, c["inputs"], c["ids"], rl.temperature,
                                                     reuse_vision=self.reuse_reference)
        elif rl.beta > 0 and self.deepspeed:
            # ZeRO-3 gathers the reference's parameters inside its forward, a collective: a rank with nothing to
            # train this step still joins the other ranks' reference forward (one chunk each under DeepSpeed).
            with torch.no_grad(), self._reference() as ref:
                text_dummy_forward(ref, self.processor.tokenizer.pad_token_id, self.device)
        losses, grad_norm = [], 0.0
        for it in range(rl.num_iterations):
            step_loss = 0.0
            if not chunks:
                self._dummy_backward()
            t_fb = time.perf_counter()
            for j, c in enumerate(chunks):
                last = j == len(chunks) - 1
                ctx = acc.no_sync(self.model) if not last else nullcontext()
                with ctx, self._lockstep("policy"):
                    engine_logp = c["rollout_logp"] if it == 0 else None
                    logp = R.completion_logprobs(self.model, c["inputs"], c["ids"], rl.temperature,
                                                 reuse_vision=self.reuse_policy,
                                                 sampler=self._sampler_spec() if engine_logp is not None else None)
                    if engine_logp is not None:  # like for like: both under the engine's sampling distribution
                        logp, sampler_logp = logp
                        engine_logp = engine_logp.to(logp.device)
                        _add_logp_mismatch(stats, sampler_logp, engine_logp, c["mask"])
                        c["is_weights"] = _rollout_correction(stats, rl, sampler_logp, engine_logp, c["mask"])
                    if it == 0:
                        c["old"] = logp.detach() if rl.num_iterations > 1 else None
                    out = L.policy_loss(
                        logp, c["adv"], c["mask"], old_logp=c.get("old"), ref_logp=c.get("ref"), beta=rl.beta,
                        epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high, loss_type=rl.loss_type,
                        importance_sampling=rl.importance_sampling, max_completion_length=rl.max_completion_length,
                        rollout_weights=c.get("is_weights"), **norm)
                    step_loss += float(out.loss.detach())
                    if math.isfinite(step_loss):
                        acc.backward(out.loss)
                if it == rl.num_iterations - 1:
                    ntok = float(out.num_tokens)
                    stats.add("kl", float(out.kl) * ntok, ntok)
                    stats.add("clip_ratio", float(out.clip_ratio) * ntok, ntok)
            if it == 0:  # one policy forward/backward of the step (bench rl: the share of a step spent elsewhere)
                stats.add("time/policy_fwd_bwd", time.perf_counter() - t_fb, 1)
            self._check_finite(step_loss, "loss")
            gn = acc.clip_grad_norm_(self.model.parameters(), rl.max_grad_norm)
            if gn is None and self.deepspeed:  # DeepSpeed clips inside its step (in accelerate's backward)
                gn = self.model.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            if gn is not None:
                self._check_finite(grad_norm, "gradient norm")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
        stats.ensure("kl")
        stats.ensure("clip_ratio")
        if rl.backend == "vllm":  # every rank reports the same keys (one all-reduce)
            stats.ensure(MISMATCH_MEAN)
            stats.ensure_max(MISMATCH_MAX)
            if rl.rollout_correction != "none":
                stats.ensure(IS_MEAN)
                stats.ensure(IS_MASKED)
                stats.ensure_max(IS_MAX)
                stats.ensure_min(IS_MIN)
        counts = {"local": [float(total_seqs), float(total_tokens)], "normalisers": norm}
        return float(np.mean(losses)), grad_norm, counts

    def _sampler_spec(self) -> dict:
        """How the rollout engine turns logits into its sampling distribution, beyond the temperature."""
        return {"top_p": self.cfg.rl.top_p, "logit_bias": getattr(self.backend, "logit_bias", None)}

    def _dummy_generate(self, sampling) -> None:
        """ZeRO-3: a rank with no valid prompt still joins the others' generate loop (synced_gpus), whose every
        forward runs a collective in DeepSpeed's start-of-forward hook."""
        from pipelines.models import Media

        one = Sampling(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                       top_p=sampling.top_p, n=1)
        rng = torch.get_rng_state()  # the sampling must not shift this rank's RNG stream (DDP draws nothing here)
        try:
            self.backend.generate(["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"],
                                  [Media(video=None, image=None, fps=None)], one)
        finally:
            torch.set_rng_state(rng)

    def _dummy_backward(self) -> None:
        """This rank has no valid sample this step: join the collective backward with a zero loss."""
        with self._lockstep("policy"):
            out = text_dummy_forward(self.model, self.processor.tokenizer.pad_token_id, self.device)
        self.accelerator.backward(out.logits.sum() * 0.0)

    def _check_finite(self, value: float, what: str) -> None:
        """All ranks agree: a NaN/inf anywhere stops the run everywhere (the last checkpoint is kept)."""
        bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.device)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad.item()) > 0:
            steps = C.checkpoint_steps(self.run_dir)
            kept = f"; last checkpoint kept: {steps[-1][1]}" if steps else "; no checkpoint was saved yet"
            raise TrainingError(
                f"non-finite {what} at step {self.step + 1}{kept}",
                hint="lower rl.learning_rate or rl.max_grad_norm, check the rewards; resume with --resume auto",
            )

    # ------------------------------------------------------------------------------------------------ checkpoints
    # Save / check / restore live in pipelines.rl.checkpoint; the trainer only says when.
    def save_checkpoint(self) -> Path:
        return C.save_rl_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        C.restore_rl_checkpoint(self, path)

    def save_final(self, register: bool = True) -> Path:
        out = Path(self.cfg.rl.output_dir) if self.cfg.rl.output_dir else self.run_dir / "model"
        C.save_model(self, out, merge_lora=True)
        self.accelerator.wait_for_everyone()
        if self.is_main and register:
            self.run.log_artifact("model", out, meta={"step": self.step, "algo": self.cfg.rl.algo})
        return out

    def cleanup(self) -> None:
        try:
            if self.cfg.run.report_to:
                self.accelerator.end_training()
        except Exception:  # noqa: BLE001
            pass
        self.backend = None
        self.ref_model = None


def _info(msg: str) -> None:
    log.info(msg)
    if os.environ.get("VIDEOR1_QUIET") != "1":
        print(msg, file=sys.stderr, flush=True)


# Vision tower work per step (issue 22, docs/rl.md "Encode once"): patch rows that went through the vision tower(s)
# during the step (generation with the HF backend, reference, every policy pass; counted by a forward pre-hook on
# each tower, ZeRO dummy calls included), and patch rows of the step's distinct media items (each generated prompt's
# image or video, plus its T-GRPO shuffled copy as an item of its own). Summed over ranks.
PATCHES_ENCODED = "vision/patches_encoded"
PATCHES_DISTINCT = "vision/patches_distinct"


def _distinct_patch_rows(processor, groups) -> int:
    from pipelines.models.families import adapter_for

    adapter = adapter_for(processor)
    total = 0
    for g in groups:
        total += adapter.patch_rows(g.sample.media)
        if g.shuffled and g.sample.shuffled_media is not None:
            total += adapter.patch_rows(g.sample.shuffled_media)
    return total


# Rollout/trainer mismatch (verl's rollout-vs-actor probability difference): |log p_vLLM - log p_policy| over the
# completion tokens of a step, measured before the update, both under the engine's sampling distribution (vLLM's
# processed log-probs; the policy's through losses.sampler_logprobs), so identical weights read ~0 at any temperature
# and top_p. Stale weights (no encoder-cache reset), other positions (M-RoPE) or numerics show up here first.
MISMATCH_MEAN = "rollout/logp_diff_mean"
MISMATCH_MAX = "rollout/logp_diff_max"


def _rollout_logprobs(groups, length: int) -> torch.Tensor | None:
    """(N*G, length) log-probs the rollout engine reported for the ordered completions (NaN-padded), or None."""
    seqs = [c.logprobs for g in groups for c in g.ordered]
    if not seqs or any(s is None for s in seqs):
        return None
    out = torch.full((len(seqs), length), float("nan"), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s[:length], dtype=torch.float32)
    return out


def mismatch_terms(policy_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[float, int, float]:
    """(sum, count, max) of |policy - rollout| over completion tokens where the engine reported a log-prob."""
    valid = mask.bool() & torch.isfinite(rollout_logp)
    diff = (policy_logp.float() - rollout_logp.float()).abs()[valid]
    if not diff.numel():
        return 0.0, 0, 0.0
    return float(diff.sum()), int(diff.numel()), float(diff.max())


def _add_logp_mismatch(stats: "_Stats", policy_logp, rollout_logp, mask) -> None:
    total, count, peak = mismatch_terms(policy_logp, rollout_logp, mask)
    stats.add(MISMATCH_MEAN, total, count)
    stats.add_max(MISMATCH_MAX, peak)


# Rollout correction (rl.rollout_correction, losses.rollout_correction): TRL's importance weights and its metrics.
IS_MEAN, IS_MIN, IS_MAX = "rollout/is_ratio_mean", "rollout/is_ratio_min", "rollout/is_ratio_max"
IS_MASKED = "rollout/is_masked_fraction"


def _rollout_correction(stats: "_Stats", rl, policy_logp, rollout_logp, mask) -> torch.Tensor | None:
    """The chunk's importance weights (None without correction); their metrics go to `stats`."""
    if rl.rollout_correction == "none":
        return None
    corr = L.rollout_correction(policy_logp, rollout_logp, mask, mode=rl.rollout_correction,
                                c_max=rl.rollout_correction_c_max, c_min=rl.rollout_correction_c_min)
    stats.add(IS_MEAN, corr.ratio_sum, corr.units)
    stats.add(IS_MASKED, corr.outside, corr.units)
    if corr.units:
        stats.add_max(IS_MAX, corr.ratio_max)
        stats.add_min(IS_MIN, corr.ratio_min)
    return corr.weights


_MIN_PREFIX = "_min:"


class _Stats:
    """(sum, count) pairs with a fixed key set, all-reduced over ranks in one collective; maxima in a second."""

    def __init__(self):
        self.d: dict[str, list[float]] = {}
        self.maxes: dict[str, float] = {}

    def add_max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, float("-inf")), float(value))

    def ensure_max(self, key: str) -> None:
        self.maxes.setdefault(key, float("-inf"))

    def add_min(self, key: str, value: float) -> None:  # a minimum is the maximum of the negated values
        self.add_max(_MIN_PREFIX + key, -float(value))

    def ensure_min(self, key: str) -> None:
        self.ensure_max(_MIN_PREFIX + key)

    def add(self, key: str, total: float, count: float) -> None:
        s = self.d.setdefault(key, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def ensure(self, key: str) -> None:
        self.d.setdefault(key, [0.0, 0.0])

    def zero(self) -> None:
        """Every sum and count 0, keys kept (a rank whose figures another rank reports)."""
        self.d = {k: [0.0, 0.0] for k in self.d}

    def reduce(self, accelerator) -> dict[str, float]:
        keys = sorted(self.d)
        t = torch.tensor([self.d[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, reduction="sum")
        out = {}
        for k, (s, c) in zip(keys, t.tolist()):
            if k in ("skipped", "_gen_tokens", PATCHES_ENCODED, PATCHES_DISTINCT):
                out[k] = s
            elif k in ("step_time", "gen_time", "loss"):
                out[k] = s / max(1.0, c)
            else:
                out[k] = s / c if c > 0 else float("nan")
        if self.maxes:
            mkeys = sorted(self.maxes)
            m = torch.tensor([self.maxes[k] for k in mkeys], dtype=torch.float64, device=accelerator.device)
            if accelerator.num_processes > 1:
                import torch.distributed as dist

                dist.all_reduce(m, op=dist.ReduceOp.MAX)
            for k, v in zip(mkeys, m.tolist()):
                v = v if v != float("-inf") else float("nan")
                if k.startswith(_MIN_PREFIX):
                    out[k.removeprefix(_MIN_PREFIX)] = -v
                else:
                    out[k] = v
        return out
