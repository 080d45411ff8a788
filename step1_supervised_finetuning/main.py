"""Stage 1: supervised fine-tuning of a causal LM on prompt + chosen answer.

    deepspeed main.py --model_name_or_path /models/opt-1.3b --data_path /data/Dahoas/rm-static \
        --output_dir ./output --zero_stage 2
"""
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoModelForCausalLM, default_data_collator  # noqa: E402

from utils import arguments  # noqa: E402
from utils.checkpoint import add_checkpoint_args, export_atomic  # noqa: E402
from utils.data.data_utils import create_prompt_dataset  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.model.model_utils import (check_tokenizer_contract, count_parameters,  # noqa: E402
                                     create_hf_model, load_hf_tokenizer, save_hf_format)
from utils.module.lora import apply_lora  # noqa: E402
from utils.perf import throughput_line, training_passes  # noqa: E402
from utils.training import (MetricsLog, evaluate_perplexity, init_stage_engine,  # noqa: E402
                            load_supervised_checkpoint, start_stage, supervised_loaders,
                            train_supervised)
from utils.utils import print_rank_0  # noqa: E402


def parse_args(argv=None):
    parser = arguments.new_parser("Stage 1: supervised fine-tuning (SFT)")
    arguments.add_data_args(parser, sft_only=True)
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="A local Hugging Face model directory (config, weights, tokenizer).")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    arguments.add_optimization_args(parser, learning_rate=1e-3)
    arguments.add_runtime_args(parser, seed=2023)
    arguments.add_zero_args(parser)
    arguments.add_lora_args(parser)
    arguments.add_logging_args(parser, tensorboard_path="step1_tensorboard")
    parser.add_argument("--evals_per_epoch", type=int, default=10,
                        help="Perplexity evaluations (and saves) per epoch; the original's 10.")
    add_checkpoint_args(parser)
    return arguments.finish(parser, argv, phase=1)


def build_model(args, tokenizer, ds_config):
    model = create_hf_model(AutoModelForCausalLM, args.model_name_or_path, tokenizer, ds_config,
                            disable_dropout=args.disable_dropout)
    check_tokenizer_contract(tokenizer, model.config)
    return apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)


def main():
    args = parse_args()
    # the directories the flags name, on every rank, before anything is built or written
    device, world_size, ds_config, resume = start_stage(
        args, lambda: arguments.check_inputs(args, models=["model_name_or_path"]))

    tokenizer = load_hf_tokenizer(args.model_name_or_path)
    # data first: a bad row or an empty split stops the run before the model is loaded
    train_data, eval_data = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 1,
        args.data_seed, tokenizer, args.max_seq_len, end_of_conversation_token=tokenizer.eos_token,
        sft_only_data_path=args.sft_only_data_path, strict_data=args.strict_data)
    model = build_model(args, tokenizer, ds_config)
    train_loader, eval_loader = supervised_loaders(args, train_data, eval_data, default_data_collator,
                                                   world_size)

    model = init_stage_engine(model, args, ds_config, train_loader)
    state = load_supervised_checkpoint(resume, model, args, train_loader, world_size)
    metrics = MetricsLog(args.output_dir, args.enable_tensorboard, keep_lines=state.metrics_lines)

    def evaluate():
        ppl, loss = evaluate_perplexity(model, eval_loader, device)
        print_rank_0(f"ppl: {ppl}, loss: {loss}")
        return {"Test/ppl": ppl, "Test/loss": loss}

    passes = training_passes(args.gradient_checkpointing, args.lora_dim,
                             model.module.config.hidden_size)
    num_params = count_parameters(model)
    finished = train_supervised(
        model, train_loader, args, device,
        compute_loss=lambda engine, batch: engine(**batch, use_cache=False).loss,
        evaluate=evaluate,
        save=lambda: export_atomic(args.output_dir,
                                   lambda directory: save_hf_format(model, tokenizer, directory)),
        metrics=metrics, stage_name="perplexity", state=state,
        checkpoint_metric=("Test/ppl", False), resume=resume,
        throughput=lambda seconds: throughput_line(
            model.module.config, num_params, seconds, args.per_device_train_batch_size * world_size,
            args.max_seq_len, passes, world_size))
    metrics.close()
    if finished:
        print_rank_0(f"saved the model to {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
