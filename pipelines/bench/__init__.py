"""Benchmarks measured side by side with peers (`videor1 bench ...`); figures go to BENCHMARKS.md."""
