"""Environment report for `videor1 doctor` (pure inspection, no side effects)."""

from __future__ import annotations

import importlib
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.threads import stage_plan

PACKAGES = [
    "torch", "torchvision", "transformers", "trl", "accelerate", "peft", "datasets", "huggingface_hub",
    "decord", "av", "qwen-vl-utils", "math-verify", "rouge-score", "vllm", "deepspeed", "flash-attn",
]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _importable(module: str) -> str:
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as e:  # noqa: BLE001 - report why it does not import
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def collect(cfg: Config) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for p in PACKAGES:
        info[p] = _version(p)
    try:
        import torch

        # The build, not only the release: 2.14.1+cu130 and 2.14.1+cpu are different wheels (metadata drops "+...").
        info["torch"] = str(torch.__version__)
        if torch.version.cuda:
            info["torch"] += f" (CUDA {torch.version.cuda})"
        info["cuda"] = (
            f"{torch.cuda.device_count()} device(s): "
            + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available()
            else "no CUDA device (CPU only)"
        )
        info["bf16 supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        info["cpu threads"] = torch.get_num_threads()
    except Exception as e:  # noqa: BLE001
        info["cuda"] = f"torch fails to import: {e}"
    info["decord import"] = _importable("decord")
    info["pyav import"] = _importable("av")
    info["vllm import"] = _importable("vllm") if info["vllm"] != "not installed" else "not installed ([vllm] extra)"
    info["deepspeed import"] = (
        _importable("deepspeed") if info["deepspeed"] != "not installed" else "not installed ([deepspeed] extra)"
    )
    reg = cfg.registry_path()
    info["registry"] = str(reg.resolve())
    probe = reg.parent if reg.parent.exists() else Path.cwd()
    usage = shutil.disk_usage(probe)
    info["free disk"] = f"{usage.free / 2**30:.1f} GiB free at {probe.resolve()}"
    info["model"] = model_status(cfg)
    info.update(stage_plan(cfg))  # how many processes x torch threads each stage will use
    return info


def model_status(cfg: Config) -> str:
    """model.name_or_path, flagged when no command could load it (a default path that was never built, a typo, a Hub
    id that is neither cached nor reachable)."""
    from pipelines.errors import VideoR1Error
    from pipelines.models import check_model_path

    name = cfg.model.name_or_path
    try:
        check_model_path(name, cfg.model.revision)
    except VideoR1Error as e:
        hint = e.hint or ""
        if "videor1 model tiny" not in hint:
            hint = (hint + "; " if hint else "") + f"a local directory? `videor1 model tiny --out {name}` builds one"
        return f"{name}: PROBLEM: {e} ({hint})"
    return name
