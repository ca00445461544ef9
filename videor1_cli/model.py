"""`videor1 model` commands."""

from __future__ import annotations

import typer

from pipelines.config import Config
from pipelines.models.families import DEFAULT_FAMILY, families_help
from videor1_cli.common import config_command, console, registered_run

app = typer.Typer(no_args_is_help=True)


@app.command("tiny")
@config_command()
def tiny(
    cfg: Config,
    out: str = typer.Option("videor1-runs/tiny-model", "--out", help="Directory to write the model to."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    family: str = typer.Option(DEFAULT_FAMILY, "--family", help=f"Model family: {families_help()}."),
    vllm: bool = typer.Option(False, "--vllm", help="A spec vLLM's CPU attention accepts: head_dim 32 (for "
                              "Qwen2.5-VL 2 heads / 1 kv head; its default head_dim 16 is refused; the other "
                              "families' tiny models already have head_dim >= 32)."),
) -> None:
    """Build a tiny random model of one family (real transformers classes) with an offline-trained tokenizer and
    the family's processor."""
    from pipelines.models.families import ADAPTERS, unsupported

    if family not in ADAPTERS:
        raise unsupported(family, "--family")
    adapter = ADAPTERS[family]
    with registered_run(cfg, "model-tiny") as (run, _):
        path = adapter.build_tiny(out, seed=seed, vllm=vllm)
        run.log_artifact("model", path, meta={"seed": seed, "family": family, "vllm_spec": vllm})
        run.set_summary({"model": str(path), "family": family})
    console.print(f"[green]tiny {adapter.label} model written to[/green] {path}")
