"""`videor1 model` commands."""

from __future__ import annotations

import typer

from pipelines.config import Config
from videor1_cli.common import config_command, console, registered_run

app = typer.Typer(no_args_is_help=True)


@app.command("tiny")
@config_command()
def tiny(
    cfg: Config,
    out: str = typer.Option("videor1-runs/tiny-model", "--out", help="Directory to write the model to."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    family: str = typer.Option(
        "qwen2_5_vl", "--family",
        help="Model family: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe.",
    ),
    vllm: bool = typer.Option(False, "--vllm", help="Qwen2.5-VL only: head_dim 32 (2 heads / 1 kv head), the spec "
                              "vLLM's CPU attention accepts (the default's head_dim 16 is refused; the other "
                              "families' tiny models already have head_dim >= 32)."),
) -> None:
    """Build a tiny random model of one family (real transformers classes) with an offline-trained tokenizer and
    the family's processor."""
    from pipelines.models.families import ADAPTERS, unsupported

    if family not in ADAPTERS:
        raise unsupported(family, "--family")
    adapter = ADAPTERS[family]
    with registered_run(cfg, "model-tiny") as (run, _):
        if vllm and family == "qwen2_5_vl":
            from pipelines.models import TINY_VLLM_SPEC, build_tiny_model

            path = build_tiny_model(out, seed=seed, spec=TINY_VLLM_SPEC)
        else:
            path = adapter.build_tiny(out, seed=seed)
        run.log_artifact("model", path, meta={"seed": seed, "family": family, "vllm_spec": vllm})
        run.set_summary({"model": str(path), "family": family})
    console.print(f"[green]tiny {adapter.label} model written to[/green] {path}")
