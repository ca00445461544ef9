"""`videor1 bench sp`: sequence parallelism's step time and peak activation memory per rank, SP 1 vs SP 2.

One 2-rank job (torchrun; gloo on the CPU, NCCL on GPUs) measures, for each frame count (default 64 and 256), the
T-GRPO policy micro-batch of one video prompt (G = 2 rows, a 16-token completion each): the log-prob forward
(`rollout.completion_logprobs`), the GRPO loss and its backward.

- SP 1: each rank runs the whole sequence on a plain copy of the model (what one rank holding the sequence does);
- SP 2: the same batch through the same weights with sequence parallelism installed (`pipelines.parallel`: the
  sequence, and the vision tower's frames, split over the 2 ranks).

Memory is the peak of the tensors allocated during the step over those alive when it starts (activations, their
gradients, temporaries; parameters and the process's baseline RSS excluded): on the CPU from torch's profiler
(`profile_memory=True`: every allocation and free the CPU allocator reports, summed in time order), on GPUs
`torch.cuda.max_memory_allocated` minus the allocation at the start. It is measured once per configuration after
warm-up (deterministic: it does not depend on the machine's load). Step time is measured in alternating rounds (SP 1,
SP 2, SP 1, ...), both ranks starting each step together (barrier), the step's time being the slower rank's; min and
median are reported, with the ratio SP 2 / SP 1 from the same job and the load average around it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.launch import free_port

FRAMES = (64, 256)


def _world(work: Path, frames: int) -> Path:
    from pipelines.synth import synthesize

    d = work / f"world-{frames}"
    if not (d / "rl.json").exists():
        synthesize(d, train=4, test=0, sft=0, seed=0, frames=frames, image_fraction=0.0)
    return d


def run_bench(work: str | Path, *, model_dir: str | None = None, frames: tuple[int, ...] = FRAMES, rounds: int = 5,
              warmup: int = 1, generations: int = 2, completion: int = 16, device: str = "auto",
              progress: Callable[[str], None] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Launch the 2-rank measurement and return its rows (+ machine and load)."""
    from pipelines.bench import cached_tiny_model

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    model = model_dir or cached_tiny_model(work / "tiny-model")
    world = _world(work, max(frames))
    out = work / f"sp-{time.time_ns()}"
    out.mkdir()
    spec = {"model": str(model), "world": str(world), "frames": list(frames), "rounds": rounds, "warmup": warmup,
            "generations": generations, "completion": completion, "device": device, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1", VIDEOR1_BENCH_SP=str(out / "spec.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pipelines.bench.sp"]
    if progress:
        progress(f"2 ranks, frames {', '.join(map(str, frames))}")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench sp failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    res = json.loads((out / "result.json").read_text())
    import torch

    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "load_avg_before": list(load_before),
                      "load_avg_after": list(os.getloadavg()), "wall_s": round(time.perf_counter() - t0, 1)}
    (work / "bench-sp.json").write_text(json.dumps(res, indent=2))
    return res


# ---------------------------------------------------------------------------------------------------------------------
# The worker (python -m pipelines.bench.sp under torchrun)
def _peak_bytes(step: Callable[[], None], cuda: bool) -> int:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Every allocation (+size) and free (-size) the CPU allocator reported during the step, in time order.
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, int(node.typed[1].alloc_size)))
        stack.extend(node.children)
    live = peak = 0
    for _t, size in sorted(events):
        live += size
        peak = max(peak, live)
    return int(peak)


def _batch(cfg, processor, world: Path, frames: int, generations: int, completion: int):
    import torch

    from pipelines.prompts import load_template
    from pipelines.records import load_records, record_dict, json_columns
    from pipelines.rl import rollout as R

    cfg.video.max_frames = frames
    cfg.video.min_frames = min(cfg.video.min_frames, frames)
    ds = load_records(str(world / "rl.json"))
    cols = json_columns(ds)
    rows = [(i, record_dict(ds[i], cols)) for i in range(len(ds))]
    rows = [r for r in rows if r[1]["data_type"] == "video"][:1]
    samples, skipped = R.prepare_samples(rows, cfg, processor, load_template(cfg.prompt.template), world,
                                         torch.Generator().manual_seed(0), temporal=False)
    if skipped or not samples:
        raise RuntimeError(f"bench sp: no usable video ({skipped})")
    g = torch.Generator().manual_seed(0)
    n = generations
    ids = torch.randint(20, len(processor.tokenizer) - 20, (n, completion), generator=g)
    mask = torch.ones_like(ids)
    inputs = R.policy_inputs(processor, samples, n, ids, mask)
    return inputs, ids, mask, torch.randn(n, generator=g), int(inputs["input_ids"].shape[1]), samples[0].media


def worker() -> int:
    import torch
    import torch.distributed as dist

    from pipelines import parallel as P
    from pipelines.config import load_config
    from pipelines.models import load_model, load_processor, resolve_device
    from pipelines.rl import losses as L
    from pipelines.rl import rollout as R

    spec = json.loads(Path(os.environ["VIDEOR1_BENCH_SP"]).read_text())
    cfg = load_config(preset="cpu-tiny", overrides=[
        f"model.name_or_path={spec['model']}", f"model.device={spec['device']}", "model.attn_implementation=auto",
        "video.fps=4", "video.min_pixels=3136", "video.max_pixels=3136", "distributed.nproc=2",
        "distributed.sequence_parallel=2"])
    device = resolve_device(cfg.model.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    topo = P.setup(2)
    processor = load_processor(spec["model"])
    plain = load_model(cfg.model, device=device, for_training=True)
    split = load_model(cfg.model, device=device, for_training=True)
    P.install(split, topo)
    rows = []
    for frames in spec["frames"]:
        inputs, ids, mask, adv, length, media = _batch(cfg, processor, Path(spec["world"]), frames,
                                                       spec["generations"], spec["completion"])
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        ids, mask, adv = ids.to(device), mask.to(device), adv.to(device)

        def step(model):
            logp = R.completion_logprobs(model, inputs, ids)
            L.policy_loss(logp, adv, mask, beta=0.0, loss_type="grpo").loss.backward()
            model.zero_grad(set_to_none=True)

        configs = {1: plain, 2: split}
        for _ in range(spec["warmup"]):
            for sp, model in configs.items():
                step(model)
        mem = {}
        for sp, model in configs.items():
            dist.barrier()
            mem[sp] = _peak_bytes(lambda m=model: step(m), cuda)
        times: dict[int, list[float]] = {1: [], 2: []}
        for k in range(spec["rounds"]):
            order = (1, 2) if k % 2 == 0 else (2, 1)
            for sp in order:
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                step(configs[sp])
                if cuda:
                    torch.cuda.synchronize()
                dt = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a step ends when its slower rank does
                times[sp].append(float(dt))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mem)
        for sp in (1, 2):
            rows.append({"frames": frames, "video_frames": int(media.video.shape[0]), "sequence": length,
                         "rows": int(ids.shape[0]), "sequence_parallel": sp,
                         "step_s_min": min(times[sp]), "step_s_median": statistics.median(times[sp]),
                         "step_s": times[sp],
                         "peak_activation_mib": [round(m[sp] / 2**20, 3) for m in gathered]})
    if topo.global_rank == 0:
        ratios = {}
        for frames in spec["frames"]:
            one = next(r for r in rows if r["frames"] == frames and r["sequence_parallel"] == 1)
            two = next(r for r in rows if r["frames"] == frames and r["sequence_parallel"] == 2)
            ratios[str(frames)] = {
                "memory_sp2_over_sp1": round(max(two["peak_activation_mib"]) / max(one["peak_activation_mib"]), 3),
                "time_sp2_over_sp1_median": round(two["step_s_median"] / one["step_s_median"], 3)}
        result = {"rows": rows, "ratios": ratios, "device": str(device), "spec": spec,
                  "attention": P.of(split).core_attn}
        (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker())
