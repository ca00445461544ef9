"""`videor1 bench eval|rl --backend vllm`: the vLLM engine against the HF backend on the same prompts.

eval: the same rendered prompts and decoded media (decoded once up front) go through `HFBackend.generate` (batches
of `batch_size`) and `VLLMBackend.generate` (vLLM schedules the whole list itself, `max_num_seqs = batch_size`);
greedy, the same new-token budget (>= 128: decoding is what is compared). The engine runs in this process, as the
project runs it (`VLLM_ENABLE_V1_MULTIPROCESSING=0` on the CPU, external_launcher under torchrun); its start and the
HF model load are timed once and reported apart. Then `pipelines.bench.alternate`: warm-up passes excluded,
alternating rounds (hf, vllm / vllm, hf / ...), min and median per side, the load before and after. The share of
identical outputs is reported beside the speed (it must be ~1: the same model, the same positions).

The model: `BENCH_SPEC`, a tiny Qwen2.5-VL sized so that a decoded token costs model compute rather than Python
overhead (4 layers, hidden 256, 4 heads of head_dim 64 (vLLM's CPU attention takes 32, 64, ...), MLP 1024: 4.2 M
parameters; 128 new tokens per sample). On the 0.2 M-parameter default tiny model the two engines are equal (issue
24: 1.12x on a quiet machine), because both spend a decoded token in per-step bookkeeping. The real 7B's decode is
bound by its matmuls and memory bandwidth on a GPU, which no CPU model reproduces: read the ratio as "the engines on a
model whose steps are compute", not as the GPU's.

rl: a few T-GRPO steps (the same model, 128-token completions) with `rl.backend=hf` and with `rl.backend=vllm` on the
same records, both trainers set up
first and then stepped in alternating rounds (warm-up steps excluded); per step the trainer logs `step_time`,
`gen_time` and `time/policy_fwd_bwd` (the first pass's policy forward + backward), from which the share of a step
spent outside generation and one policy forward/backward (reference forward, rewards, data, optimizer, weight sync,
bookkeeping) is computed.

Needs the vLLM venv on the CPU (scripts/make-vllm-cpu-venv.sh).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

BENCH_NEW_TOKENS = 128


def bench_spec():
    from pipelines.models import TinySpec

    return TinySpec(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=(8, 12, 12))


def tiny_vllm_model(work: Path) -> str:
    """The head_dim-32 tiny model (0.2 M parameters): RL plumbing."""
    from pipelines.bench import cached_tiny_model
    from pipelines.models import TINY_VLLM_SPEC

    return cached_tiny_model(work / "tiny-model-vllm", spec=TINY_VLLM_SPEC)


def bench_vllm_model(work: Path) -> str:
    """`BENCH_SPEC`'s model (4.2 M parameters, head_dim 64): the eval engine comparison."""
    from pipelines.bench import cached_tiny_model

    return cached_tiny_model(work / "tiny-model-vllm-bench", spec=bench_spec())


def eval_compare(cfg, bench_input, batch_size: int, rounds: int, warmup: int = 1,
                 progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    import torch

    from pipelines.bench import alternate, machine
    from pipelines.evaluate.runner import load_eval_records, render_prompt
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.generation.vllm import build_vllm_backend
    from pipelines.models import decode_media, load_model, load_processor
    from pipelines.prompts import load_template

    from pipelines.threads import apply_torch_threads

    apply_torch_threads(cfg)  # as `videor1 eval` runs: run.torch_threads, or this process's share of the cores
    processor = load_processor(cfg.model.name_or_path)
    records = load_eval_records(bench_input.file, cfg.eval.limit)
    template = load_template(cfg.prompt.template)
    prompts = [render_prompt(processor, r, template) for r in records]
    media = [decode_media(r, cfg, bench_input.root) for r in records]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, n=1)

    progress("hf: loading the model")
    t = time.perf_counter()
    hf = HFBackend(load_model(cfg.model), processor, batch_size=batch_size)
    hf_start = time.perf_counter() - t
    progress("vllm: starting the engine")
    t = time.perf_counter()
    engine = build_vllm_backend(cfg, "eval", max_num_seqs=batch_size)
    vllm_start = time.perf_counter() - t

    def hf_generate():
        out = []
        for s in range(0, len(prompts), batch_size):
            out += hf.generate(prompts[s:s + batch_size], media[s:s + batch_size], sampling)
        return out

    cmp = alternate({"hf": hf_generate, "vllm": lambda: engine.generate(prompts, media, sampling)}, rounds, warmup,
                    progress=progress)
    hf_out, vllm_out = cmp["hf"].value, cmp["vllm"].value

    def summary(name, outs, start):
        side = cmp[name]
        tokens = sum(len(c[0].token_ids) for c in outs)
        return {"start_s": round(start, 2), **side.summary(3), "samples_per_s": round(len(prompts) / side.median_s, 2),
                "tokens": tokens, "tokens_per_s": round(tokens / side.median_s, 1),
                "tokens_per_s_best": round(tokens / side.min_s, 1)}

    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(hf_out, vllm_out))
    res = {"samples": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": batch_size,
           "rounds": rounds, "warmup": warmup, "model": cfg.model.name_or_path,
           "parameters_m": round(sum(p.numel() for p in hf.model.parameters()) / 1e6, 2),
           "torch_threads": torch.get_num_threads(), "hf": summary("hf", hf_out, hf_start),
           "vllm": summary("vllm", vllm_out, vllm_start), "identical_outputs": same,
           "method": cmp.summary()["method"], "machine": machine()}
    # the speed-up of vLLM over HF: HF's time over vLLM's, by the median and by the min of the timed rounds
    res["speedup"] = round(cmp.ratio("hf", "vllm"), 2)
    res["speedup_min"] = round(cmp.ratio("hf", "vllm", "min"), 2)
    return res


def rl_compare(model_dir: str, data: str, out_dir: Path, steps: int, warmup: int, overrides: list[str],
               progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Per backend: median step time, generation time, policy forward/backward time and the rest's share; the two
    trainers step in alternating rounds (one step each), after `warmup` untimed steps each."""
    from contextlib import ExitStack

    from pipelines.bench import Timed, alternate, machine
    from pipelines.config import load_config
    from pipelines.registry import Registry
    from pipelines.rl.trainer import RLTrainer

    res: dict[str, Any] = {"steps": steps, "warmup": warmup, "overrides": overrides}
    trainers, setup_s, rows = {}, {}, {"hf": [], "vllm": []}
    with ExitStack() as stack:
        for backend in ("hf", "vllm"):
            cfg = load_config(overrides=[f"model.name_or_path={model_dir}", f"data.file={data}", "rl.algo=tgrpo",
                                         f"rl.backend={backend}", f"rl.max_steps={steps + warmup}",
                                         f"run.output_dir={out_dir / backend}", "rl.save_steps=100000", *overrides])
            progress(f"{backend}: setting up")
            run = stack.enter_context(Registry(out_dir / backend / "registry.db").run("bench-rl-inner", cfg))
            t = time.perf_counter()
            tr = RLTrainer(cfg, run, out_dir / backend / "run")
            tr.setup()
            setup_s[backend] = time.perf_counter() - t
            trainers[backend] = tr

        def stepper(backend):
            tr = trainers[backend]

            def one():
                m = tr.train_step()
                tr.step += 1
                rows[backend].append(m)
                return Timed([m["step_time"]], m)

            return one

        cmp = alternate({b: stepper(b) for b in ("hf", "vllm")}, rounds=steps, warmup=warmup, progress=progress)
        for tr in trainers.values():
            tr.cleanup()
    for backend in ("hf", "vllm"):
        timed = rows[backend][warmup:]

        def med(key):
            return round(statistics.median(r[key] for r in timed), 4)

        rest = [(r["step_time"] - r["gen_time"] - r["time/policy_fwd_bwd"]) / r["step_time"] for r in timed]
        res[backend] = {"setup_s": round(setup_s[backend], 2), "step_s": med("step_time"),
                        "step_min_s": round(min(r["step_time"] for r in timed), 4), "gen_s": med("gen_time"),
                        "gen_min_s": round(min(r["gen_time"] for r in timed), 4),
                        "policy_fwd_bwd_s": med("time/policy_fwd_bwd"),
                        "sync_s": med("time/weight_sync") if "time/weight_sync" in timed[0] else 0.0,
                        "other_share": round(statistics.median(rest), 3), "gen_tokens_per_s": med("tokens_per_s")}
        if backend == "vllm":
            res[backend]["logp_diff_mean"] = med("rollout/logp_diff_mean")
    res["gen_speedup"] = round(res["hf"]["gen_s"] / res["vllm"]["gen_s"], 2)
    res["gen_speedup_min"] = round(res["hf"]["gen_min_s"] / res["vllm"]["gen_min_s"], 2)
    res["method"] = cmp.summary()["method"]
    res["machine"] = machine()
    return res
