#!/bin/bash
# Stage 3 (ReMax) of a Llama-2-7b SFT actor with a Llama-2-7b reward model: the original's recipe:
# actor, reward and reference offloaded, bf16.
#   bash run_llama2_7b.sh [OUTPUT_DIR]
# Paths come from the environment (the run is offline):
#   ACTOR_MODEL_PATH   stage-1 output (HF format)          (default /models/llama2_7b_sft)
#   REWARD_MODEL_PATH  stage-2 output                      (default /models/llama2_7b_reward)
#   DATA_PATH          Dahoas/rm-static dataset copy        (default /data/Dahoas/rm-static)
#   DATA_OUTPUT_PATH   tokenised-data cache, node-local     (default /tmp/data_files/llama2)
# OUTPUT_DIR defaults to ./log/step3_remax-meta_llama_Llama_2_7b_hf-<time>-<seed> under
# step3_rlhf_finetuning.
# --enable_hybrid_engine needs CUDA inference kernels; elsewhere main.py warns and generates with the
# plain HF modules.
set -e
set -x
set -o pipefail  # the exit status of deepspeed, not of tee

export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_OFFLINE=1

# Relative paths given by the caller are taken from the caller's directory, before the cd below.
abs_if_exists() { if [ -e "$1" ] && [[ "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }

ACTOR_MODEL_PATH=$(abs_if_exists "${ACTOR_MODEL_PATH:-/models/llama2_7b_sft}")
REWARD_MODEL_PATH=$(abs_if_exists "${REWARD_MODEL_PATH:-/models/llama2_7b_reward}")
DATA_PATH=$(abs_if_exists "${DATA_PATH:-/data/Dahoas/rm-static}")
DATA_OUTPUT_PATH=${DATA_OUTPUT_PATH:-/tmp/data_files/llama2}
SEED=2023
OUTPUT=$1
if [ -n "$OUTPUT" ] && [[ "$OUTPUT" != /* ]]; then
    OUTPUT=$PWD/$OUTPUT
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the stage directory, where main.py is

if [ -z "$OUTPUT" ]; then
    OUTPUT=./log/step3_remax-meta_llama_Llama_2_7b_hf-$(date +%Y-%m-%d-%H-%M-%S)-${SEED}
fi
mkdir -p "$OUTPUT"

deepspeed --master_port "${MASTER_PORT:-12346}" main.py \
    --data_path "$DATA_PATH" \
    --data_split 2,4,4 \
    --data_output_path "$DATA_OUTPUT_PATH" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --reward_model_name_or_path "$REWARD_MODEL_PATH" \
    --num_padding_at_beginning 0 \
    --per_device_generation_batch_size 1 \
    --per_device_training_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --generation_batches 1 \
    --ppo_epochs 1 \
    --max_prompt_seq_len 256 \
    --max_answer_seq_len 256 \
    --actor_learning_rate 1e-6 \
    --actor_weight_decay 0.1 \
    --num_train_epochs 1 \
    --lr_scheduler_type cosine \
    --gradient_accumulation_steps 1 \
    --num_warmup_steps 0 \
    --kl_ctl 0.05 \
    --gamma 0.99 \
    --actor_gradient_checkpointing \
    --disable_actor_dropout \
    --disable_reward_dropout \
    --offload \
    --offload_reference_model \
    --offload_reward_model \
    --actor_bf16 \
    --reward_bf16 \
    --actor_zero_stage 2 \
    --reward_zero_stage 3 \
    --reference_zero_stage 3 \
    --enable_hybrid_engine \
    --seed $SEED \
    --deepspeed \
    --enable_tensorboard \
    --print_answers \
    --save_answers \
    --save_at_final \
    --output_dir "$OUTPUT" \
    2>&1 | tee "$OUTPUT/training.log"
