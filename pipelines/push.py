"""Publish a trained model to the Hugging Face Hub with a model card built from the run registry's lineage.

huggingface_hub does the transfer (`create_repo`, `create_branch`, `upload_folder`); this module only finds the
model's history in the registry and writes it down: base model, data and its fetch revision, SFT/RL settings, steps,
reward curves, eval results in both scoring modes, and the commands that reproduce each stage. The token is read by
huggingface_hub from HF_TOKEN or the hub login; it is never passed through here, logged, or written to the card.
"""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------------------------------------------------
# No local paths on the card: what the world sees names files and models, not this machine's directories.
_STAGE_COMMAND = {"train-sft": "videor1 train sft", "train-rl": "videor1 train rl", "eval": "videor1 eval",
                  "annotate": "videor1 annotate", "model-tiny": "videor1 model tiny"}
# Sections a stage does not read: their keys never go on its reproduce command.
_NOT_READ = {"train-sft": {"rl", "eval", "annotate", "push", "quickstart"},
             "train-rl": {"sft", "eval", "annotate", "push", "quickstart"},
             "eval": {"sft", "rl", "annotate", "push", "quickstart"},
             "annotate": {"sft", "rl", "eval", "push", "quickstart"}}
# Keys that name this machine's places or the run's bookkeeping, not the recipe.
_NOT_RECIPE = {"run.registry", "run.name", "run.tags", "run.output_dir", "run.report_to", "run.progress_every",
               "video.cache_dir", "model.name_or_path", "data.file", "data.root", "sft.output_dir", "rl.output_dir",
               "eval.output_dir", "annotate.output", "distributed.master_addr", "distributed.master_port",
               "distributed.node_rank"}
_OUTPUT_KEY = {"train-sft": "sft.output_dir", "train-rl": "rl.output_dir", "eval": "eval.output_dir"}


def is_local_path(v: Any) -> bool:
    return isinstance(v, str) and (v.startswith(("/", "~", "./", "../")) or (len(v) > 2 and v[1:3] in (":\\", ":/")))


def public_name(v: Any, names: dict[str, str] | None = None) -> Any:
    """A local path -> the name it is published under (`names`, by resolved path) or its last component; anything
    else (a hub id, a number) unchanged. Recurses into lists and dicts."""
    if isinstance(v, dict):
        return {k: public_name(x, names) for k, x in v.items()}
    if isinstance(v, list):
        return [public_name(x, names) for x in v]
    if not is_local_path(v) and not (isinstance(v, str) and Path(v).exists() and ("/" in v or "\\" in v)):
        return v
    p = Path(v).expanduser()
    key = str(p.resolve()) if p.exists() or p.is_absolute() else str(p)
    return (names or {}).get(key) or p.name or str(v)


def _set_value(v: Any) -> str:
    """A value as `--set key=VALUE` reads it back (YAML): strings bare unless YAML would change them."""
    if isinstance(v, str):
        import yaml

        try:
            same = yaml.safe_load(v) == v
        except yaml.YAMLError:
            same = False
        return v if same and v and " " not in v else json.dumps(v)
    return json.dumps(v)


def recipe_overrides(kind: str, config: dict[str, Any], names: dict[str, str]) -> tuple[str, list[str]]:
    """(preset, ["key=value", ...]): the recorded config as the preset it is closest to plus the keys that differ,
    leaving out this machine's paths and the sections the stage does not read."""
    from pipelines.config import list_presets, load_config
    from pipelines.runs import flatten as flatten_keys

    skip = _NOT_READ.get(kind, set())
    flat = {k: v for k, v in flatten_keys(config).items() if k.split(".")[0] not in skip and k not in _NOT_RECIPE}
    best: tuple[int, str, list[str]] | None = None
    for preset in list_presets():
        ref = flatten_keys(load_config(preset=preset).model_dump(mode="json"))
        diff = [f"{k}={_set_value(public_name(v, names))}" for k, v in sorted(flat.items()) if ref.get(k) != v]
        if best is None or len(diff) < best[0]:
            best = (len(diff), preset, diff)
    assert best is not None
    return best[1], best[2]


def _model_input(reg: Registry, run_id: str):
    ins = [a for a in reg.artifacts_of(run_id)["inputs"] if a.kind in ("model", "external:model")]
    return ins[0] if ins else None


def model_type(path: str | os.PathLike) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def find_base_model(reg: Registry, run: dict | None, model_dir: Path) -> dict[str, Any]:
    """The first model of the lineage that no training run produced: a Hub id, a model built by `videor1 model
    tiny`, or a local directory from elsewhere. {name, source: hub|tiny|local, hash, model_type}."""
    seen: set[str] = set()
    current = run
    while current is not None and current["id"] not in seen:
        seen.add(current["id"])
        art = _model_input(reg, current["id"])
        if art is None:  # no local model recorded: the stage read a Hub id
            name = ((current.get("config") or {}).get("model") or {}).get("name_or_path")
            if current["kind"] not in ("train-sft", "train-rl") and current["kind"] != "model-tiny":
                break
            return {"name": public_name(name), "source": "local" if is_local_path(name) else "hub", "hash": None,
                    "model_type": None}
        if art.kind.startswith("external:"):
            return {"name": Path(art.path).name, "source": "local", "hash": art.hash,
                    "model_type": model_type(art.path)}
        producer = reg.get_run(art.run_id)
        if producer["kind"] not in ("train-sft", "train-rl"):
            spec = art.meta.get("seed") if isinstance(art.meta, dict) else None
            return {"name": Path(art.path).name, "source": "tiny" if producer["kind"] == "model-tiny" else "local",
                    "hash": art.hash, "model_type": model_type(art.path), "run": producer["id"], "seed": spec}
        current = producer
    return {"name": model_dir.name, "source": "local", "hash": None, "model_type": model_type(model_dir)}


def _record_count(path: str, meta: dict[str, Any]) -> int | None:
    for k in ("records", "kept"):
        if isinstance(meta.get(k), int):
            return meta[k]
    p = Path(path)
    try:
        if p.suffix == ".jsonl":
            with open(p, "rb") as f:
                return sum(1 for line in f if line.strip())
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            return len(data) if isinstance(data, list) else None
    except (OSError, ValueError):
        return None
    return None


def data_files(reg: Registry, lin: dict[str, Any]) -> list[dict[str, Any]]:
    """Every records/data file a stage of the lineage (or an eval of the model) read: name, role, count, hash."""
    out: dict[tuple[str, str | None], dict[str, Any]] = {}
    for r in [*lin["ancestors"], *lin["evals"]]:
        for a in reg.artifacts_of(r["id"])["inputs"]:
            kind = a.kind.removeprefix("external:")
            if kind in ("model", "checkpoint") or a.kind == "checkpoint":
                continue
            if Path(a.path).is_dir():
                continue
            key = (Path(a.path).name, a.hash)
            row = out.setdefault(key, {"name": Path(a.path).name, "hash": a.hash, "stages": [],
                                       "records": _record_count(a.path, a.meta or {}),
                                       "revision": (a.meta or {}).get("revision")})
            if r["kind"] not in row["stages"]:
                row["stages"].append(r["kind"])
    return list(out.values())


def eval_rows(e: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(headline scoring, one row per benchmark: video-r1 and official overall, n, errors) of an eval run, from its
    results.json when it is still there, else from its summary (numbers: the headline mode; dicts: both modes)."""
    s = e.get("summary") or {}
    headline = s.get("scoring") or _get(e.get("config") or {}, "eval.scoring") or "video-r1"
    res_file = s.get("results")
    if isinstance(res_file, str) and Path(res_file).is_file():
        try:
            results = json.loads(Path(res_file).read_text())
            rows = []
            for bench, b in (results.get("benchmarks") or {}).items():
                rows.append({"bench": bench, "video-r1": (b.get("video-r1") or {}).get("overall"),
                             "official": (b.get("official") or {}).get("overall"), "n": b.get("n"),
                             "errors": b.get("errors"), "chance": b.get("chance_overall")})
            return results.get("scoring") or headline, rows
        except (OSError, ValueError):
            pass
    rows = []
    for bench, res in (s.get("benchmarks") or s).items():
        if bench in ("results", "scoring", "frames", "errors", "seconds"):
            continue
        if isinstance(res, (int, float)) and not isinstance(res, bool):
            rows.append({"bench": bench, headline: float(res), "n": None, "errors": s.get("errors")})
        elif isinstance(res, dict):
            vr, of = res.get("video-r1", res.get("video_r1")), res.get("official")
            rows.append({"bench": bench, "video-r1": vr.get("overall") if isinstance(vr, dict) else vr,
                         "official": of.get("overall") if isinstance(of, dict) else of,
                         "n": res.get("n"), "errors": res.get("errors")})
    return headline, rows


def _family_label(model_type: str | None) -> str | None:
    """"Qwen2.5-VL" for qwen2_5_vl: the adapter's name for a family the project knows, else None."""
    from pipelines.models.families import ADAPTERS

    return ADAPTERS[model_type].label if model_type in ADAPTERS else None


def build_card(reg: Registry, model_dir: Path, run: dict | None, repo_id: str, license: str) -> str:
    lin = collect_lineage(reg, run)
    chain = sorted(lin["ancestors"], key=lambda r: r["started_at"] or 0)
    by_kind: dict[str, list[dict]] = {}
    for r in chain:
        by_kind.setdefault(r["kind"], []).append(r)
    base = find_base_model(reg, run, model_dir)
    family = model_type(model_dir) or base.get("model_type")
    cfg0 = (run or {}).get("config") or {}

    # Names the card uses for this machine's directories: each stage's model output, the base model, data by name.
    names: dict[str, str] = {}
    for r in chain:
        for a in reg.artifacts_of(r["id"])["outputs"]:
            if a.kind == "model":
                names[str(Path(a.path))] = {"train-sft": "sft-model", "train-rl": "rl-model"}.get(r["kind"],
                                                                                                  Path(a.path).name)
    names[str(model_dir.resolve())] = names.get(str(model_dir.resolve()), model_dir.name)

    label = _family_label(family)
    lines = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: video-text-to-text",
             f"tags: [video-r1, videor1, t-grpo, {(label or 'qwen2.5-vl').lower()}, video-reasoning]"]
    if base["source"] == "hub" and base["name"]:
        lines.append(f"base_model: {base['name']}")
    stages = stage_names(by_kind)
    params = parameter_count(model_dir)
    lines += ["---", "", f"# {repo_id.split('/')[-1]}: {label or 'a vision-language model'} trained for video "
              f"reasoning ({stages or 'Video-R1 recipe'})", ""]
    lines.append(
        "Trained with [videor1](https://pypi.org/project/videor1/), a re-implementation of the Video-R1 recipe "
        "(arXiv 2503.21776): supervised cold start on chain-of-thought data, then T-GRPO reinforcement learning."
    )
    lines += ["", what_it_is(base, label, params, stages)]
    lines += ["", f"- Model family: {label or 'unknown'} (`{family or '?'}`, the `model_type` of config.json)"]
    if base["source"] == "hub":
        lines.append(f"- Base model: [`{base['name']}`](https://huggingface.co/{base['name']})")
    elif base["source"] == "tiny":
        lines.append(f"- Base model: `{base['name']}`, the tiny random {label or 'Qwen2.5-VL'} built by "
                     "`videor1 model tiny`"
                     + (f" (seed {base['seed']})" if base.get("seed") is not None else "")
                     + (f", `{base['hash'][:23]}`" if base.get("hash") else ""))
    else:
        lines.append(f"- Base model: `{base['name']}` (a local model directory, not on the Hub"
                     + (f"; `{base['hash'][:23]}`" if base.get("hash") else "") + ")")

    lines += usage_section(repo_id, cfg0)
    lines += ["", "## Lineage", ""]
    lines.append("| stage | run | status | steps | config hash | git commit |")
    lines.append("|---|---|---|---|---|---|")
    for r in chain:
        steps = max((s.get("last_step", 0) for s in reg.metrics_summary(r["id"]).values()), default=0)
        resumed = " (resumed)" if any(a.kind == "checkpoint" for a in reg.artifacts_of(r["id"])["inputs"]) else ""
        lines.append(f"| {r['kind']}{resumed} | `{r['id']}` | {r['status']} | {steps} | `{r['config_hash']}` | "
                     f"`{(r['git_commit'] or '-')[:10]}` |")

    lines += ["", "## Data", ""]
    files = data_files(reg, lin)
    if files:
        lines += ["| file | used by | records | hash |", "|---|---|---|---|"]
        for f in files:
            rev = f", revision `{f['revision']}`" if f.get("revision") else ""
            lines.append(f"| `{f['name']}`{rev} | {', '.join(f['stages'])} | "
                         f"{'-' if f['records'] is None else f['records']} | `{(f['hash'] or '-')[:23]}` |")
    else:
        lines.append("No data file is recorded in this model's lineage.")
    for r in by_kind.get("data-fetch", []):
        for a in reg.artifacts_of(r["id"])["outputs"]:
            lines.append(f"- fetched `{a.meta.get('repo_id', '?')}` at revision `{a.meta.get('revision', '?')}`")

    lines += ["", "## Frames and prompt", ""]
    for k in _VIDEO_KEYS:
        lines.append(f"- `{k}` = {_fmt(public_name(_get(cfg0, k), names))}")
    for kind, keys in _CONFIG_KEYS.items():
        for r in by_kind.get(kind, []):
            lines += ["", f"## {kind} settings (run `{r['id']}`)", ""]
            for k in keys:
                lines.append(f"- `{k}` = {_fmt(public_name(_get(r['config'], k), names))}")
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
        headline, rows = eval_rows(e)
        lines.append(f"Run `{e['id']}` (frames: {_get(e['config'], 'video.max_frames')}, "
                     f"temperature {_get(e['config'], 'eval.temperature')}; headline scoring: `{headline}`, "
                     "docs/eval.md):")
        lines += ["", "| benchmark | video-r1 scoring | official scoring | chance | n | errors |",
                  "|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['bench']} | {_fmt('-' if row.get('video-r1') is None else row['video-r1'])} | "
                         f"{_fmt('-' if row.get('official') is None else row['official'])} | "
                         f"{_fmt('-' if row.get('chance') is None else row['chance'])} | "
                         f"{'-' if row.get('n') is None else row['n']} | "
                         f"{'-' if row.get('errors') is None else row['errors']} |")
        lines += ["", "Scores and chance are percentages. Chance is what guessing scores on the same items: a uniform "
                  "guess among a multiple-choice item's options (0 on numeric and free-text items); for the "
                  "synthetic world, its own per-question-kind chance levels (world.json).", ""]

    lines += ["", "## Reproduce", "",
              "Each stage's recorded config, as the preset it is closest to plus the keys that differ. Names stand "
              "for this run's files: put the data files above (same hashes) in the working directory and the media "
              "under the `--root` directory.", "", "```bash"]
    if base["source"] == "tiny":
        seed = f" --seed {base['seed']}" if base.get("seed") is not None else ""
        lines.append(f"videor1 model tiny --out {base['name']}{seed}")
    for r in [*chain, *sorted(lin["evals"], key=lambda r: r["started_at"] or 0)]:
        cmd = reproduce_command(reg, r, names)
        if cmd:
            lines.append(cmd)
    lines += ["```", "", "## License", "", f"{license}", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def stage_names(by_kind: dict[str, list[dict]]) -> str:
    """"SFT + T-GRPO" from the training stages of the lineage (the RL algorithm as recorded)."""
    out = []
    if by_kind.get("train-sft"):
        out.append("SFT")
    for r in by_kind.get("train-rl", [])[-1:]:
        algo = str(_get(r.get("config") or {}, "rl.algo") or "tgrpo")
        out.append({"tgrpo": "T-GRPO", "grpo": "GRPO"}.get(algo, algo))
    return " + ".join(out)


def parameter_count(model_dir: Path) -> int | None:
    """Parameters in the model's safetensors files (read from their headers, no tensor loaded)."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    n = 1
                    for d in fh.get_slice(k).get_shape():
                        n *= int(d)
                    total += n
    except Exception:  # noqa: BLE001 - safetensors' own error for a broken header: the count is a courtesy
        return None
    return total


def _human(n: int | None) -> str:
    if n is None:
        return "an unknown number of"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def what_it_is(base: dict[str, Any], label: str | None, params: int | None, stages: str) -> str:
    """One plain paragraph: what the base model is and what was done to it (a toy says it is a toy)."""
    fam = label or "vision-language model"
    done = f", then trained here ({stages})" if stages else ""
    if base["source"] == "tiny":
        return (f"**What this is: a toy.** The base model is a ~{_human(params)}-parameter {fam} with random "
                f"weights, built by `videor1 model tiny` to exercise the pipeline end to end{done}. It is not a "
                "useful video model: its scores below show that the pipeline ran, not what the recipe achieves.")
    if base["source"] == "hub":
        return (f"**What this is:** [`{base['name']}`](https://huggingface.co/{base['name']}) ({_human(params)} "
                f"parameters){done}.")
    return (f"**What this is:** the local model `{base['name']}` ({_human(params)} parameters, not on the Hub)"
            f"{done}.")


def usage_section(repo_id: str, cfg: dict[str, Any]) -> list[str]:
    """How to use it: transformers directly (frames decoded with PyAV: transformers' own video loading needs
    torchcodec), and `videor1 eval`, which samples frames and renders the prompt as in training."""
    frames = _get(cfg, "video.max_frames") or 16
    return ["", "## How to use", "", "```python",
            "import av, numpy as np",
            "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
            f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", dtype="auto", device_map="auto")',
            f'processor = AutoProcessor.from_pretrained("{repo_id}")',
            'with av.open("clip.mp4") as container:  # (T, H, W, 3) uint8 frames',
            '    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])',
            f"video = frames[np.linspace(0, len(frames) - 1, min(len(frames), {frames})).astype(int)]",
            'messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text":',
            '    "What happens first in the video? Think in <think></think>, then answer in <answer></answer>."}]}]',
            "text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = processor(text=[text], videos=[video], return_tensors="pt").to(model.device)',
            "out = model.generate(**inputs, max_new_tokens=1024)",
            'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
            "```", "",
            "With the frame sampling and prompt it was trained with (see `Frames and prompt` below), on a benchmark "
            "or on the synthetic world:", "", "```bash",
            f"videor1 eval --model {repo_id} --bench synthetic --data videor1-synth/test.json", "```"]


def reproduce_command(reg: Registry, r: dict[str, Any], names: dict[str, str]) -> str | None:
    """The `videor1 ...` line that reruns stage `r` from its recorded config, with no local path in it."""
    kind = r["kind"]
    if kind not in _STAGE_COMMAND or kind == "model-tiny":
        return None
    cfg = r.get("config") or {}
    preset, sets = recipe_overrides(kind, cfg, names)
    parts = [_STAGE_COMMAND[kind], "--preset", preset]
    model = public_name(_get(cfg, "model.name_or_path"), names)
    if kind == "annotate":
        model = None
    if model:
        parts += ["--model", str(model)]
    if _get(cfg, "data.file"):
        parts += ["--data", str(public_name(_get(cfg, "data.file"), names))]
    if _get(cfg, "data.root"):
        parts += ["--root", str(public_name(_get(cfg, "data.root"), names))]
    outs = [a for a in reg.artifacts_of(r["id"])["outputs"] if a.kind == "model"]
    if kind == "train-sft":
        parts += ["--out", names.get(str(Path(outs[-1].path)), "sft-model") if outs else "sft-model"]
    elif kind == "train-rl":
        parts += ["--set", f"rl.output_dir={names.get(str(Path(outs[-1].path)), 'rl-model') if outs else 'rl-model'}"]
    resumed = [a for a in reg.artifacts_of(r["id"])["inputs"] if a.kind == "checkpoint"]
    if resumed:
        parts += ["--resume", "auto"]
    for s in sets:
        parts += ["--set", s]
    return " \\\n    ".join(_wrap_args(parts))


def _wrap_args(parts: list[str]) -> list[str]:
    """Group a command's words into lines of one flag each (a shell continuation between them)."""
    import shlex

    lines: list[str] = []
    cur: list[str] = []
    for p in parts:
        if p.startswith("--") and cur and not (len(cur) == 1 and cur[0].startswith("videor1")):
            lines.append(" ".join(cur))
            cur = []
        cur.append(p if p.startswith("--") or p.startswith("videor1") else shlex.quote(p))
    if cur:
        lines.append(" ".join(cur))
    return lines


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
