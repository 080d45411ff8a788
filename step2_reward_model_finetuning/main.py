"""Stage 2: reward model, a scalar head on a decoder trained on chosen/rejected pairs with
-log sigmoid(r_chosen - r_rejected).

    deepspeed main.py --model_name_or_path /models/opt-350m --data_path /data/Dahoas/rm-static \
        --num_padding_at_beginning 1 --output_dir ./output --zero_stage 2
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import arguments  # noqa: E402
from utils.checkpoint import add_checkpoint_args, export_atomic  # noqa: E402
from utils.data.data_utils import DataCollatorReward, create_prompt_dataset  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.model.model_utils import (count_parameters, create_critic_model,  # noqa: E402
                                     load_hf_tokenizer, save_reward_model)
from utils.module.lora import apply_lora  # noqa: E402
from utils.perf import throughput_line, training_passes  # noqa: E402
from utils.training import (MetricsLog, evaluate_reward, init_stage_engine,  # noqa: E402
                            load_supervised_checkpoint, start_stage, supervised_loaders,
                            train_supervised)
from utils.utils import print_rank_0  # noqa: E402


def parse_args(argv=None):
    parser = arguments.new_parser("Stage 2: reward model fine-tuning")
    arguments.add_data_args(parser)
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="A local Hugging Face model directory (config, weights, tokenizer).")
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="Pad-id tokens at the start of every sequence: 1 for OPT (its BOS is "
                             "</s>), 0 for Llama.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    arguments.add_optimization_args(parser, learning_rate=5e-5)
    arguments.add_runtime_args(parser, seed=2023)
    arguments.add_zero_args(parser)
    arguments.add_lora_args(parser)
    arguments.add_logging_args(parser, tensorboard_path="step2_tensorboard")
    parser.add_argument("--evals_per_epoch", type=int, default=10,
                        help="Reward evaluations (and saves) per epoch; the original's 10.")
    parser.add_argument("--eval_max_batches", type=int, default=100,
                        help="Eval batches per rank and evaluation (the original's 100).")
    add_checkpoint_args(parser)
    return arguments.finish(parser, argv, phase=2)


def build_model(args, tokenizer, ds_config):
    model = create_critic_model(args.model_name_or_path, tokenizer, ds_config,
                                args.num_padding_at_beginning,
                                disable_dropout=args.disable_dropout)
    return apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)


def main():
    args = parse_args()
    # the directories the flags name, on every rank, before anything is built or written
    device, world_size, ds_config, resume = start_stage(
        args, lambda: arguments.check_inputs(args, models=["model_name_or_path"]))

    tokenizer = load_hf_tokenizer(args.model_name_or_path)
    # data first: a bad row or an empty split stops the run before the model is loaded
    train_data, eval_data = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 2,
        args.data_seed, tokenizer, args.max_seq_len, end_of_conversation_token=tokenizer.eos_token,
        strict_data=args.strict_data)
    model = build_model(args, tokenizer, ds_config)
    train_loader, eval_loader = supervised_loaders(args, train_data, eval_data, DataCollatorReward(),
                                                   world_size)

    model = init_stage_engine(model, args, ds_config, train_loader)
    state = load_supervised_checkpoint(resume, model, args, train_loader, world_size)
    metrics = MetricsLog(args.output_dir, args.enable_tensorboard, keep_lines=state.metrics_lines)

    def evaluate():
        scores = evaluate_reward(model, eval_loader, device, args.eval_max_batches)
        print_rank_0(f"chosen_last_scores (higher is better) : {scores['chosen_score']}, "
                     f"rejected_last_scores : {scores['rejected_score']}, "
                     f"acc (higher is better) : {scores['acc']}")
        return {"Test/acc": scores["acc"], "Test/reward_score": scores["chosen_score"],
                "Test/rejected_score": scores["rejected_score"]}

    backbone_config = model.module.rwtranrsformer.config
    passes = training_passes(args.gradient_checkpointing, args.lora_dim, backbone_config.hidden_size)
    num_params = count_parameters(model)
    finished = train_supervised(
        model, train_loader, args, device,
        compute_loss=lambda engine, batch: engine(**batch, use_cache=False)["loss"],
        evaluate=evaluate,
        save=lambda: export_atomic(args.output_dir, lambda directory: save_reward_model(
            model, tokenizer, directory, args.num_padding_at_beginning)),
        metrics=metrics, stage_name="reward", state=state,
        checkpoint_metric=("Test/acc", True), resume=resume,
        # chosen and rejected rows both run: twice the per-device batch
        throughput=lambda seconds: throughput_line(
            backbone_config, num_params, seconds, 2 * args.per_device_train_batch_size * world_size,
            args.max_seq_len, passes, world_size))
    metrics.close()
    if finished:
        print_rank_0(f"saved the reward model to {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
