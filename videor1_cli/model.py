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
    vllm: bool = typer.Option(False, "--vllm", help="head_dim 32 (2 heads / 1 kv head): the spec vLLM's CPU "
                              "attention accepts (the default's head_dim 16 is refused)."),
) -> None:
    """Build a tiny random Qwen2.5-VL (real transformers classes) with an offline-trained tokenizer and processor."""
    from pipelines.models import TINY_VLLM_SPEC, TinySpec, build_tiny_model

    spec = TINY_VLLM_SPEC if vllm else TinySpec()
    with registered_run(cfg, "model-tiny") as (run, _):
        path = build_tiny_model(out, seed=seed, spec=spec)
        run.log_artifact("model", path, meta={"seed": seed, "spec": spec.__dict__})
        run.set_summary({"model": str(path)})
    console.print(f"[green]tiny model written to[/green] {path}")
