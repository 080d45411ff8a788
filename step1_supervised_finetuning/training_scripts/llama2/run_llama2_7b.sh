#!/bin/bash
# Stage 1 (SFT) of Llama-2-7b on Dahoas/rm-static: the original's hyper-parameters.
#   bash run_llama2_7b.sh [OUTPUT_DIR]
# Paths come from the environment; the hub copies must be local (the run is offline):
#   MODEL_PATH        meta-llama/Llama-2-7b-hf checkpoint (default /models/meta-llama/Llama-2-7b-hf)
#   DATA_PATH         Dahoas/rm-static dataset copy       (default /data/Dahoas/rm-static)
#   DATA_OUTPUT_PATH  tokenised-data cache, node-local    (default /tmp/data_files/llama2)
# OUTPUT_DIR defaults to ./log/step1_sft-<model>-<time>-<seed> under step1_supervised_finetuning.
# The seed is the default 2023 (the original did not pass --seed here).
set -e
set -x
set -o pipefail  # the exit status of deepspeed, not of tee

export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_OFFLINE=1

# Relative paths given by the caller are taken from the caller's directory, before the cd below.
abs_if_exists() { if [ -e "$1" ] && [[ "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }

MODEL_NAME=meta-llama/Llama-2-7b-hf
MODEL_PATH=$(abs_if_exists "${MODEL_PATH:-/models/${MODEL_NAME}}")
DATA_PATH=$(abs_if_exists "${DATA_PATH:-/data/Dahoas/rm-static}")
DATA_OUTPUT_PATH=${DATA_OUTPUT_PATH:-/tmp/data_files/llama2}
SEED=2023
OUTPUT=$1
if [ -n "$OUTPUT" ] && [[ "$OUTPUT" != /* ]]; then
    OUTPUT=$PWD/$OUTPUT
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the stage directory, where main.py is

if [ -z "$OUTPUT" ]; then
    OUTPUT=./log/step1_sft-${MODEL_NAME/\//_}-$(date +%Y-%m-%d-%H-%M-%S)-${SEED}
fi
mkdir -p "$OUTPUT"

deepspeed --master_port "${MASTER_PORT:-12354}" main.py \
    --data_path "$DATA_PATH" \
    --data_split 2,4,4 \
    --data_output_path "$DATA_OUTPUT_PATH" \
    --model_name_or_path "$MODEL_PATH" \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 16 \
    --max_seq_len 512 \
    --learning_rate 1e-5 \
    --weight_decay 0. \
    --num_train_epochs 2 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --num_warmup_steps 0 \
    --zero_stage 2 \
    --offload \
    --gradient_checkpointing \
    --deepspeed \
    --enable_tensorboard \
    --print_loss \
    --output_dir "$OUTPUT" \
    2>&1 | tee "$OUTPUT/training.log"
