"""transformers `generate` backend: batched, any device; ordered and shuffled rollouts go in one call.

`encode_once` (RL's ``rl.encode_once``): rows of one call that repeat the same prompt AND the same `Media` object
(the G rollouts of a prompt, the G~ of its shuffled copy) share one encoder call: the processor runs on the distinct
(prompt, media) pairs, every per-row tensor is gathered per row (so positions are those of the repeated rows), the
pixels stay distinct and `families.share_vision` places each item's features into its rows inside `generate`
(transformers encodes before the prefill, in `_prepare_multimodal_encoder_kwargs_for_generation`, through the
core's bound `get_*_features`). A shuffled copy is another `Media` object: its own item."""

from __future__ import annotations

from typing import Sequence

import torch

from pipelines.generation import Completion, Sampling
from pipelines.models import Media, encode_batch, suppressed_token_ids


class HFBackend:
    def __init__(self, model, processor, batch_size: int = 64, encode_once: bool = False):
        self.model = model
        self.encode_once = encode_once
        self.processor = processor
        self.batch_size = batch_size
        tok = processor.tokenizer
        self.eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.pad_token_id
        self.suppress = suppressed_token_ids(tok)
        # DeepSpeed ZeRO-3 (set by the RL trainer): every forward of the engine's module runs a collective, so ranks
        # keep stepping until all are done (transformers' synced_gpus), whatever their completions' lengths.
        self.synced_gpus: bool | None = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], media: Sequence[Media], sampling: Sampling) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        # Keep roughly batch_size sequences per generate call, whatever n is.
        step = max(1, self.batch_size // max(1, sampling.n))
        for i in range(0, len(prompts), step):
            out.extend(self._generate(prompts[i : i + step], media[i : i + step], sampling))
        return out

    def _generate(self, prompts, media, sampling: Sampling) -> list[list[Completion]]:
        model = self.model
        device = next(model.parameters()).device
        plan = None
        if self.encode_once:
            from pipelines.models import select_rows

            keys: dict[tuple[int, str], int] = {}  # (the Media object, the prompt) -> distinct row
            d_prompts, d_media, rows = [], [], []
            for p, m in zip(prompts, media):
                if (id(m), p) not in keys:
                    keys[(id(m), p)] = len(d_prompts)
                    d_prompts.append(p)
                    d_media.append(m)
                rows.append(keys[(id(m), p)])
            batch = encode_batch(self.processor, d_prompts, d_media)
            batch, plan = select_rows(dict(batch), rows, d_media, share_vision=True)
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        else:
            batch = encode_batch(self.processor, prompts, media).to(device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        gen_kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppress,
        )
        if sampling.greedy:
            gen_kwargs.update(do_sample=False, top_p=None, top_k=None, temperature=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if self.synced_gpus is not None:
            gen_kwargs["synced_gpus"] = self.synced_gpus
        was_training = model.training
        model.eval()
        try:
            from pipelines.models.families import share_vision

            with share_vision(model, plan):
                seqs = model.generate(**batch, **gen_kwargs)
        finally:
            model.train(was_training)
        completions = seqs[:, batch["input_ids"].shape[1]:].tolist()
        tok = self.processor.tokenizer
        results: list[list[Completion]] = []
        for p in range(len(prompts)):
            group = []
            for j in range(sampling.n):
                ids = completions[p * sampling.n + j]
                finished = self.eos_id in ids
                ids = ids[: ids.index(self.eos_id) + 1] if finished else [t for t in ids if t != self.pad_id]
                group.append(Completion(text=tok.decode(ids, skip_special_tokens=True), token_ids=ids,
                                        finished=finished))
            results.append(group)
        return results
