"""How many CPU threads torch uses in each process (`run.torch_threads`), and what `doctor` reports about it.

torch's intra-op pool defaults to the machine's cores in EVERY process; with several processes on one node (torchrun
ranks, a background eval beside a training run, DataLoader workers) that oversubscribes the cores. The rule here:
`run.torch_threads` when set, else the cores this process may run on (its CPU affinity, which containers and
`taskset` narrow) divided by the processes of the job on this node (torchrun's LOCAL_WORLD_SIZE, or
distributed.nproc), at least 1.

Measured on the quickstart's 0.2 M-parameter model (BENCHMARKS.md, "Quickstart on both cores"): its ops are too small
to split across threads (2 threads cost ~4x the CPU seconds of 1 for the same steps), so the quickstart runs one
thread per process and uses the second core with a second data-parallel rank and a background eval instead.
"""

from __future__ import annotations

import os
from typing import Any


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def processes_on_node(cfg) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE inside a worker, else distributed.nproc."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, int(cfg.distributed.nproc))


def resolve_torch_threads(setting: int | None, cores: int, processes: int) -> int:
    """Pure rule: an explicit setting wins; otherwise an equal share of the cores per process, at least 1."""
    if setting:
        return int(setting)
    return max(1, cores // max(1, processes))


def torch_threads(cfg, processes: int | None = None) -> int:
    """The intra-op threads a stage of this config uses in each of its processes."""
    return resolve_torch_threads(cfg.run.torch_threads, cores_available(),
                                 processes_on_node(cfg) if processes is None else processes)


def apply_torch_threads(cfg) -> int:
    """Set this process's torch intra-op threads from the config (train sft / train rl / eval call it first)."""
    import torch

    n = torch_threads(cfg)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _procs(n: int, threads: int, workers: int = 0) -> str:
    s = f"{n} process{'es' if n > 1 else ''} x {threads} torch thread{'s' if threads > 1 else ''}"
    return s + (f" + {workers} DataLoader worker{'s' if workers > 1 else ''} each" if workers else "")


def stage_plan(cfg) -> dict[str, Any]:
    """What `doctor` prints: the cores, and per stage its processes x torch threads (+ DataLoader workers)."""
    cores = cores_available()
    nproc = max(1, int(cfg.distributed.nproc))
    per_rank = resolve_torch_threads(cfg.run.torch_threads, cores, nproc)
    q = cfg.quickstart
    qn = max(1, int(q.nproc))
    q_train = resolve_torch_threads(q.torch_threads, cores, qn)
    q_eval = resolve_torch_threads(q.torch_threads, cores, 1)
    return {
        "cpu cores available": cores,
        "threads setting": (f"run.torch_threads = {cfg.run.torch_threads}" if cfg.run.torch_threads
                            else "auto (run.torch_threads: null): cores available / processes on the node"),
        "threads: train sft": _procs(nproc, per_rank, cfg.data.num_workers),
        "threads: train rl": _procs(nproc, per_rank),
        "threads: eval": _procs(nproc, per_rank),
        "threads: quickstart": (f"train sft: {_procs(qn, q_train, q.data_workers)}; train rl: {_procs(qn, q_train)} "
                                f"(data-parallel ranks, quickstart.nproc); evals: {_procs(1, q_eval)}"
                                + ("; the untrained and SFT evals run in the background beside the next training "
                                   "stage" if q.overlap_evals else "")),
    }
