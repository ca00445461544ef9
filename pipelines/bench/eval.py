"""`videor1 bench eval` (hf): batched `generate` (--batch-size) against one sample at a time, on the same prompts.

The rendered prompts and decoded media are built once up front (the frames a run would take from its cache), so the
figure measures the generation engine. Timing: `pipelines.bench.alternate` (warm-up passes excluded, alternating
rounds of batched and sequential, min and median, the load before and after). One model, two `HFBackend`s that
differ in batch size only.
"""

from __future__ import annotations

from typing import Any, Callable


def batched_vs_sequential(cfg, bench_input, batch_size: int, rounds: int, warmup: int = 1,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from pipelines.bench import alternate, machine
    from pipelines.evaluate.runner import load_eval_records, render_prompt, sampling_for
    from pipelines.generation.hf import HFBackend
    from pipelines.models import decode_media, load_model, load_processor
    from pipelines.models.families import adapter_for
    from pipelines.prompts import load_template

    from pipelines.threads import apply_torch_threads

    apply_torch_threads(cfg)  # as `videor1 eval` runs: run.torch_threads, or this process's share of the cores
    processor = load_processor(cfg.model.name_or_path)
    model = load_model(cfg.model)
    records = load_eval_records(bench_input.file, cfg.eval.limit)
    template = load_template(cfg.prompt.template)
    prompts = [render_prompt(processor, r, template) for r in records]
    media = [decode_media(r, cfg, bench_input.root, factor=adapter_for(processor).factor) for r in records]
    sampling = sampling_for(cfg)

    def run(bs: int):
        backend = HFBackend(model, processor, batch_size=bs)

        def generate():
            for s in range(0, len(prompts), bs):
                backend.generate(prompts[s:s + bs], media[s:s + bs], sampling)

        return generate

    cmp = alternate({"batched": run(batch_size), "sequential": run(1)}, rounds, warmup, progress=progress)
    out: dict[str, Any] = {"samples": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens}
    for name, bs in (("batched", batch_size), ("sequential", 1)):
        side = cmp[name]
        out[name] = {"batch_size": bs, "samples": len(prompts), **side.summary(3),
                     "samples_per_s": round(len(prompts) / side.median_s, 2)}
    # speed-up of batching: the sequential time over the batched, by the median and by the min
    out["speedup"] = round(cmp.ratio("sequential", "batched"), 2)
    out["speedup_min"] = round(cmp.ratio("sequential", "batched", "min"), 2)
    out["method"] = cmp.summary()["method"]
    out["machine"] = machine()
    return out
