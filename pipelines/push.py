"""Publish a trained model to the Hugging Face Hub with a model card built from the run registry's lineage.

huggingface_hub does the transfer (`create_repo`, `create_branch`, `upload_folder`); this module only finds the
model's history in the registry and writes it down: base model, data and its fetch revision, SFT/RL settings, steps,
reward curves, eval results in both scoring modes, and the commands that reproduce each stage. The token is read by
huggingface_hub from HF_TOKEN or the hub login; it is never passed through here, logged, or written to the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.errors import VideoR1Error
from pipelines.registry import Registry, RegistryError

CITATION = """@article{feng2025videor1,
  title={Video-R1: Reinforcing Video Reasoning in MLLMs},
  author={Feng, Kaituo and Gong, Kaixiong and Li, Bohao and Guo, Zonghao and Wang, Yibing and Peng, Tianshuo and
          Wu, Junfei and Zhang, Xiaoying and Wang, Benyou and Yue, Xiangyu},
  journal={arXiv preprint arXiv:2503.21776},
  year={2025}
}"""

_CONFIG_KEYS = {
    "train-sft": ["sft.learning_rate", "sft.num_train_epochs", "sft.max_steps", "sft.per_device_batch_size",
                  "sft.gradient_accumulation_steps", "sft.lr_scheduler", "model.lora.enabled", "distributed.nproc",
                  "distributed.deepspeed"],
    "train-rl": ["rl.algo", "rl.num_generations", "rl.num_shuffled", "rl.temporal_mu", "rl.temporal_alpha",
                 "rl.beta", "rl.loss_type", "rl.advantage", "rl.learning_rate", "rl.max_steps",
                 "rl.max_completion_length", "rl.rewards", "rl.length_bonus", "rl.backend", "distributed.nproc"],
    "annotate": ["annotate.model", "annotate.temperature", "annotate.top_p", "annotate.max_new_tokens",
                 "annotate.min_reward"],
}
_VIDEO_KEYS = ["video.fps", "video.min_frames", "video.max_frames", "video.min_pixels", "video.max_pixels",
               "video.total_pixels", "image.min_pixels", "image.max_pixels", "prompt.template"]


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def resolve_model(reg: Registry, target: str) -> tuple[Path, dict | None]:
    """A run id (its 'model' artifact) or a directory -> (model dir, producing run or None)."""
    p = Path(target)
    if p.is_dir():
        art = reg.find_artifact(p)
        if art is None:
            return p, None
        return p, reg.get_run(art.run_id)
    try:
        run = reg.get_run(target)
    except RegistryError:
        raise VideoR1Error(f"'{target}' is neither a model directory nor a run id in {reg.path}",
                           hint="`videor1 runs ls --kind train-rl` lists trained models") from None
    models = [a for a in reg.artifacts_of(run["id"])["outputs"] if a.kind == "model"]
    if not models:
        raise VideoR1Error(f"run {run['id']} ({run['kind']}) produced no model artifact")
    return Path(models[-1].path), run


def collect_lineage(reg: Registry, run: dict | None) -> dict[str, Any]:
    """Every ancestor run of the model (by kind), the evals that used it, and the external inputs."""
    if run is None:
        return {"ancestors": [], "evals": [], "externals": []}
    ancestors, seen, todo = [], set(), [run["id"]]
    externals = []
    while todo:
        rid = todo.pop()
        if rid in seen:
            continue
        seen.add(rid)
        r = reg.get_run(rid)
        ancestors.append(r)
        for a in reg.artifacts_of(rid)["inputs"]:
            if a.kind.startswith("external:") or a.run_id == rid:
                externals.append({"kind": a.kind.removeprefix("external:"), "path": a.path, "hash": a.hash,
                                  "meta": a.meta})
        todo.extend(reg.parents(rid))
    evals = [reg.get_run(c) for c in reg.children(run["id"])]
    evals = [e for e in evals if e["kind"] == "eval"]
    return {"ancestors": ancestors, "evals": evals, "externals": externals}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def build_card(reg: Registry, model_dir: Path, run: dict | None, repo_id: str, license: str) -> str:
    lin = collect_lineage(reg, run)
    by_kind: dict[str, list[dict]] = {}
    for r in lin["ancestors"]:
        by_kind.setdefault(r["kind"], []).append(r)
    base = None
    for e in lin["externals"]:
        if e["kind"] == "model":
            base = e["path"]
    cfg0 = (run or {}).get("config") or {}
    from pipelines.models.families import adapter_for, family_label

    family = family_label(model_dir)
    tag = adapter_for(str(model_dir)).label.lower() if family else "qwen2.5-vl"
    lines = [
        "---",
        f"license: {license}",
        "library_name: transformers",
        "pipeline_tag: video-text-to-text",
        f"tags: [video-r1, videor1, t-grpo, {tag}, video-reasoning]",
    ]
    if base and "/" in base and not Path(base).exists():
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines.append(
        "Trained with [videor1](https://pypi.org/project/videor1/), a re-implementation of the Video-R1 recipe "
        "(arXiv 2503.21776): supervised cold start on chain-of-thought data, then T-GRPO reinforcement learning."
    )
    lines += ["", "## Lineage", ""]
    lines.append("| stage | run | status | steps | config hash | git commit |")
    lines.append("|---|---|---|---|---|---|")
    for r in sorted(lin["ancestors"], key=lambda r: r["started_at"] or 0):
        steps = max((s.get("last_step", 0) for s in reg.metrics_summary(r["id"]).values()), default=0)
        lines.append(f"| {r['kind']} | `{r['id']}` | {r['status']} | {steps} | `{r['config_hash']}` | "
                     f"`{(r['git_commit'] or '-')[:10]}` |")
    lines += ["", "## Base model and data", ""]
    lines.append(f"- Base model: `{base or cfg0.get('model', {}).get('name_or_path', 'unknown')}`")
    if family:
        lines.append(f"- Model family: {family}")
    for e in lin["externals"]:
        if e["kind"] != "model":
            rev = e["meta"].get("revision") if isinstance(e["meta"], dict) else None
            lines.append(f"- {e['kind']}: `{Path(e['path']).name}` ({e['hash'][:23] if e['hash'] else ''})"
                         + (f", revision `{rev}`" if rev else ""))
    for r in by_kind.get("data-fetch", []):
        for a in reg.artifacts_of(r["id"])["outputs"]:
            lines.append(f"- fetched `{a.meta.get('repo_id', '?')}` at revision `{a.meta.get('revision', '?')}`")
    lines += ["", "## Frames and prompt", ""]
    for k in _VIDEO_KEYS:
        lines.append(f"- `{k}` = {_fmt(_get(cfg0, k))}")
    for kind, keys in _CONFIG_KEYS.items():
        for r in by_kind.get(kind, []):
            lines += ["", f"## {kind} settings (run `{r['id']}`)", ""]
            for k in keys:
                lines.append(f"- `{k}` = {_fmt(_get(r['config'], k))}")
            summ = reg.metrics_summary(r["id"])
            curves = [m for m in ("reward", "rewards/accuracy", "rewards/format", "kl", "completion_length",
                                  "temporal_bonus_rate", "loss", "eval_loss") if m in summ]
            if curves:
                lines += ["", "| metric | first→last | min | max |", "|---|---|---|---|"]
                for m in curves:
                    series = reg.metrics(r["id"], [m])[m]
                    lines.append(f"| {m} | {series[0][1]:.4g} → {series[-1][1]:.4g} | {summ[m]['min']:.4g} | "
                                 f"{summ[m]['max']:.4g} |")
    lines += ["", "## Evaluation", ""]
    if not lin["evals"]:
        lines.append("No `videor1 eval` run of this model is recorded.")
    for e in lin["evals"]:
        s = e.get("summary") or {}
        lines.append(f"Run `{e['id']}` (frames: {_get(e['config'], 'video.max_frames')}, "
                     f"temperature {_get(e['config'], 'eval.temperature')}):")
        lines += ["", "| benchmark | video-r1 scoring | official scoring | n | errors |", "|---|---|---|---|---|"]
        for bench, res in (s.get("benchmarks") or s).items():
            if not isinstance(res, dict):
                continue
            vr = res.get("video-r1", res.get("video_r1", {}))
            of = res.get("official", {})
            vr_o = vr.get("overall") if isinstance(vr, dict) else vr
            of_o = of.get("overall") if isinstance(of, dict) else of
            lines.append(f"| {bench} | {_fmt(vr_o)} | {_fmt(of_o)} | {res.get('n', '')} | {res.get('errors', '')} |")
        lines.append("")
    lines += ["", "## Reproduce", "", "```bash"]
    for r in sorted(lin["ancestors"], key=lambda r: r["started_at"] or 0):
        if r.get("command"):
            lines.append(r["command"])
    lines += ["```", "", "## License", "", f"{license}", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def file_list(model_dir: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size)
                  for p in model_dir.rglob("*") if p.is_file() and "checkpoint" not in p.parts[0])


def push(model_dir: Path, card: str, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload videor1 model") -> dict[str, Any]:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        (model_dir / "README.md").write_text(card)
        info = api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message, ignore_patterns=["checkpoints/*", "checkpoint-*"])
    except Exception as e:  # noqa: BLE001 - one readable line; the token never appears in hub errors
        raise VideoR1Error(f"push to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                           hint="check `hf auth whoami` / HF_TOKEN and the repo id") from None
    return {"repo_url": str(repo), "commit": getattr(info, "oid", None), "commit_url": str(info)}
