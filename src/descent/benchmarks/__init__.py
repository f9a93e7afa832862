"""Benchmarks behind `python scripts/bench.py`: our pipeline against a plain PyTorch loop, in one process, as ratios.

`loop` (the default table and the overhead ratio), `scale` (out-of-core throughput and memory, `--scale`),
`sweep` (launchers' speed-up, `--sweep`), `workflow` (the course's optimizer comparison from process start to exit,
`--workflow`). Never imported by a training run.
"""
