"""Test-only worker for tests/test_launch.py: started by pipelines.launch.launch(..., module="_dist_probe").

Each rank inits the process group (pipelines.launch.init_distributed), all-reduces its rank, optionally builds an
Accelerator (make_accelerator), attaches to the launcher's registry run, and writes $PROBE_OUT/rank<R>.json.
PROBE_MODE: ok (default) | fail (rank 1 exits 3) | hang (write a ready file, then sleep until killed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    torch.set_num_threads(1)
    from pipelines import launch as L
    from pipelines.config import Config

    out = Path(os.environ["PROBE_OUT"])
    mode = os.environ.get("PROBE_MODE", "ok")
    cfg = Config()
    cfg.distributed.nproc = 2  # what the workers of a --nproc 2 command see: they must not relaunch
    r = L.rank()
    if mode == "hang":
        (out / f"ready{r}").write_text(str(os.getpid()))
        while True:
            time.sleep(0.2)
    if mode == "fail" and r == 1:
        return 3
    info = {
        "argv": sys.argv[1:],
        "is_worker": L.is_distributed_worker(),
        "needs_launch": L.needs_launch(cfg),
        "env_rank": int(os.environ["RANK"]),
        "launched": os.environ.get("VIDEOR1_LAUNCHED"),
        "run_id": os.environ.get("VIDEOR1_RUN_ID"),
        "run_dir": os.environ.get("VIDEOR1_RUN_DIR"),
    }
    if os.environ.get("PROBE_ACCEL") == "1":
        acc = L.make_accelerator(cfg)
        t = torch.tensor([float(acc.process_index + 1)])
        info["accel"] = {"num_processes": acc.num_processes, "process_index": acc.process_index,
                         "device": str(acc.device), "sum": acc.reduce(t, reduction="sum").item()}
    else:
        assert L.init_distributed(cfg)
    import torch.distributed as dist

    t = torch.tensor([float(L.rank() + 1)])
    dist.all_reduce(t)
    info.update(rank=L.rank(), world_size=L.world_size(), local_rank=L.local_rank(), sum=t.item(),
                backend=dist.get_backend())
    if os.environ.get("PROBE_REGISTRY") == "1":
        from videor1_cli.common import registered_run

        with registered_run(cfg, "probe") as (run, run_dir):
            info["attached_run"] = run.id
            info["attached_dir"] = str(run_dir)
            if L.is_main_process():
                run.log_metrics(0, {"probe_sum": t.item()})
    r = L.rank()
    L.end_worker()  # what `videor1` does on a worker's success (videor1_cli.app.main)
    info["initialized_after_end"] = dist.is_initialized()
    (out / f"rank{r}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
