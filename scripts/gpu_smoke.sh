#!/usr/bin/env bash
# GPU smoke run: every stage on tiny OPT and Llama models, a few steps each, one table (docs/gpu.md).
#   bash scripts/gpu_smoke.sh [--dry-run] [--workdir DIR] [--only CASE[,CASE...]] [--budget-s 290] [--strict]
# PYTHON picks the interpreter (default: python, else python3, on PATH); it needs torch with CUDA,
# transformers, accelerate, deepspeed, datasets and their dependencies (the table says which are missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
exec "$PYTHON" scripts/gpu_smoke.py "$@"
