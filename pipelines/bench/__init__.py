"""Benchmarks measured side by side with peers (`videor1 bench ...`); figures go to BENCHMARKS.md."""


def cached_tiny_model(directory, spec=None) -> str:
    """A tiny model for a benchmark's work folder, built once and reused by later invocations (the same seed, so
    repeated invocations measure the same weights)."""
    from pathlib import Path

    from pipelines.models import build_tiny_model

    d = Path(directory)
    if not (d / "config.json").exists():
        build_tiny_model(d, seed=0, spec=spec)
    return str(d)
