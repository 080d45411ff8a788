"""Benchmarks that print tables (never timed tests): `python -m benchmarks.algorithms` (speed and
memory of ReMax, PPO, RLOO and GRPO) and `python -m benchmarks.quality` (reward against updates
and wall time on the demo's task). See benchmarks/README.md."""
