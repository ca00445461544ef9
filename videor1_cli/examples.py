"""An example under every command's --help (its epilog), kept in one place so that none is forgotten.

Paths are the defaults the commands write to (`videor1 data synth` -> videor1-synth/, `videor1 model tiny` ->
videor1-runs/tiny-model), so the examples run in that order on a laptop. tests/test_cli_texts.py checks that every
command has one.
"""

from __future__ import annotations

from typing import Any

EXAMPLES: dict[str, list[str]] = {
    "eval": ["videor1 eval --bench synthetic --data videor1-synth/test.json --model videor1-runs/tiny-model",
             "videor1 eval --bench vsi,videomme --data Video-R1-eval/ --model Qwen/Qwen2.5-VL-7B-Instruct --frames 32"],
    "push": ["videor1 push RUN_ID --repo-id you/video-r1-7b --dry-run"],
    "doctor": ["videor1 doctor", "videor1 doctor --preset video-r1-7b --json"],
    "quickstart": ["videor1 quickstart --smoke", "videor1 quickstart --seeds 0,1,2"],
    "annotate": ["videor1 annotate --data videor1-synth/rl.json --teacher videor1-runs/tiny-model --backend hf "
                 "--out videor1-runs/cot"],
    "annotate merge": ["videor1 annotate merge videor1-runs/cot   # joins videor1-runs/cot.shard-*-of-*.jsonl"],
    "data fetch": ["videor1 data fetch --include '*.json' --out Video-R1-data"],
    "data unzip": ["videor1 data unzip Video-R1-data"],
    "data validate": ["videor1 data validate videor1-synth/rl.json --decode"],
    "data stats": ["videor1 data stats videor1-synth/rl.json"],
    "data synth": ["videor1 data synth --out videor1-synth --train 400 --test 100"],
    "data probe": ["videor1 data probe videor1-synth/videos/v0000001.mp4 --family qwen2_5_vl"],
    "model tiny": ["videor1 model tiny --out videor1-runs/tiny-model", "videor1 model tiny --family qwen3_vl --out tiny3"],
    "config show": ["videor1 config show --preset video-r1-7b --set rl.beta=0.04"],
    "config validate": ["videor1 config validate my-run.yaml",
                        "videor1 config validate --preset video-r1-7b --set rl.num_generations=8"],
    "config schema": ["videor1 config schema > videor1-config.schema.json"],
    "config keys": ["videor1 config keys rl", "videor1 config keys --preset video-r1-7b"],
    "runs ls": ["videor1 runs ls --kind train-rl --status failed"],
    "runs show": ["videor1 runs show RUN_ID --json"],
    "runs lineage": ["videor1 runs lineage RUN_ID", "videor1 runs lineage RUN_ID --down"],
    "runs compare": ["videor1 runs compare RUN_A RUN_B"],
    "runs plot": ["videor1 runs plot RUN_ID -m reward -m kl --smooth 0.6 --out rl.png"],
    "runs rm": ["videor1 runs rm RUN_ID --files"],
    "runs gc": ["videor1 runs gc --dry-run", "videor1 runs gc --checkpoints"],
    "train sft": ["videor1 train sft --model videor1-runs/tiny-model --data videor1-synth/sft.json --max-steps 100",
                  "videor1 train sft --preset video-r1-7b --data Video-R1-COT-165k.json --nproc 8 --resume auto"],
    "train rl": ["videor1 train rl --model videor1-runs/sft-model --data videor1-synth/rl.json --algo tgrpo "
                 "--max-steps 50",
                 "videor1 train rl --preset video-r1-7b --data Video-R1-260k.json --nproc 8 --resume auto"],
    "rewards score": ["videor1 rewards score completions.jsonl -o scored.jsonl"],
    "bench frames": ["videor1 bench frames --quick", "videor1 bench frames --repeats 5 --out frames.json"],
    "bench eval": ["videor1 bench eval --samples 48 --repeats 3"],
    "bench rl": ["videor1 bench rl --steps 10 --warmup 3 --repeats 2",
                 "videor1 bench rl --encode-once --steps 3 --warmup 1"],
    "bench distributed": ["videor1 bench distributed --modes ddp,zero3 --stages sft"],
    "bench sp": ["videor1 bench sp --rounds 5", "videor1 bench sp --frames 256 --rounds 3 --out sp.json"],
    "bench tgrpo": ["videor1 bench tgrpo --smoke", "videor1 bench tgrpo --seeds 0,1,2,3,4 --out study",
                    "videor1 bench tgrpo --seeds 0,1,2,3,4 --out study --resume   # after an interruption",
                    "videor1 bench tgrpo --merge study-a --merge study-b --out study"],
}


def epilog(path: str) -> str | None:
    """The --help epilog of command `path` ("train sft"): its examples, one per line (rich markup escaped)."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    from rich.markup import escape

    # Typer's rich help joins single newlines into one line and keeps blank-line breaks as line breaks.
    return "\n\n".join(["[b]Example[/b]" + ("s" if len(lines) > 1 else "") + ":"] + [f"  {escape(x)}" for x in lines])


def attach(app: Any) -> None:
    """Set the epilog of every command of the Typer `app` (and of groups that run on their own, e.g. annotate)."""

    from typer.models import DefaultPlaceholder

    def unset(value: Any) -> bool:
        return value is None or isinstance(value, DefaultPlaceholder)

    def walk(typer_app: Any, prefix: str) -> None:
        for info in typer_app.registered_commands:
            name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
            path = f"{prefix}{name}".strip()
            if unset(info.epilog):
                info.epilog = epilog(path)
        for group in typer_app.registered_groups:
            sub = group.typer_instance
            path = f"{prefix}{group.name}".strip()
            if sub.registered_callback is not None and unset(group.epilog):  # a group that runs on its own
                group.epilog = epilog(path)
            walk(sub, path + " ")

    walk(app, "")
