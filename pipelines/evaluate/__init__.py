"""Benchmark evaluation (`videor1 eval`): pure metrics, one entry per benchmark, and the runner.

- `metrics`: scoring rules and aggregations (Video-R1's and each benchmark's official convention); pure.
- `benchmarks`: the benchmark table (files, official scorer and summary, headline, paper column).
- `runner`: batched generation with per-sample JSONL, resume, data-parallel shards, merge, results.json,
  rescoring, the paper comparison and readers (`load_results`) for other commands.

See docs/eval.md.
"""

from pipelines.evaluate.benchmarks import BENCHMARKS, get_benchmark, list_benchmarks

__all__ = ["BENCHMARKS", "get_benchmark", "list_benchmarks"]
