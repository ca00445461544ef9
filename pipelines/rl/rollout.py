"""Rollouts: records -> decoded media (once) -> prompts -> ordered + shuffled completions -> rewards -> log-probs.

The I/O half of a step, kept apart from the math in advantages.py / losses.py:

- `prepare_samples`: decode each record's media ONCE (`pipelines.models.decode_media`), render its chat prompt, make
  the frame-shuffled copy for T-GRPO (`pipelines.models.shuffled` with a seeded generator). A broken record
  (MediaError / DataError, or a prompt over ``prompt.max_prompt_length``) is skipped and reported by id, never
  replaced by another sample.
- `generate_groups`: one backend call for the ordered (n = G) and shuffled (n = G~) rollouts of every prompt. For the
  HF backend each prompt is expanded into G + G~ single-sample rows of ONE `generate` call (n = 1): the decode loop
  (one forward per new token, the dominant cost) then runs once per step instead of twice (n = G and n = G~ calls).
  The rows repeat the same `Media` objects, and the HF backend with ``encode_once`` encodes each distinct one once
  (the ordered video and its shuffled copy are two items) and places the features into its rows. Engines with their
  own batching and prefix caching (vLLM) get two calls with n = G and n = G~: one request per prompt, whose n
  samples share the prompt's prefill and its media's encoder output (docs/vllm.md).
- `score_groups`: `pipelines.rewards.compute_rewards` over the ordered completions; accuracy (needed by the temporal
  and length bonuses and p / p~) is computed even when it is not a configured reward.
- `policy_inputs` / `completion_logprobs`: the batched log-prob forward over every group of the step: the prompts are
  encoded once, each sample repeated G times, completions right-padded, and `mm_token_type_ids` extended over the
  completion tokens (`pipelines.models.extend_for_completion`). With ``rl.encode_once`` (default) the pixels are not
  repeated: the vision tower encodes each media item once per forward and its features go to the G rows
  (`pipelines.models.families.share_vision`); otherwise every row's copy is encoded (the repeated path).
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pipelines.errors import DataError, MediaError
from pipelines.generation import Completion, Sampling
from pipelines.models import Media, encode_batch, extend_for_completion, shuffled

log = logging.getLogger("videor1.rl")


@dataclass
class Sample:
    index: int  # row of the records dataset
    record: dict
    media: Media
    prompt: str
    shuffled_media: Media | None = None  # T-GRPO contrast (videos only)

    @property
    def id(self) -> Any:
        return self.record.get("problem_id", self.index)

    @property
    def is_video(self) -> bool:
        return self.media.kind == "video"


@dataclass
class Group:
    sample: Sample
    ordered: list[Completion]
    shuffled: list[Completion] = field(default_factory=list)


@dataclass
class Skipped:
    index: int
    id: Any
    reason: str


def record_id(record: dict, index: int) -> Any:
    rid = record.get("problem_id")
    return index if rid is None else rid


def render_prompt(record: dict, template, processor) -> str:
    from pipelines.prompts import build_messages

    messages = build_messages(record, template, mode="train")
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_tokens(processor, prompt: str, media: Media) -> int:
    """Tokens of the prompt the model sees: text tokens + the visual tokens its placeholder expands into."""
    from pipelines.models.families import adapter_for

    adapter = adapter_for(processor)
    n = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1  # the placeholder itself
    if media.video is not None:
        n += adapter.video_placeholder_tokens(processor, media)
    elif media.image is not None:
        h, w = media.image.shape[:2]
        n += adapter.visual_tokens(h, w, 1)
    return n


def prepare_samples(
    rows: Sequence[tuple[int, dict]],
    cfg,
    processor,
    template,
    root,
    generator: torch.Generator,
    temporal: bool,
) -> tuple[list[Sample], list[Skipped]]:
    """Decode (once), render and shuffle each record; broken ones are skipped and returned with their reason."""
    from pipelines.models import decode_media
    from pipelines.models.families import adapter_for
    from pipelines.validate import check_record

    factor = adapter_for(processor).factor
    samples, skipped = [], []
    for index, record in rows:
        rid = record_id(record, index)
        try:
            check_record(record, cfg.data.file, index)  # a bad MC answer is skipped like unreadable media
            media = decode_media(record, cfg, root, factor=factor)
            prompt = render_prompt(record, template, processor)
        except (MediaError, DataError) as e:
            skipped.append(Skipped(index, rid, str(e)))
            continue
        limit = cfg.prompt.max_prompt_length
        if limit is not None:
            n = prompt_tokens(processor, prompt, media)
            if n > limit:
                skipped.append(Skipped(index, rid, f"prompt has {n} tokens > prompt.max_prompt_length {limit}"))
                continue
        shuf = shuffled(media, generator) if temporal and media.kind == "video" else None
        samples.append(Sample(index, record, media, prompt, shuf))
    return samples, skipped


def generate_groups(
    backend,
    samples: Sequence[Sample],
    sampling: Sampling,
    num_generations: int,
    num_shuffled: int,
    expand: bool = True,
) -> list[Group]:
    """Ordered (n = G) and shuffled (n = G~, videos with a shuffled copy only) completions of every sample."""
    shuf_idx = [i for i, s in enumerate(samples) if s.shuffled_media is not None and num_shuffled > 0]
    if not samples:
        return []
    if expand:
        prompts, media = [], []
        for s in samples:
            prompts += [s.prompt] * num_generations
            media += [s.media] * num_generations
        for i in shuf_idx:
            prompts += [samples[i].prompt] * num_shuffled
            media += [samples[i].shuffled_media] * num_shuffled
        one = dataclasses.replace(sampling, n=1)
        flat = [c[0] for c in backend.generate(prompts, media, one)]
        groups = [Group(s, flat[k * num_generations:(k + 1) * num_generations]) for k, s in enumerate(samples)]
        off = len(samples) * num_generations
        for j, i in enumerate(shuf_idx):
            groups[i].shuffled = flat[off + j * num_shuffled: off + (j + 1) * num_shuffled]
        return groups
    ordered = backend.generate([s.prompt for s in samples], [s.media for s in samples],
                               dataclasses.replace(sampling, n=num_generations))
    groups = [Group(s, list(c)) for s, c in zip(samples, ordered)]
    if shuf_idx:
        shuf = backend.generate([samples[i].prompt for i in shuf_idx], [samples[i].shuffled_media for i in shuf_idx],
                                dataclasses.replace(sampling, n=num_shuffled))
        for i, c in zip(shuf_idx, shuf):
            groups[i].shuffled = list(c)
    return groups


# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Scores:
    total: torch.Tensor  # (N, G) weighted sum of the configured rewards (bonuses not included)
    per_reward: dict[str, torch.Tensor]  # name -> (N, G)
    accuracy: torch.Tensor  # (N, G)
    accuracy_shuffled: torch.Tensor  # (N, G~), NaN rows for groups without a shuffled rollout
    lengths: torch.Tensor  # (N, G) completion tokens


def _columns(records: list[dict], n: int) -> dict[str, list]:
    cols: dict[str, list] = {}
    for key in ("solution", "problem_type", "options", "data_type", "problem"):
        cols[key] = [r.get(key) for r in records for _ in range(n)]
    return cols


def score_groups(groups: Sequence[Group], rl_cfg, num_generations: int, num_shuffled: int) -> Scores:
    from pipelines.rewards import compute_rewards, get_reward_fn

    records = [g.sample.record for g in groups]
    texts = [c.text for g in groups for c in g.ordered]
    lengths = [len(c.token_ids) for g in groups for c in g.ordered]
    extra = {"mc_lenient": rl_cfg.mc_lenient, "numerical_math_verify": rl_cfg.numerical_math_verify}
    total, per = compute_rewards(rl_cfg.rewards, texts, weights=rl_cfg.reward_weights,
                                 completion_lengths=lengths, **_columns(records, num_generations), **extra)
    acc_fn = get_reward_fn("accuracy")
    acc = per["accuracy"] if "accuracy" in per else [float(x) for x in acc_fn(texts, **_columns(records,
                                                                                                num_generations),
                                                                               **extra)]
    N, G = len(groups), num_generations
    acc_shuf = torch.full((N, max(1, num_shuffled)), float("nan"), dtype=torch.float64)
    shuf_groups = [i for i, g in enumerate(groups) if g.shuffled]
    if shuf_groups:
        s_texts = [c.text for i in shuf_groups for c in groups[i].shuffled]
        s_recs = [groups[i].sample.record for i in shuf_groups]
        vals = acc_fn(s_texts, **_columns(s_recs, num_shuffled), **extra)
        vals_t = torch.tensor([float(v) for v in vals], dtype=torch.float64).view(len(shuf_groups), num_shuffled)
        acc_shuf[shuf_groups, :num_shuffled] = vals_t
    t = lambda v: torch.tensor(v, dtype=torch.float64).view(N, G)  # noqa: E731
    return Scores(total=t(total), per_reward={k: t(v) for k, v in per.items()}, accuracy=t(acc),
                  accuracy_shuffled=acc_shuf, lengths=torch.tensor(lengths).view(N, G))


# ---------------------------------------------------------------------------------------------------------------------
def repeat_each(batch: dict, n: int) -> dict:
    """Repeat every sample of a (multi-sample) processor batch n times in place order: s0 x n, s1 x n, ...

    Visual rows are split per item with the grid sizes, so a batch mixing videos and images stays aligned with the
    placeholders in input_ids (generalises `pipelines.models.repeat_batch`, which handles one sample)."""
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in ("pixel_values_videos", "pixel_values"):
            grid = batch["video_grid_thw" if k == "pixel_values_videos" else "image_grid_thw"]
            chunks = torch.split(v, grid.prod(-1).tolist())
            out[k] = torch.cat([c for c in chunks for _ in range(n)])
        else:
            out[k] = v.repeat_interleave(n, dim=0)
    return out


def pad_completions(groups: Sequence[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered completions of all groups, right-padded: ids (N*G, L) and mask (1 up to and including first EOS)."""
    seqs = [c.token_ids for g in groups for c in g.ordered]
    L = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


def policy_inputs(processor, samples: Sequence[Sample], num_generations: int, completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor, share_vision: bool = False) -> dict:
    """Model inputs for prompt + completion of every (sample, completion) row, prompts left-padded.

    `share_vision` (rl.encode_once): every per-row tensor is repeated G times as before, but the pixels stay each
    sample's once and a `families.VisionPlan` (under `families.VISION_PLAN_KEY`) maps the rows to them;
    `completion_logprobs` then runs the forward inside `share_vision`: one encoder call per media item."""
    from pipelines.models import select_rows
    from pipelines.models.families import VISION_PLAN_KEY

    media = [s.media for s in samples]
    batch = encode_batch(processor, [s.prompt for s in samples], media)
    rows = [i for i in range(len(samples)) for _ in range(num_generations)]
    batch, plan = select_rows(dict(batch), rows, media, share_vision=share_vision)
    out = extend_for_completion(batch, completion_ids, completion_mask)
    if plan is not None:
        out[VISION_PLAN_KEY] = plan
    return out


def completion_logprobs(model, inputs: dict, completion_ids: torch.Tensor, temperature: float = 1.0,
                        reuse_vision: bool = False, sampler: dict | None = None):
    """Per-token log-probs (B, L) of the completion tokens under `model` (logits[:, -L-1:-1]).

    Inputs holding a vision plan (policy_inputs(share_vision=True)) encode each media item once; `reuse_vision`
    keeps / takes its features across calls on the same inputs (only where the tower cannot change between them).
    With `sampler` (``{"top_p": ..., "logit_bias": ...}``): returns (log-probs, the same tokens' log-probs under the
    distribution the rollout engine samples from, `losses.sampler_logprobs`, detached) from the one forward."""
    from pipelines.models.families import VISION_PLAN_KEY, share_vision

    inputs = dict(inputs)
    plan = inputs.pop(VISION_PLAN_KEY, None)
    L = completion_ids.shape[1]
    from pipelines import parallel

    if parallel.enabled(model):  # distributed.sequence_parallel > 1: the sequence split over the group
        with share_vision(model, plan, reuse=reuse_vision):
            token_logps = parallel.completion_logprobs(model, inputs, completion_ids, temperature)
        if sampler is None:
            return token_logps
        if sampler.get("top_p", 1.0) < 1.0 or sampler.get("logit_bias"):
            from pipelines.errors import VideoR1Error

            # The shards' logits are not gathered (that is the point of SP): the nucleus cannot be rebuilt here.
            raise VideoR1Error("distributed.sequence_parallel with engine log-probs needs rl.top_p=1 and no logit bias",
                               hint="set rl.top_p=1.0, or distributed.sequence_parallel=1")
        return token_logps, token_logps.detach()
    with share_vision(model, plan, reuse=reuse_vision):
        out = model(**inputs, logits_to_keep=L + 1, use_cache=False)
    raw = out.logits[:, -L - 1:-1, :]
    logits = raw.float()
    if temperature != 1.0:
        logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1)
    token_logps = torch.gather(logps, 2, completion_ids.unsqueeze(-1)).squeeze(-1)
    if sampler is None:
        return token_logps
    from pipelines.rl.losses import sampler_logprobs

    return token_logps, sampler_logprobs(raw, completion_ids, temperature=temperature, **sampler)


__all__ = ["Group", "Sample", "Scores", "Skipped", "completion_logprobs", "generate_groups", "pad_completions",
           "policy_inputs", "prepare_samples", "render_prompt", "repeat_each", "score_groups"]
