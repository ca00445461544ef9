"""Multi-process launch shared by `train rl`, `train sft`, `annotate` and `eval`.

The command a user types runs once (the *launcher*: it owns the registry run). When `distributed.nproc > 1` or
`distributed.nnodes > 1`, `launch()` re-runs the SAME command line under torchrun (or `accelerate launch`) with the
same interpreter; the workers see `RANK` / `LOCAL_RANK` (so `is_distributed_worker()` is true and they do not relaunch)
and `VIDEOR1_RUN_ID` / `VIDEOR1_RUN_DIR` (so `registered_run` attaches them to the launcher's run). A command looks
like::

    with registered_run(cfg, "rl") as (run, run_dir):
        if needs_launch(cfg):
            code = launch(cfg, sys.argv[1:], run, run_dir)
            if code: raise TrainingError(f"workers exited with {code}")
            return
        init_distributed(cfg)         # or make_accelerator(cfg, ...), which does it
        ...                           # rank-0-only logging: is_main_process()

Traps handled here (measured, /work/shared/reference/environment.md): `accelerate launch --cpu --num_processes 2`
silently starts ONE process, so CPU runs use `--multi_gpu` with `Accelerator(cpu=True)` (what `make_accelerator`
builds) or torchrun; `Accelerator(cpu=True)` silently drops a DeepSpeed plugin, so DeepSpeed runs get cpu=False and
a named backend (gloo on the CPU, `make_accelerator`); ZeRO-3's `zero.Init` needs DeepSpeed's distributed layer up
before the model is built (`init_deepspeed_distributed`); Qwen2.5-VL's config has no top-level `hidden_size`, so
accelerate cannot fill ZeRO-3's hidden-size "auto" keys itself (`resolve_deepspeed_config` does).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import VideoR1Error

log = logging.getLogger(__name__)

LAUNCH_CONFIG_DIR = Path(__file__).resolve().parent / "launch_configs"
DEEPSPEED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
APP_MODULE = "videor1_cli.app"
_GRACE_SECONDS = 30.0


# ---------------------------------------------------------------------------------------------------------------------
# Where am I
def is_distributed_worker() -> bool:
    """True inside a process started by torchrun / accelerate / deepspeed (RANK or LOCAL_RANK is set)."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def _dist():
    try:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None
    except ImportError:
        return None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def needs_launch(cfg) -> bool:
    """True in the user's process when the config asks for more than one process, or for DeepSpeed (its engine needs
    a process group, so one process runs under torchrun too); workers never relaunch."""
    d = cfg.distributed
    return (d.nproc > 1 or d.nnodes > 1 or bool(d.deepspeed)) and not is_distributed_worker()


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs
def check_deepspeed(cfg) -> None:
    """Refuse, before any worker starts, only what cannot run: DeepSpeed not importable or no such config.

    DeepSpeed runs on CUDA GPUs (NCCL) and on the CPU (its CPU accelerator, gloo) through the same code path."""
    if not cfg.distributed.deepspeed:
        return
    deepspeed_config_path(cfg.distributed.deepspeed)
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise VideoR1Error(
            f"distributed.deepspeed={cfg.distributed.deepspeed} but DeepSpeed is not importable ({e})",
            hint="pip install 'videor1[deepspeed]' (CPU: pip install --no-build-isolation deepspeed ninja), "
            "or unset it (--set distributed.deepspeed=null) to train with DDP",
        ) from None


def deepspeed_zero_stage(cfg) -> int:
    """ZeRO stage of the configured DeepSpeed config (0 without DeepSpeed)."""
    if not cfg.distributed.deepspeed:
        return 0
    return int((load_deepspeed_config(cfg.distributed.deepspeed).get("zero_optimization") or {}).get("stage", 0))


def deepspeed_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config by name (zero2, zero3, zero3_offload) or an existing JSON path."""
    key = str(name_or_path)
    if key in DEEPSPEED_CONFIGS:
        return LAUNCH_CONFIG_DIR / DEEPSPEED_CONFIGS[key]
    path = Path(key).expanduser()
    if path.is_file():
        return path.resolve()
    raise VideoR1Error(
        f"DeepSpeed config '{key}' is neither a shipped name nor an existing file",
        hint=f"use one of {', '.join(DEEPSPEED_CONFIGS)} or a path to a DeepSpeed JSON config",
    )


def load_deepspeed_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
    path = deepspeed_config_path(name_or_path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VideoR1Error(f"cannot read DeepSpeed config {path}: {e}") from None


def model_hidden_size(model) -> int | None:
    """Hidden size of a (possibly multimodal) HF model: config.hidden_size or config.text_config.hidden_size."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and isinstance(getattr(c, "hidden_size", None), int):
            return c.hidden_size
    return None


def resolve_deepspeed_config(
    config: dict[str, Any] | str | os.PathLike,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
    max_grad_norm: float | None = None,
    mixed_precision: str = "no",
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """Replace the HF-style "auto" values we can know (accelerate fills the rest, but cannot fill hidden-size keys for
    Qwen2.5-VL, nor the batch size without a prepared DataLoader)."""
    ds = copy.deepcopy(config) if isinstance(config, dict) else load_deepspeed_config(config)

    def fill(d: dict, key: str, value) -> None:
        if value is not None and d.get(key) == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", micro_batch_size)
    fill(ds, "gradient_accumulation_steps", gradient_accumulation_steps)
    fill(ds, "gradient_clipping", max_grad_norm)
    if micro_batch_size is not None and gradient_accumulation_steps is not None and world_size is not None:
        fill(ds, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size)
    for key, on in (("bf16", mixed_precision == "bf16"), ("fp16", mixed_precision == "fp16")):
        if isinstance(ds.get(key), dict):
            fill(ds[key], "enabled", on)
    zo = ds.get("zero_optimization")
    if isinstance(zo, dict) and hidden_size:
        fill(zo, "reduce_bucket_size", hidden_size * hidden_size)
        fill(zo, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill(zo, "stage3_param_persistence_threshold", 10 * hidden_size)
    return ds


# ---------------------------------------------------------------------------------------------------------------------
# Ports
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it): each launch on a machine gets its own, so a second
    `--nproc 2` job does not die with EADDRINUSE on a fixed 29500."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def master_port(cfg) -> int:
    """distributed.master_port when set; else a free port on this machine (one node only: every node of a
    multi-node job must be told the same port, which no node can choose for the others)."""
    d = cfg.distributed
    if d.master_port is not None:
        return int(d.master_port)
    if d.nnodes > 1:
        raise VideoR1Error(
            f"a {d.nnodes}-node run needs distributed.master_port set explicitly (the same on every node)",
            hint="add --master-port PORT (e.g. 29500, free on the rank-0 node) to the command on every node")
    return free_port()


# ---------------------------------------------------------------------------------------------------------------------
# The command line
def build_launch_command(cfg, argv: Sequence[str], python: str | None = None, module: str = APP_MODULE) -> list[str]:
    """The launcher command that re-runs `videor1 <argv>` (`python -m <module> <argv>`) on every rank of this node."""
    d = cfg.distributed
    py = python or sys.executable
    port = master_port(cfg)
    if d.launcher == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch"]
        if d.deepspeed:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config_path(d.deepspeed))]
            if d.nnodes > 1:
                cmd += ["--deepspeed_multinode_launcher", "standard"]
        else:
            # Never --cpu: `--cpu --num_processes 2` silently starts one process. On CPU the workers build
            # Accelerator(cpu=True) (make_accelerator), and --multi_gpu gives gloo ranks.
            cmd += ["--multi_gpu"]
        cmd += [
            "--num_processes", str(d.nproc * d.nnodes),
            "--num_machines", str(d.nnodes),
            "--machine_rank", str(d.node_rank),
            "--main_process_ip", d.master_addr,
            "--main_process_port", str(port),
            "--mixed_precision", "no",  # the command's own config decides (bf16 flags), not accelerate's
            "--dynamo_backend", "no",
        ]
    else:
        cmd = [
            py, "-m", "torch.distributed.run",
            "--nproc_per_node", str(d.nproc),
            "--nnodes", str(d.nnodes),
            "--node_rank", str(d.node_rank),
            "--master_addr", d.master_addr,
            "--master_port", str(port),
        ]
    return cmd + ["-m", module, *worker_argv([str(a) for a in argv])]


# The CLI's distributed shortcuts, spelled as --set for the workers: torchrun's parser scans the whole command line,
# so `--nproc` is an ambiguous prefix of its --nproc-per-node and `--master-port` etc. would be taken as its own.
DIST_FLAGS = {"--nproc": "distributed.nproc", "--nnodes": "distributed.nnodes",
              "--node-rank": "distributed.node_rank", "--master-addr": "distributed.master_addr",
              "--master-port": "distributed.master_port"}


def worker_argv(argv: Sequence[str]) -> list[str]:
    """argv with every distributed shortcut flag rewritten as `--set distributed.<key>=<value>`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        key, sep, val = argv[i].partition("=")
        if key in DIST_FLAGS:
            if not sep:
                i += 1
                val = argv[i] if i < len(argv) else ""
            out += ["--set", f"{DIST_FLAGS[key]}={val}"]
        else:
            out.append(argv[i])
        i += 1
    return out


def launch_env(run_id: str | None, run_dir: str | os.PathLike | None, base: dict[str, str] | None = None,
               ) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if run_id:
        env["VIDEOR1_RUN_ID"] = str(run_id)
    if run_dir:
        env["VIDEOR1_RUN_DIR"] = str(Path(run_dir).resolve())
    env["VIDEOR1_LAUNCHED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, set here so it does not warn
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(cfg, argv: Sequence[str], run=None, run_dir: str | os.PathLike | None = None, *,
           python: str | None = None, module: str = APP_MODULE, errors_dir: str | os.PathLike | None = None) -> int:
    """Re-run this command under torchrun / accelerate; stream the workers' output; return the exit code.

    The caller (inside `registered_run`) turns a non-zero code into a failed run (`run_workers` does it, with the
    workers' own errors). SIGINT / SIGTERM are forwarded to the launcher's process group; when the workers have
    stopped, KeyboardInterrupt is raised so the run is marked interrupted. If this process dies (kill -9), torchrun
    gets SIGTERM and stops the workers: no orphans training on.
    """
    if is_distributed_worker():
        raise RuntimeError("launch() called inside a distributed worker; check needs_launch(cfg) first")
    run_id = getattr(run, "id", None)
    if run_dir is None and run is not None:
        try:
            run_dir = (run.info or {}).get("run_dir")
        except Exception:  # noqa: BLE001 - a run without registry row: workers fall back to their own dir
            run_dir = None
    cmd = build_launch_command(cfg, argv, python=python, module=module)
    env = launch_env(run_id, run_dir)
    if errors_dir is not None:
        env[ERROR_DIR_ENV] = str(errors_dir)
    if (cfg.distributed.deepspeed or cfg.distributed.sequence_parallel > 1) and not _model_on_cuda(cfg):
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), also on a machine with GPUs
    if os.environ.get("VIDEOR1_QUIET") != "1":
        print(f"launching {cfg.distributed.nproc * cfg.distributed.nnodes} processes "
              f"({cfg.distributed.launcher}): {' '.join(cmd)}", file=sys.stderr, flush=True)

    try:
        sys.stdout.fileno()  # a real file: the workers inherit stdout/stderr (live progress bars keep working)
        sys.stdout.flush()
        sys.stderr.flush()
        pipe = False
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capsys, CliRunner): pump lines into it
        pipe = True
    # torchrun / accelerate run inside pipelines._launcher, which hides their traceback on a worker's failure (the
    # worker's error is printed once, by run_workers); the command printed above is the one a user can rerun by hand.
    quiet = [cmd[0], "-m", "pipelines._launcher", *cmd[2:]] if cmd[1:2] == ["-m"] else cmd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                    env.get("PYTHONPATH", "")) if p)
    # No preexec_fn: Python code between fork and exec deadlocks when another thread of this process held a lock at
    # the fork (seen: the launch hung in a pytest process with DataLoader and tokenizer threads). The child arms its
    # parent-death signal itself, first thing (pipelines._launcher, PARENT_PID_ENV).
    env[PARENT_PID_ENV] = str(os.getpid())
    proc = subprocess.Popen(
        quiet, env=env, start_new_session=True,
        stdout=subprocess.PIPE if pipe else None, stderr=subprocess.STDOUT if pipe else None,
        text=pipe, bufsize=1 if pipe else -1,
    )
    pump = None
    if pipe:
        def _pump():
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                sys.stdout.flush()
        pump = threading.Thread(target=_pump, daemon=True)
        pump.start()

    interrupted: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        interrupted.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, forward)
    try:
        while True:
            try:
                code = proc.wait(timeout=_GRACE_SECONDS if interrupted else None)
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # workers ignored the signal for the grace period
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pump is not None:
            pump.join(timeout=5)
    if interrupted:
        raise KeyboardInterrupt(f"signal {interrupted[0]} forwarded to the workers")
    return code


PARENT_PID_ENV = "VIDEOR1_LAUNCHER_PARENT"


def die_with_parent(parent_pid: int | None) -> None:
    """Called first thing in the launched process (torchrun's, in pipelines._launcher): SIGTERM it when the launching
    process dies (Linux PR_SET_PDEATHSIG), and exit at once if that process is already gone (it died between the fork
    and this call: the signal would never come)."""
    if not sys.platform.startswith("linux") or not parent_pid:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(128 + signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------------------------
# Worker failures: each failing rank writes its error; the launching process prints it once, as one line
ERROR_DIR_ENV = "VIDEOR1_ERROR_DIR"


class WorkerError(VideoR1Error):
    """One or more ranks failed; the message is theirs (rank, message), the hint theirs plus, when a resume can get
    past the failure and a checkpoint exists, how to resume."""


def report_worker_error(exc: BaseException, hint: str | None) -> bool:
    """In a worker started by `launch`: record `exc` for the launching process (rank, type, message, hint, whether
    a resume can get past it). True when recorded (the worker then prints nothing: the launcher will)."""
    d = os.environ.get(ERROR_DIR_ENV)
    if not d or not is_distributed_worker():
        return False
    from pipelines.config import ConfigError

    known = isinstance(exc, (VideoR1Error, ConfigError))
    import time

    record = {"rank": rank(), "type": type(exc).__name__, "known": known, "time": time.time(),
              "message": str(exc) if known else f"{type(exc).__name__}: {exc}",
              "hint": hint if known else None, "resumable": _resumable(exc)}
    try:
        path = Path(d) / f"rank-{record['rank']}.json"
        path.write_text(json.dumps(record))
    except OSError:
        return False
    return True


# Failures of the machine rather than of the run (they need not recur after a restart): out of memory, a collective
# that timed out or lost its peer, an OS error (disk full, once space is freed).
_TRANSIENT = ("OutOfMemoryError", "DistBackendError", "DistNetworkError", "DistStoreError", "DistError")


def _resumable(exc: BaseException) -> bool:
    if isinstance(exc, VideoR1Error):
        return bool(exc.resumable)
    return isinstance(exc, (OSError, MemoryError)) or type(exc).__name__ in _TRANSIENT


def _secondary(e: dict[str, Any]) -> bool:
    """A rank that failed because another one did (its peer vanished from a collective)."""
    msg = str(e.get("message", ""))
    return not e.get("known") and ("Connection closed by peer" in msg or "remote worker" in msg
                                   or "Connection reset by peer" in msg)


def read_worker_errors(errors_dir: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for f in sorted(Path(errors_dir).glob("rank-*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: int(r.get("rank", 0)))


def worker_failure(code: int, errors: list[dict[str, Any]], *, what: str = "workers",
                   checkpoint: Any = None) -> WorkerError:
    """The error a launch that exited with `code` raises: the ranks' own errors (one line each distinct message), or
    the exit code when no rank reported one (killed by a signal, out of memory). `checkpoint()` -> the checkpoint a
    `--resume auto` would continue from (or None): only then, and only when a resume can get past the failure, the
    hint says to resume."""
    primary = [e for e in errors if not _secondary(e)]
    if primary:  # the ranks that failed first; the others lost a peer in a collective because of them
        errors = sorted(primary, key=lambda e: (e.get("time", 0), int(e.get("rank", 0))))
    if errors:
        groups: dict[tuple[str, str | None], list[int]] = {}
        for e in errors:
            groups.setdefault((e.get("message", "?"), e.get("hint")), []).append(int(e.get("rank", 0)))
        lines = []
        for (msg, _hint), ranks in groups.items():
            who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, sorted(ranks)))
            lines.append(f"{who}: {msg}")
        message = "; ".join(lines)
        hints = [h for (_m, h) in groups if h]
        hint = hints[0] if hints else None
        if not all(e.get("known") for e in errors):
            extra = "run again with --debug for the workers' tracebacks"
            hint = f"{hint}; {extra}" if hint else extra
        resumable = all(e.get("resumable") for e in errors)
        if len(errors) > 1 and all(_secondary(e) for e in errors):
            resumable = True  # only lost peers are known: the first failure left no report (killed)
    else:
        how = (f"killed by signal {code - 128}" if code > 128 else f"exit code {code}")
        message = f"{what} stopped ({how}) without reporting an error (out of memory? killed?)"
        hint = "run again with --debug to see the workers' output in full"
        resumable = True
    ck = checkpoint() if (checkpoint is not None and resumable) else None
    if ck is not None:
        resume = f"resume with --resume auto (latest checkpoint: {ck})"
        hint = f"{hint}; then {resume}" if hint else resume
    err = WorkerError(message, hint=hint)
    err.resumable = resumable
    return err


def run_workers(cfg, argv: Sequence[str], run=None, run_dir: str | os.PathLike | None = None, *,
                what: str = "workers", checkpoint: Any = None, module: str = APP_MODULE) -> None:
    """`launch` the command on every rank; a failure raises `worker_failure` (the ranks' errors as one line)."""
    import shutil
    import tempfile

    errors_dir = Path(tempfile.mkdtemp(prefix="videor1-worker-errors-"))
    try:
        code = launch(cfg, argv, run, run_dir, module=module, errors_dir=errors_dir)
        if code:
            raise worker_failure(code, read_worker_errors(errors_dir), what=what, checkpoint=checkpoint)
    finally:
        shutil.rmtree(errors_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Inside the workers
def resolve_backend(cfg) -> str:
    """distributed.backend, with auto = nccl when the model runs on CUDA, gloo otherwise."""
    backend = cfg.distributed.backend
    if backend == "auto":
        return "nccl" if _model_on_cuda(cfg) else "gloo"
    return backend


def _model_on_cuda(cfg) -> bool:
    import torch

    from pipelines.models import resolve_device

    return torch.cuda.is_available() and resolve_device(cfg.model.device).type == "cuda"


def init_deepspeed_distributed(cfg) -> bool:
    """Init DeepSpeed's communication layer (and torch's default process group under it) in a worker.

    Needed before a ZeRO-3 model is built: `deepspeed.zero.Init` (inside `from_pretrained` once TrainingArguments
    hold a ZeRO-3 config) partitions over the ranks of DeepSpeed's world, which is 1 until this ran. Idempotent."""
    if not (cfg.distributed.deepspeed and is_distributed_worker()):
        return False
    import torch
    import deepspeed
    from deepspeed import comm as ds_comm

    if not ds_comm.is_initialized():
        backend = resolve_backend(cfg)
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=cfg.distributed.timeout_minutes))
    return True


def init_distributed(cfg) -> bool:
    """Init the default process group in a worker (env://); no-op outside workers or when already done."""
    if not is_distributed_worker():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    backend = resolve_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=cfg.distributed.timeout_minutes))
    return True


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def end_worker() -> None:
    """A rank that finished its command, on its way out: meet the other ranks, then destroy the process groups while
    the interpreter is still whole.

    Without it a gloo rank can abort at exit ("terminate called without an active exception", SIGABRT): gloo's worker
    threads still hold finished work whose tensors reference Python objects, and releasing them during interpreter
    finalisation takes a GIL that is gone (pytorch#190489; torch registers no exit hook of its own, pytorch#179291).
    That turned finished 2-rank `train sft` runs, model saved, into failed ones at random: twice in the slow suite
    (DDP, then ZeRO-3 in CI), never in 32 launches made to reproduce it (a race with the exit, rare when quiet).
    Called on success only, as torchtitan does: after a failure another rank may be inside a collective, and a barrier
    or destroy would wait on it; the failed rank exits with its error and torchrun stops the rest.

    The barrier makes every rank's last collective complete everywhere before any rank closes its connections. A
    barrier that fails (a peer already gone) does not turn this rank's success into a failure."""
    d = _dist()
    if d is None:
        return
    try:
        d.barrier()
    except Exception as e:  # noqa: BLE001 - the command itself succeeded; the peer reports its own failure
        log.warning("end of worker: barrier failed (%s); destroying the process group anyway", e)
    d.destroy_process_group()


def make_accelerator(
    cfg,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    *,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = None,
    hidden_size: int | None = None,
    **accelerator_kwargs: Any,
):
    """An `accelerate.Accelerator` for this process: DDP (cpu=True and gloo without CUDA), or DeepSpeed ZeRO-2/3 when
    configured, on GPUs (NCCL) and on the CPU (gloo) alike.

    DeepSpeed needs `cpu=False`: accelerate enables a DeepSpeed plugin only `if not cpu` (with cpu=True it silently
    runs DDP and TRL's `prepare_deepspeed` fails later). Without CUDA, cpu=False alone would leave each process rank 0
    of 1, so the process-group backend is named (gloo). With DeepSpeed, pass `micro_batch_size` when you do not
    `prepare()` a DataLoader, and `hidden_size` (`model_hidden_size(model)`) for ZeRO-3's bucket sizes.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_deepspeed = bool(cfg.distributed.deepspeed)
    on_cuda = _model_on_cuda(cfg)
    if not on_cuda and mixed_precision == "fp16":
        mixed_precision = "no"  # no fp16 autocast on CPU
    handlers = list(accelerator_kwargs.pop("kwargs_handlers", []) or [])
    timeout = datetime.timedelta(minutes=cfg.distributed.timeout_minutes)
    plugin = None
    if use_deepspeed:
        check_deepspeed(cfg)
        from accelerate.utils import DeepSpeedPlugin

        handlers.append(InitProcessGroupKwargs(backend=resolve_backend(cfg), timeout=timeout))
        ds = resolve_deepspeed_config(
            cfg.distributed.deepspeed,
            micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            world_size=world_size(),
            max_grad_norm=max_grad_norm,
            mixed_precision=mixed_precision,
            hidden_size=hidden_size,
        )
        plugin = DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=gradient_accumulation_steps)
    else:
        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    return Accelerator(
        cpu=not on_cuda and not use_deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        **accelerator_kwargs,
    )
