#!/usr/bin/env bash
# GPU smoke run: what the recipes do, on tiny OPT and Llama models, a few steps each, one table (docs/gpu.md).
#   bash scripts/gpu_smoke.sh [--dry-run | --build-only] [--workdir DIR] [--only CASE[,CASE...]] [--budget-s 290]
#                             [--build-timeout-s 900] [--strict]
# First builds the DeepSpeed ops the cases need (timed, each line "[build] <op>: ..."; not charged to
# --budget-s), then runs the cases on one GPU (the -2gpu case on two, skipped on a one-GPU node).
# PYTHON picks the interpreter (default: python, else python3, on PATH); it needs torch with CUDA,
# transformers, accelerate, deepspeed, datasets and their dependencies (the table says which are missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
exec "$PYTHON" scripts/gpu_smoke.py "$@"
