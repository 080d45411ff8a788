#!/bin/bash
# Stage 3, PPO (the paper's baseline), of an OPT-1.3b SFT actor with an OPT-350m reward model that
# also initialises the critic: DeepSpeed-Chat's PPO recipe for these models (its
# opt/single_node/run_1.3b.sh), in this engine.
#   bash run_opt_1.3b_ppo.sh [OUTPUT_DIR]
# Paths come from the environment (the run is offline):
#   ACTOR_MODEL_PATH   stage-1 output (HF format)          (default /models/opt_1.3b_sft)
#   REWARD_MODEL_PATH  stage-2 output, reward and critic   (default /models/opt_350m_reward)
#   DATA_PATH          Dahoas/rm-static dataset copy        (default /data/Dahoas/rm-static)
#   DATA_OUTPUT_PATH   tokenised-data cache, node-local     (default /tmp/data_files/opt)
# OUTPUT_DIR defaults to ./log/step3_ppo-facebook_opt_1.3b-<time>-<seed> under step3_rlhf_finetuning.
# The original's data path here (.../datasets/rm-static) named no known dataset and failed;
# the path must contain "Dahoas/rm-static".
# --enable_hybrid_engine needs CUDA inference kernels; elsewhere main.py warns and generates with the
# plain HF modules.
# DeepSpeed-Chat runs the reference at the actor's ZeRO stage and the reward model at the critic's,
# either forced to 0 below stage 3; γ = 1.0, λ = 0.95, clip 0.2 / 0.2, kl_ctl 0.1 are its fixed values
# and our defaults for --algo ppo.
set -e
set -x
set -o pipefail  # the exit status of deepspeed, not of tee

export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_OFFLINE=1

# Relative paths given by the caller are taken from the caller's directory, before the cd below.
abs_if_exists() { if [ -e "$1" ] && [[ "$1" != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }

ACTOR_MODEL_PATH=$(abs_if_exists "${ACTOR_MODEL_PATH:-/models/opt_1.3b_sft}")
REWARD_MODEL_PATH=$(abs_if_exists "${REWARD_MODEL_PATH:-/models/opt_350m_reward}")
DATA_PATH=$(abs_if_exists "${DATA_PATH:-/data/Dahoas/rm-static}")
DATA_OUTPUT_PATH=${DATA_OUTPUT_PATH:-/tmp/data_files/opt}
SEED=1234
OUTPUT=$1
if [ -n "$OUTPUT" ] && [[ "$OUTPUT" != /* ]]; then
    OUTPUT=$PWD/$OUTPUT
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the stage directory, where main.py is

if [ -z "$OUTPUT" ]; then
    OUTPUT=./log/step3_ppo-facebook_opt_1.3b-$(date +%Y-%m-%d-%H-%M-%S)-${SEED}
fi
mkdir -p "$OUTPUT"

deepspeed --master_port "${MASTER_PORT:-12346}" main.py \
    --algo ppo \
    --data_path "$DATA_PATH" \
    --data_split 2,4,4 \
    --data_output_path "$DATA_OUTPUT_PATH" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --reward_model_name_or_path "$REWARD_MODEL_PATH" \
    --critic_model_name_or_path "$REWARD_MODEL_PATH" \
    --num_padding_at_beginning 1 \
    --per_device_generation_batch_size 4 \
    --per_device_training_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --generation_batches 1 \
    --ppo_epochs 1 \
    --max_prompt_seq_len 256 \
    --max_answer_seq_len 256 \
    --actor_learning_rate 9.65e-6 \
    --critic_learning_rate 5e-6 \
    --num_train_epochs 1 \
    --lr_scheduler_type cosine \
    --gradient_accumulation_steps 1 \
    --num_warmup_steps 100 \
    --disable_actor_dropout \
    --actor_zero_stage 2 \
    --critic_zero_stage 2 \
    --reference_zero_stage 0 \
    --reward_zero_stage 0 \
    --enable_hybrid_engine \
    --enable_ema \
    --seed $SEED \
    --deepspeed \
    --enable_tensorboard \
    --output_dir "$OUTPUT" \
    2>&1 | tee "$OUTPUT/training.log"
