#!/bin/bash
# Stage 1 (SFT) of OPT-1.3b on Dahoas/rm-static: the original's hyper-parameters.
#   bash run_opt_1.3b.sh [OUTPUT_DIR]
# Paths come from the environment; the hub copies must be local (the run is offline):
#   MODEL_PATH        facebook/opt-1.3b checkpoint      (default /models/facebook/opt-1.3b)
#   DATA_PATH         Dahoas/rm-static dataset copy      (default /data/Dahoas/rm-static)
#   DATA_OUTPUT_PATH  tokenised-data cache, node-local   (default /tmp/data_files/opt)
# OUTPUT_DIR defaults to ./log/step1_sft-<model>-<time>-<seed> under step1_supervised_finetuning.
set -e
set -x
set -o pipefail  # the exit status of deepspeed, not of tee

export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_OFFLINE=1

# Relative paths given by the caller are taken from the caller's directory, before the cd below.
abs_if_exists() { if [ -e "$1" ] && [[ "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }

MODEL_NAME=facebook/opt-1.3b
MODEL_PATH=$(abs_if_exists "${MODEL_PATH:-/models/${MODEL_NAME}}")
DATA_PATH=$(abs_if_exists "${DATA_PATH:-/data/Dahoas/rm-static}")
DATA_OUTPUT_PATH=${DATA_OUTPUT_PATH:-/tmp/data_files/opt}
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

deepspeed --master_port "${MASTER_PORT:-12346}" main.py \
    --data_path "$DATA_PATH" \
    --data_split 2,4,4 \
    --data_output_path "$DATA_OUTPUT_PATH" \
    --model_name_or_path "$MODEL_PATH" \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 16 \
    --max_seq_len 512 \
    --learning_rate 1e-5 \
    --weight_decay 0. \
    --num_train_epochs 4 \
    --gradient_accumulation_steps 1 \
    --lr_scheduler_type cosine \
    --num_warmup_steps 0 \
    --seed $SEED \
    --zero_stage 2 \
    --gradient_checkpointing \
    --deepspeed \
    --enable_tensorboard \
    --print_loss \
    --output_dir "$OUTPUT" \
    2>&1 | tee "$OUTPUT/training.log"
