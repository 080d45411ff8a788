"""Stage 3: RLHF with ReMax — REINFORCE with the greedy answer's reward as the baseline.

    deepspeed main.py --actor_model_name_or_path ./step1_output \
        --reward_model_name_or_path ./step2_output --data_path /data/Dahoas/rm-static \
        --actor_zero_stage 2 --reward_zero_stage 3 --reference_zero_stage 3 --output_dir ./output
"""
import math
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import default_data_collator  # noqa: E402

from evaluation import evaluate_policy  # noqa: E402
from remax_trainer import ReMaxTrainer  # noqa: E402
from rlhf_engine import RLHFEngine  # noqa: E402
from train_state import TrainState  # noqa: E402
from utils import arguments  # noqa: E402
from utils.data.data_utils import (DataCollatorRLHF, MiniDataset,  # noqa: E402
                                   create_prompt_dataset, get_unsupervised_data)
from utils.model.model_utils import load_hf_tokenizer, save_hf_format, unwrap  # noqa: E402
from utils.perf import calculate_flops, training_passes  # noqa: E402
from utils.training import (MetricsLog, NonFiniteGuard, interval, make_loader,  # noqa: E402
                            progress, record_run, set_loader_epoch)
from utils.utils import (all_reduce_sum, init_distributed, print_rank_0,  # noqa: E402
                         set_random_seed, to_device)

STEP_METRICS = ("reward", "baseline_reward", "advantage", "return", "max_return", "kl_ratio", "kl",
                "max_kl", "entropy", "actor_loss", "unsup_loss", "length", "greedy_length",
                "truncated", "greedy_truncated")


def parse_args(argv=None):
    parser = arguments.new_parser("Stage 3: RLHF with ReMax")
    parser.add_argument("--algo", type=str, default="remax", choices=["remax"])
    arguments.add_data_args(parser)
    parser.add_argument("--unsupervised_dataset_name", type=str, default=None,
                        help="A local corpus (file or directory) for the pretraining mix.")
    parser.add_argument("--unsupervised_dataset_config_name", type=str, default=None)
    parser.add_argument("--unsup_coef", type=float, default=27.8)
    parser.add_argument("--actor_model_name_or_path", type=str, required=True)
    parser.add_argument("--reward_model_name_or_path", type=str, required=True)
    parser.add_argument("--num_padding_at_beginning", type=int, default=1)
    parser.add_argument("--per_device_generation_batch_size", type=int, default=16)
    parser.add_argument("--per_device_training_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--generation_batches", type=int, default=1,
                        help="Prompt batches whose experience makes one actor update.")
    parser.add_argument("--ppo_epochs", type=int, default=1, help="Kept for script compatibility.")
    parser.add_argument("--max_prompt_seq_len", type=int, default=256)
    parser.add_argument("--max_answer_seq_len", type=int, default=256)
    parser.add_argument("--actor_learning_rate", type=float, default=9.65e-6)
    parser.add_argument("--actor_weight_decay", type=float, default=0.0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    group = parser.add_argument_group("schedule")
    arguments.add_scheduler_args(group, warmup=100)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    arguments.add_runtime_args(parser, seed=None)
    parser.add_argument("--preprocessing_num_workers", type=int, default=None)
    # DeepSpeed
    parser.add_argument("--enable_hybrid_engine", action="store_true")
    parser.add_argument("--unpin_actor_parameters", action="store_true")
    parser.add_argument("--release_inference_cache", action="store_true")
    parser.add_argument("--memory_efficient_linear", action="store_true")
    parser.add_argument("--inference_tp_size", type=int, default=1)
    parser.add_argument("--tp_gather_partition_size", type=int, default=8)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--offload_reference_model", action="store_true")
    parser.add_argument("--offload_reward_model", action="store_true")
    parser.add_argument("--actor_bf16", action="store_true")
    parser.add_argument("--reward_bf16", action="store_true")
    parser.add_argument("--actor_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--reward_zero_stage", type=int, default=0)
    parser.add_argument("--reference_zero_stage", type=int, default=0)
    parser.add_argument("--actor_gradient_checkpointing", action="store_true")
    parser.add_argument("--disable_actor_dropout", action="store_true")
    parser.add_argument("--disable_reward_dropout", action="store_true")
    # ReMax
    parser.add_argument("--gamma", type=float, default=0.95, help="Discount of the reward.")
    parser.add_argument("--penalty", type=str, default="kl",
                        choices=["kl", "full_kl", "kl_onestep", "full_kl_onestep"],
                        help="Unused, as in the original: the penalty is the per-token log-ratio.")
    parser.add_argument("--kl_ctl", type=float, default=0.1, help="β of the per-token KL penalty.")
    parser.add_argument("--target_kl", type=float, default=1.0,
                        help="Stop training when the evaluation KL reaches this.")
    parser.add_argument("--save_at_final", action="store_true")
    parser.add_argument("--normalize_kl", action="store_true", help="Unused, as in the original.")
    parser.add_argument("--entropy_coef", type=float, default=0.0,
                        help="Unused, as in the original (entropy is only logged).")
    parser.add_argument("--clip_reward_value", type=float, default=5.0)
    # LoRA, EMA, logging
    arguments.add_lora_args(parser, prefix="actor_")
    parser.add_argument("--enable_ema", action="store_true")
    parser.add_argument("--enable_mixed_precision_lora", action="store_true")
    parser.add_argument("--enable_tensorboard", action="store_true")
    parser.add_argument("--tensorboard_path", type=str, default="step3_tensorboard")
    parser.add_argument("--print_answers", action="store_true")
    parser.add_argument("--save_answers", action="store_true")
    parser.add_argument("--enable_test_mode", action="store_true")
    parser.add_argument("--test_stop_step", type=int, default=0)
    parser.add_argument("--evals_per_epoch", type=int, default=20,
                        help="Policy evaluations per epoch (the original's 20).")
    parser.add_argument("--eval_batches", type=int, default=20,
                        help="Prompt batches per rank in each reward evaluation (the original's 20).")
    parser.add_argument("--ppl_eval_batches", type=int, default=100)
    args = arguments.finish(parser, argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    if args.gradient_accumulation_steps != 1:
        parser.error("--gradient_accumulation_steps must be 1 in stage 3 (use --generation_batches)")
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        parser.error("--inference_tp_size > 1 needs --actor_zero_stage 3")
    if args.enable_mixed_precision_lora and (args.actor_lora_dim == 0 or args.actor_zero_stage != 3):
        parser.error("--enable_mixed_precision_lora needs --actor_lora_dim > 0 and actor ZeRO 3")
    # As the original, the pretraining mix needs both flags; one alone is an error, not ignored.
    if bool(args.unsupervised_dataset_name) != bool(args.unsupervised_dataset_config_name):
        parser.error("the pretraining mix needs both --unsupervised_dataset_name and "
                     "--unsupervised_dataset_config_name")
    if args.unsupervised_dataset_name and not os.path.exists(args.unsupervised_dataset_name):
        parser.error(f"--unsupervised_dataset_name {args.unsupervised_dataset_name} does not exist "
                     "(a local file or directory; nothing is downloaded)")


def create_datasets(args, tokenizer, world_size):
    """Prompt loaders (train, eval), the perplexity loader and the optional pretraining loader."""
    prompt_train, prompt_eval = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 3, args.data_seed,
        tokenizer, args.max_prompt_seq_len, end_of_conversation_token=tokenizer.eos_token)
    _, ppl_eval = create_prompt_dataset(
        args.local_rank, args.data_path, args.data_split, args.data_output_path, 1, args.data_seed,
        tokenizer, args.max_prompt_seq_len, end_of_conversation_token=tokenizer.eos_token)
    distributed = world_size > 1
    collator = DataCollatorRLHF(args.max_prompt_seq_len, args.inference_tp_size)
    # Full prompt batches only, so every update accumulates the same number of micro-batches.
    train_loader = make_loader(prompt_train, args.per_device_generation_batch_size, collator,
                               shuffle=True, distributed=distributed, seed=args.data_seed,
                               drop_last=True)
    eval_loader = make_loader(prompt_eval, args.per_device_generation_batch_size, collator,
                              shuffle=False, distributed=distributed)
    ppl_loader = make_loader(ppl_eval, args.per_device_eval_batch_size, default_data_collator,
                             shuffle=False, distributed=distributed)
    unsup_loader = None
    if args.unsupervised_dataset_name:
        unsup = get_unsupervised_data(args, tokenizer)
        unsup_loader = make_loader(unsup, args.per_device_generation_batch_size,
                                   default_data_collator, shuffle=True, distributed=distributed,
                                   seed=args.data_seed, drop_last=True)
    if len(train_loader) < args.generation_batches:
        raise ValueError(f"only {len(train_loader)} full prompt batches per rank; --generation_"
                         f"batches {args.generation_batches} needs more prompts")
    return train_loader, eval_loader, ppl_loader, unsup_loader


def micro_batches_per_update(args):
    """K: micro-batches whose gradients make one actor step (twice as many with the mix)."""
    k = args.generation_batches * math.ceil(args.per_device_generation_batch_size /
                                            args.per_device_training_batch_size)
    return k * (2 if args.unsupervised_dataset_name else 1)


def save_actor(engine, tokenizer, args):
    print_rank_0("saving model ...")
    save_hf_format(engine.actor, tokenizer, args.output_dir, "actor")
    if engine.actor_ema is not None:
        save_hf_format(engine.actor_ema, tokenizer, args.output_dir, "actor_ema")


def evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device):
    report = evaluate_policy(trainer, eval_loader, ppl_loader, args, state.global_step, device)
    print_rank_0(" | ".join(f"eval {k}: {v:.4f}" for k, v in report.items()))
    metrics.log(state.global_step, epoch=state.epoch, **{f"eval/{k}": v for k, v in report.items()})
    state.last_eval_kl = report["kl"]
    return report


def update_flops(args, config, world_size):
    """(training, generation) FLOPs of one update, the original's Megatron-formula estimate at the
    full sequence length; generation counts both the sampled and the greedy pass."""
    seq_len = args.max_prompt_seq_len + args.max_answer_seq_len
    batch = args.per_device_generation_batch_size * args.generation_batches * world_size
    passes = training_passes(args.actor_gradient_checkpointing, args.actor_lora_dim,
                             config.hidden_size)
    return (calculate_flops(passes, batch, seq_len, config),
            2 * calculate_flops(1, batch, seq_len, config))


def log_step(sums, k, timing, args, state, metrics, num_updates, world_size, flops):
    means = dict(zip(STEP_METRICS, (v / k for v in all_reduce_sum([sums.get(m, 0.0)
                                                                     for m in STEP_METRICS]))))
    means = {m: v / world_size for m, v in means.items()}
    gen_s, train_s = timing
    e2e = gen_s + train_s
    train_flops, gen_flops = flops
    tflops = lambda f, sec: f / max(sec, 1e-9) / world_size / 1e12  # noqa: E731  per device
    tokens = args.per_device_generation_batch_size * args.generation_batches * world_size * (
        means["length"] + means["greedy_length"])
    print_rank_0(
        f"Epoch: {state.epoch + 1}/{args.num_train_epochs} | Step: {state.global_step}/"
        f"{num_updates} | Actor Loss: {means['actor_loss']:.4f} | "
        f"Unsupervised Loss: {means['unsup_loss']:.4f}\n"
        f"Average reward score: {means['reward']:.4f} | baseline (greedy) reward: "
        f"{means['baseline_reward']:.4f} | Average return: {means['return']:.4f} | "
        f"Average length: {means['length']:.1f} (greedy {means['greedy_length']:.1f}, truncated "
        f"{means['truncated']:.2f}) | Average kl: {means['kl']:.4f} | Average entropy: "
        f"{means['entropy']:.4f} | Max kl: {means['max_kl']:.4f} | Max return: "
        f"{means['max_return']:.4f} | KL ratio: {means['kl_ratio']:.4f}\n"
        f"End-to-End => Latency: {e2e:.2f}s, TFLOPs: {tflops(train_flops + gen_flops, e2e):.2f} | "
        f"Generation: {gen_s:.2f}s ({tokens / max(gen_s, 1e-9):.1f} answer tokens/s, TFLOPs: "
        f"{tflops(gen_flops, gen_s):.2f}) | Training: {train_s:.2f}s (TFLOPs: "
        f"{tflops(train_flops, train_s):.2f})\n"
        + "-" * 85)
    metrics.log(state.global_step, epoch=state.epoch,
                **{f"train/{m}": v for m, v in means.items()},
                **{"train/generation_seconds": gen_s, "train/training_seconds": train_s,
                   "train/e2e_seconds": e2e,
                   "train/answer_tokens_per_second": tokens / max(gen_s, 1e-9)})


def main():
    args = parse_args()
    if args.enable_tensorboard:
        args.tensorboard_path = args.output_dir
    device, args.global_rank, world_size = init_distributed(args.local_rank)
    args.gradient_accumulation_steps_actor = micro_batches_per_update(args)
    set_random_seed(args.seed)
    record_run(args)

    tokenizer = load_hf_tokenizer(args.actor_model_name_or_path)
    train_loader, eval_loader, ppl_loader, unsup_loader = create_datasets(args, tokenizer,
                                                                          world_size)
    num_updates = len(train_loader) // args.generation_batches
    if unsup_loader is not None:
        num_updates = min(num_updates, len(unsup_loader) // args.generation_batches)
    # One optimizer step per update (the original's horizon assumed gen_bs/train_bs · ppo_epochs).
    engine = RLHFEngine(args, tokenizer, args.num_train_epochs * num_updates, world_size)
    if args.enable_mixed_precision_lora:
        engine.actor.optimizer.quantize_nontrainable_params()
        print_rank_0("Mixed Precision ZeRO++ enabled")
    trainer = ReMaxTrainer(engine, args)
    metrics = MetricsLog(args.output_dir, args.enable_tensorboard)
    state = TrainState()
    flops = update_flops(args, unwrap(engine.actor).config, world_size)

    print_rank_0("***** Running training *****")
    print_rank_0(f"***** Evaluating policy, Epoch 1/{args.num_train_epochs} *****")
    evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device)
    eval_every = interval(num_updates, args.evals_per_epoch)
    guard = NonFiniteGuard()
    for state.epoch in range(state.epoch, args.num_train_epochs):
        print_rank_0(f"Beginning of Epoch {state.epoch + 1}/{args.num_train_epochs}, "
                     f"Total Generation Batches {len(train_loader)}")
        set_loader_epoch(train_loader, state.epoch)
        unsup_iter = iter(unsup_loader) if unsup_loader is not None else None
        exp_buffer = MiniDataset(args.generation_batches, args.per_device_training_batch_size)
        unsup_buffer = MiniDataset(args.generation_batches, args.per_device_training_batch_size)
        generate_seconds, round_stats = 0.0, {}
        bar = progress(train_loader, f"remax epoch {state.epoch + 1}", total=len(train_loader))
        for batch_index, batch in enumerate(bar):
            if batch_index >= num_updates * args.generation_batches:
                break
            batch = to_device(batch, device)
            exp = trainer.generate_experience(
                batch["prompt"], batch["prompt_att_mask"], state.global_step,
                print_answers=args.print_answers and state.global_step % 20 == 0)
            generate_seconds += trainer.generate_time
            for key, value in exp.pop("stats").items():
                round_stats[key] = round_stats.get(key, 0.0) + value / args.generation_batches
            experiences = exp_buffer.add(exp)
            unsup_batches = None
            if unsup_iter is not None:
                unsup_batches = unsup_buffer.add(to_device(next(unsup_iter), device))
            if experiences is None:
                continue
            start = time.time()
            sums = trainer.train_step(experiences, unsup_batches)
            guard.check(sums["actor_loss"], f"update {state.global_step}")
            sums.update({key: value * len(experiences) for key, value in round_stats.items()})
            log_step(sums, len(experiences), (generate_seconds, time.time() - start), args,
                     state, metrics, num_updates * args.num_train_epochs, world_size, flops)
            generate_seconds, round_stats = 0.0, {}
            state.global_step += 1
            if not trainer.overflowed():
                state.non_overflow_steps += 1
            bar.set_postfix(reward=f"{sums['reward'] / len(experiences):.3f}")
            if state.global_step % eval_every == 0:
                print_rank_0(f"***** Evaluating policy, Epoch {state.epoch + 1}/"
                             f"{args.num_train_epochs} Step {state.global_step} *****")
                report = evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics,
                                          device)
                if state.is_best(report["reward"]):
                    save_actor(engine, tokenizer, args)
            # Early stop on the all-reduced eval KL; the original broke only the inner loop.
            if state.last_eval_kl is not None and state.last_eval_kl >= args.target_kl:
                print_rank_0(f"**** Early stop at {state.global_step} due to KL = "
                             f"{state.last_eval_kl} > Target KL ({args.target_kl}) ****")
                state.early_stopped = True
                break
            if args.enable_test_mode and state.non_overflow_steps == args.test_stop_step:
                break
        if state.early_stopped or args.enable_test_mode:
            break

    if not state.early_stopped or args.save_at_final:
        print_rank_0("***** Evaluating at final *****")
        report = evaluate_and_log(trainer, eval_loader, ppl_loader, args, state, metrics, device)
        # The original compared with None here when no periodic evaluation had run (TypeError).
        if state.is_best(report["reward"]) or args.save_at_final:
            save_actor(engine, tokenizer, args)
    metrics.close()
    print_rank_0(f"done: {state.global_step} updates; best eval reward {state.best_eval_reward}")


if __name__ == "__main__":
    main()
